"""A service goes down and comes back: the gateway degrades around it and tells the admins once.

The real services and the gateway run as processes against a fresh database and vhost. With the
orders service stopped, the gateway answers its routes with 503 problem+json at once and keeps
serving the others, its health report (an admin's, and the cluster's at /internal/health) names
the failing service while the public /health says only "fail", and its monitor publishes exactly
one HealthCheckFailed; once orders is back, exactly one HealthCheckRecovered follows, and later
polls publish nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aio_pika
import httpx
import pytest

from booking.contracts import (
    Event,
    HealthCheckFailed,
    HealthCheckRecovered,
    decode,
    parse_envelope,
)
from booking.devtools.fixtures import eventually
from booking.runtime.auth import Role, issue_token
from booking.runtime.settings import RuntimeSettings

HealthEvent = TypeVar("HealthEvent", HealthCheckFailed, HealthCheckRecovered)

SERVICES = ("orders", "payments", "calendar", "notifications")
HEALTH_JSON = "application/health+json"
PROBLEM_JSON = "application/problem+json"
UPSTREAM_TIMEOUT_SECONDS = 5.0
MONITOR_INTERVAL_SECONDS = 0.5
MIGRATE_DEADLINE_SECONDS = 120
READY_DEADLINE_SECONDS = 90
STOP_DEADLINE_SECONDS = 30
EVENT_DEADLINE_SECONDS = 20
# Monitor polls to watch go by after the recovery, with nothing more published.
QUIET_POLLS = 6

pytestmark = pytest.mark.e2e


@dataclass
class Service:
    """One `python -m booking.<name> serve` process, its output in files under `logs`."""

    name: str
    port: int
    env: dict[str, str]
    logs: Path
    starts: int = 0
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, f"{self.name} runs"
        self.starts += 1
        stem = f"{self.name}-{self.starts}"
        out_path, err_path = self.logs / f"{stem}.out", self.logs / f"{stem}.err"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", f"booking.{self.name}", "serve"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # a Ctrl-C meant for pytest is not theirs
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def stop(self, deadline: float = STOP_DEADLINE_SECONDS) -> int | None:
        """SIGTERM, wait for the exit; SIGKILL if it is not gone within `deadline`."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, deadline)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await asyncio.to_thread(process.wait, 10)
        return process.returncode

    async def wait_ready(self, http: httpx.AsyncClient) -> None:
        async def ready() -> bool:
            if not self.running():
                code = self.process.returncode if self.process else None
                pytest.fail(f"{self.name} exited ({code}) before it was ready")
            with contextlib.suppress(httpx.HTTPError):
                return (await http.get(f"{self.url}/health/ready")).status_code == 200
            return False

        await eventually(
            ready,
            timeout=READY_DEADLINE_SECONDS,
            interval=0.1,
            what=f"{self.name} answering 200 on /health/ready",
        )


def log_tails(logs: Path, lines: int = 40) -> str:
    parts = []
    for path in sorted(logs.glob("*.out")) + sorted(logs.glob("*.err")):
        text = path.read_text(errors="replace").splitlines()[-lines:]
        if text:
            parts.append(f"----- {path.name}\n" + "\n".join(text))
    return "\n".join(parts)


async def migrate(name: str, env: dict[str, str], logs: Path) -> None:
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", f"booking.{name}", "migrate"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=MIGRATE_DEADLINE_SECONDS,
    )
    (logs / f"{name}.migrate.out").write_bytes(result.stdout + result.stderr)
    assert result.returncode == 0, f"{name} migrate failed:\n{result.stderr.decode()}"


class EventTap:
    """An exclusive queue on the events exchange that keeps every gateway event it is sent."""

    def __init__(self) -> None:
        self.received: list[Event] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, url: str, exchange_name: str) -> AsyncIterator[EventTap]:
        tap = cls()
        connection = await aio_pika.connect(url, timeout=10)
        try:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(
                exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(exchange, routing_key="gateway.#")

            async def keep(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                tap.received.append(decode(parse_envelope(message.body)))

            await queue.consume(keep, no_ack=True)
            yield tap
        finally:
            await connection.close()

    def of(self, kind: type[HealthEvent], component: str) -> list[HealthEvent]:
        return [e for e in self.received if isinstance(e, kind) and e.component == component]


HEALTH_REQUESTS = re.compile(
    r'^booking_http_requests_total\{method="GET",route="/health",status="\d+"\} (\S+)$',
    re.MULTILINE,
)


def health_requests(metrics_text: str) -> float:
    """How many `GET /health` a service has answered, from its Prometheus metrics."""
    return sum(float(count) for count in HEALTH_REQUESTS.findall(metrics_text))


def check_statuses(report: dict) -> dict[str, str]:
    return {key: entries[0]["status"] for key, entries in report["checks"].items()}


@pytest.mark.timeout(MIGRATE_DEADLINE_SECONDS + 2 * READY_DEADLINE_SECONDS + 120)
async def test_an_outage_of_orders_degrades_only_its_routes_and_alerts_once(
    system_env: dict[str, str], tmp_path: Path
):
    env = dict(system_env)
    logs = tmp_path / "logs"
    logs.mkdir()
    services = {
        name: Service(name, int(env[f"{name.upper()}_PORT"]), env, logs) for name in SERVICES
    }
    gateway_env = dict(
        env,
        **{f"{name.upper()}_URL": service.url for name, service in services.items()},
        HEALTH_MONITOR_INTERVAL_SECONDS=str(MONITOR_INTERVAL_SECONDS),
        HEALTH_MONITOR_FAILURES_TO_ALERT="2",
        UPSTREAM_TIMEOUT_SECONDS=str(UPSTREAM_TIMEOUT_SECONDS),
    )
    gateway = Service("gateway", int(env["GATEWAY_PORT"]), gateway_env, logs)
    orders = services["orders"]
    secret = env.get("AUTH_JWT_SECRET") or RuntimeSettings().auth_jwt_secret.get_secret_value()
    admin = {"authorization": f"Bearer {issue_token(secret, str(uuid.uuid4()), Role.ADMIN)}"}

    started = time.monotonic()
    try:
        # Each service migrates its own schema under its own lock: all four at once.
        await asyncio.gather(*(migrate(name, env, logs) for name in SERVICES))
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as http:
            # The services first, so the monitor never sees them down while they start.
            for service in services.values():
                service.start()
            for service in services.values():
                await service.wait_ready(http)
            gateway.start()
            await gateway.wait_ready(http)

            async def system_health() -> httpx.Response:
                return await http.get(f"{gateway.url}/health")

            async def system_passes() -> bool:
                return (await system_health()).status_code == 200

            await eventually(system_passes, timeout=10, what="the gateway's /health passing")

            async with EventTap.open(
                env["RABBITMQ_URL"], env.get("EVENTS_EXCHANGE") or "booking.events"
            ) as tap:
                # 1. Orders goes down.
                assert await orders.stop() is not None
                assert not orders.running()

                # 2. Its routes answer 503 at once; the other services' routes still answer.
                asked = time.monotonic()
                response = await http.get(
                    f"{gateway.url}/api/mentors/{uuid.uuid4()}", headers=admin
                )
                took = time.monotonic() - asked
                assert response.status_code == 503, response.text
                assert response.headers["content-type"].startswith(PROBLEM_JSON)
                assert "orders" in response.json()["detail"], response.json()
                assert took < UPSTREAM_TIMEOUT_SECONDS, f"took {took:.1f}s"
                for path in ("/api/admin/notifications", f"/api/mentors/{uuid.uuid4()}/calendar"):
                    response = await http.get(f"{gateway.url}{path}", headers=admin)
                    assert response.status_code not in (502, 503, 504), (path, response.text)

                # 3. The system's health names orders as failing, and only orders: to an admin
                # and inside the cluster; the public sees the overall status alone.
                response = await http.get(f"{gateway.url}/internal/health")
                assert response.status_code == 503, response.text
                assert response.headers["content-type"].startswith(HEALTH_JSON)
                report = response.json()
                by_admin = await http.get(f"{gateway.url}/api/admin/health", headers=admin)
                assert by_admin.status_code == 503, by_admin.text
                assert check_statuses(by_admin.json())["orders:health"] == "fail"

                async def public_fails_and_says_no_more() -> bool:
                    public = await system_health()  # reused for up to a second
                    return public.status_code == 503 and public.json() == {"status": "fail"}

                _ = await eventually(
                    public_fails_and_says_no_more, timeout=10, what="the public /health failing"
                )
                assert report["status"] == "fail", report
                statuses = check_statuses(report)
                assert statuses["orders:health"] == "fail", statuses
                for name in SERVICES[1:]:
                    assert statuses[f"{name}:health"] != "fail", statuses
                assert (await http.get(f"{gateway.url}/health/live")).status_code == 200

                # 4. The admins hear of it once.
                await eventually(
                    lambda: tap.of(HealthCheckFailed, "orders:health"),
                    timeout=EVENT_DEADLINE_SECONDS,
                    what="HealthCheckFailed for orders:health",
                )
                (failed,) = tap.of(HealthCheckFailed, "orders:health")
                assert failed.status == "fail"

                # 5. Orders comes back: one HealthCheckRecovered, and no further alert.
                orders.start()
                await orders.wait_ready(http)
                await eventually(
                    lambda: tap.of(HealthCheckRecovered, "orders:health"),
                    timeout=EVENT_DEADLINE_SECONDS,
                    what="HealthCheckRecovered for orders:health",
                )
                _ = await eventually(
                    system_passes, timeout=10, what="the gateway's /health passing"
                )

                # Watch the monitor poll orders a few more times (the restarted orders counts
                # each GET /health it answers; we send none now), then count the events.
                async def orders_health_requests() -> float:
                    response = await http.get(f"{orders.url}/metrics")
                    response.raise_for_status()
                    return health_requests(response.text)

                seen = await orders_health_requests()

                async def monitor_polled() -> bool:
                    return await orders_health_requests() >= seen + QUIET_POLLS

                _ = await eventually(
                    monitor_polled,
                    timeout=QUIET_POLLS * MONITOR_INTERVAL_SECONDS + 10,
                    interval=0.1,
                    what=f"{QUIET_POLLS} more monitor polls of orders",
                )
                assert len(tap.of(HealthCheckFailed, "orders:health")) == 1, tap.received
                assert len(tap.of(HealthCheckRecovered, "orders:health")) == 1, tap.received
                (recovered,) = tap.of(HealthCheckRecovered, "orders:health")
                assert recovered.status in ("pass", "warn"), recovered
                assert orders.running()
    except BaseException:
        print(f"process output after {time.monotonic() - started:.1f}s:\n{log_tails(logs)}")
        raise
    finally:
        await asyncio.gather(
            *(service.stop() for service in (gateway, *services.values())),
            return_exceptions=True,
        )
