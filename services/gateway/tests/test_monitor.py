"""System health: the gateway aggregates every service's (for admins and the cluster; the public
sees the overall status alone), and the monitor alerts.

Real HTTP (stand-in services served on loopback ports, whose /health answers what the test says)
and the real RabbitMQ (a test queue bound to the test's own exchange collects what is published).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response

from booking.contracts import HealthCheckFailed, HealthCheckRecovered, decode, parse_envelope
from booking.devtools.fixtures import Spy, TcpProxy, eventually, free_port, serving, url_via
from booking.gateway.app import create_app
from booking.gateway.monitor import (
    SERVICES,
    HealthMonitor,
    SystemHealth,
)
from booking.gateway.settings import GatewaySettings
from booking.runtime.auth import Role, issue_token
from booking.runtime.broker import Broker
from booking.runtime.health import Health, HealthResponse
from booking.runtime.settings import RuntimeSettings

TIMEOUT = 2.0  # per service check, seconds: generous, for a loaded machine


# --- stand-in services ----------------------------------------------------------------------


class StandIn:
    """A service whose /health answers a report with the status the test sets.

    mode "report" answers health+json (503 when fail); "hang" never answers in time;
    "garbage" answers 502 with an HTML body, as a broken proxy would.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = "pass"
        self.mode = "report"
        self.url = ""
        self.asked = 0  # how many times its /health was asked
        self.release = asyncio.Event()
        self.app = FastAPI()
        self.app.add_api_route("/health", self.health, methods=["GET"])

    async def health(self) -> Response:
        self.asked += 1
        if self.mode == "hang":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await self.release.wait()
        if self.mode == "garbage":
            return PlainTextResponse("<html>502 Bad Gateway</html>", status_code=502)
        database: dict[str, Any] = {"componentType": "datastore", "status": "pass"}
        if self.status != "pass":
            database = {**database, "status": self.status, "output": "connection refused"}
        return HealthResponse(
            {
                "status": self.status,
                "serviceId": self.name,
                "checks": {
                    "database:responseTime": [database],
                    "rabbitmq:connection": [{"componentType": "system", "status": "pass"}],
                },
            }
        )


@pytest.fixture
async def standins() -> AsyncIterator[dict[str, StandIn]]:
    """One served stand-in per service behind the gateway."""
    made = {name: StandIn(name) for name in SERVICES}
    async with contextlib.AsyncExitStack() as stack:
        for standin in made.values():
            standin.url = await stack.enter_async_context(serving(standin.app))
        try:
            yield made
        finally:
            for standin in made.values():
                standin.release.set()


def urls(standins: dict[str, StandIn], **replaced: str) -> dict[str, str]:
    return {name: replaced.get(name, s.url) for name, s in standins.items()}


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


# --- the test's view of the events exchange ------------------------------------------------


def health_events(spy: Spy) -> list[str]:
    return [m.type for m in spy.messages if m.type and m.type.startswith("HealthCheck")]


@pytest.fixture
async def make_broker() -> AsyncIterator[Callable[..., Any]]:
    brokers: list[Broker] = []

    async def build(settings: RuntimeSettings, url: str | None = None) -> Broker:
        broker = Broker(
            url or settings.rabbitmq_url.get_secret_value(),
            client_name="gateway-test",
            events_exchange=settings.events_exchange,
            alerts_exchange=settings.admin_alerts_exchange,
            reconnect_interval=settings.broker_reconnect_interval_seconds,
        )
        brokers.append(broker)
        broker.start()
        await broker.wait_ready(15)
        return broker

    yield build
    for broker in brokers:
        await broker.stop()


@pytest.fixture
async def make_monitor() -> AsyncIterator[Callable[..., Any]]:
    """A started SystemHealth and its (not started) monitor; both stopped at the end."""
    made: list[tuple[SystemHealth, HealthMonitor]] = []

    async def build(
        upstreams: dict[str, str], broker: Broker, exchange: str, **options: Any
    ) -> HealthMonitor:
        system = SystemHealth(Health(service="gateway"), upstreams, timeout=TIMEOUT)
        await system.start()
        options = {"interval": 0.05, "failures_to_alert": 2, "retry_interval": 0.05, **options}
        monitor = HealthMonitor(system, broker, exchange=exchange, **options)
        made.append((system, monitor))
        return monitor

    yield build
    for system, monitor in made:
        await monitor.stop()
        await system.stop()


async def polls_pass(monitor: HealthMonitor, count: int) -> None:
    """Wait until the running monitor has polled `count` more times."""
    target = monitor.polls + count
    await eventually(lambda: monitor.polls >= target, what=f"{count} more polls")


# --- the aggregated report ------------------------------------------------------------------


@dataclass
class Gateway:
    url: str
    settings: GatewaySettings

    def auth(self, role: Role) -> dict[str, str]:
        secret = self.settings.auth_jwt_secret.get_secret_value()
        return {"Authorization": f"Bearer {issue_token(secret, f'{role}-1', role)}"}


@contextlib.asynccontextmanager
async def gateway(
    make_settings, upstreams: dict[str, str], **overrides: Any
) -> AsyncIterator[Gateway]:
    """The gateway app wired as app.py wires it, served over HTTP."""
    settings = make_settings(
        GatewaySettings,
        orders_url=upstreams["orders"],
        payments_url=upstreams["payments"],
        calendar_url=upstreams["calendar"],
        notifications_url=upstreams["notifications"],
        health_upstream_timeout_seconds=TIMEOUT,
        health_monitor_interval_seconds=3600,  # these tests drive the monitor themselves
        **overrides,
    )
    app = create_app(settings)
    async with serving(app) as url:
        await app.state.runtime.broker.wait_ready(15)
        yield Gateway(url, settings)
    async with await aio_pika.connect(settings.rabbitmq_url.get_secret_value()) as connection:
        channel = await connection.channel()
        await channel.exchange_delete(settings.events_exchange)
        await channel.exchange_delete(settings.admin_alerts_exchange)


class TestAggregatedReport:
    async def test_each_service_is_a_component_with_the_status_it_reports(
        self, make_settings, standins
    ):
        standins["payments"].status = "warn"
        async with gateway(make_settings, urls(standins)) as gw, httpx.AsyncClient() as client:
            full = await client.get(f"{gw.url}/internal/health")
            ready = await client.get(f"{gw.url}/health/ready")
            live = await client.get(f"{gw.url}/health/live")

        assert full.status_code == 200, full.text
        assert full.headers["content-type"].startswith("application/health+json")
        report = full.json()
        assert report["status"] == "warn"  # the worst of all
        assert report["serviceId"] == "gateway"
        assert set(report["checks"]) == {
            "rabbitmq:connection",  # the gateway's own
            "admin-alerts:connections",  # its live alert feed
            "admin-alerts:consumers",
            "order-changes:consumers",  # its feed of order changes
            "orders:health",
            "payments:health",
            "calendar:health",
            "notifications:health",
        }
        for name in SERVICES:
            [entry] = report["checks"][f"{name}:health"]
            assert entry["componentType"] == "component"
            assert entry["status"] == ("warn" if name == "payments" else "pass")
            assert entry["observedUnit"] == "ms"
            assert entry["observedValue"] >= 0
            assert entry["time"].endswith("Z")
        payments = report["checks"]["payments:health"][0]
        assert payments["output"] == "database:responseTime warn: connection refused"
        # Readiness stays the gateway's own dependencies; liveness checks nothing.
        assert ready.status_code == 200
        assert set(ready.json()["checks"]) == {"rabbitmq:connection"}
        assert live.status_code == 200
        assert "checks" not in live.json()

    async def test_a_service_that_is_down_hangs_or_answers_garbage_fails_with_the_reason(
        self, make_settings, standins
    ):
        standins["orders"].status = "fail"
        standins["payments"].mode = "garbage"
        standins["notifications"].mode = "hang"
        upstreams = urls(standins, calendar=closed_url())
        async with gateway(make_settings, upstreams) as gw, httpx.AsyncClient() as client:
            started = time.monotonic()
            response = await client.get(f"{gw.url}/internal/health")
            elapsed = time.monotonic() - started

        assert response.status_code == 503
        assert response.headers["content-type"].startswith("application/health+json")
        report = response.json()
        assert report["status"] == "fail"
        assert report["checks"]["rabbitmq:connection"][0]["status"] == "pass"
        entries = {name: report["checks"][f"{name}:health"][0] for name in SERVICES}
        assert {e["status"] for e in entries.values()} == {"fail"}
        assert entries["orders"]["output"] == "database:responseTime fail: connection refused"
        assert "not JSON" in entries["payments"]["output"]
        assert "502" in entries["payments"]["output"]
        assert "unreachable" in entries["calendar"]["output"]
        assert upstreams["calendar"] in entries["calendar"]["output"]
        assert f"within {TIMEOUT:g}s" in entries["notifications"]["output"]
        # The hanging service (30 s) was given up on at its timeout, not waited out.
        assert elapsed < 10


class TestWhoSeesWhat:
    """The report names hosts, queues and errors: the public sees the overall status alone."""

    @pytest.mark.parametrize(("status", "code"), [("pass", 200), ("warn", 200), ("fail", 503)])
    async def test_the_public_health_is_the_overall_status_and_nothing_else(
        self, make_settings, standins, status, code
    ):
        standins["calendar"].status = status
        async with gateway(make_settings, urls(standins)) as gw, httpx.AsyncClient() as client:
            public = await client.get(f"{gw.url}/health")
            internal = await client.get(f"{gw.url}/internal/health")

        assert public.status_code == internal.status_code == code
        assert public.headers["content-type"].startswith("application/health+json")
        assert public.json() == {"status": status}
        assert internal.json()["checks"]["calendar:health"][0]["status"] == status

    async def test_the_whole_report_is_an_admins_and_no_one_elses(self, make_settings, standins):
        standins["orders"].status = "fail"
        async with gateway(make_settings, urls(standins)) as gw, httpx.AsyncClient() as client:
            nobody = await client.get(f"{gw.url}/api/admin/health")
            forged = await client.get(
                f"{gw.url}/api/admin/health", headers={"Authorization": "Bearer not-a-jwt"}
            )
            mentee = await client.get(f"{gw.url}/api/admin/health", headers=gw.auth(Role.MENTEE))
            mentor = await client.get(f"{gw.url}/api/admin/health", headers=gw.auth(Role.MENTOR))
            admin = await client.get(f"{gw.url}/api/admin/health", headers=gw.auth(Role.ADMIN))

        for refused, code in ((nobody, 401), (forged, 401), (mentee, 403), (mentor, 403)):
            assert refused.status_code == code, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
            assert "checks" not in refused.json()
        # Fail answers 503, with the report that says why.
        assert admin.status_code == 503, admin.text
        assert admin.headers["content-type"].startswith("application/health+json")
        report = admin.json()
        assert report["status"] == "fail"
        assert {f"{name}:health" for name in SERVICES} <= set(report["checks"])
        orders = report["checks"]["orders:health"][0]
        assert orders["output"] == "database:responseTime fail: connection refused"

    async def test_the_openapi_document_declares_the_admin_route_and_not_the_internal_one(
        self, make_settings, standins
    ):
        async with gateway(make_settings, urls(standins)) as gw, httpx.AsyncClient() as client:
            document = (await client.get(f"{gw.url}/openapi.json")).json()

        assert "/internal/health" not in document["paths"]
        admin = document["paths"]["/api/admin/health"]["get"]["responses"]
        assert set(admin) == {"200", "401", "403", "503"}
        for refused in ("401", "403"):
            assert set(admin[refused]["content"]) == {"application/problem+json"}
        public = document["paths"]["/health"]["get"]
        assert "overall status" in public["summary"]  # the gateway's, not the runtime's

    async def test_a_burst_of_public_requests_asks_each_service_once(self, make_settings, standins):
        # A max age far longer than the burst, so that "once" holds on a slow machine too.
        async with (
            gateway(make_settings, urls(standins), health_public_max_age_seconds=60) as gw,
            httpx.AsyncClient() as client,
        ):
            # The monitor polls once as it starts: wait for that, then count from there.
            await eventually(lambda: all(s.asked for s in standins.values()), what="first poll")
            before = {name: s.asked for name, s in standins.items()}
            answers = await asyncio.gather(*(client.get(f"{gw.url}/health") for _ in range(30)))

        assert {a.status_code for a in answers} == {200}
        assert {name: s.asked - before[name] for name, s in standins.items()} == {
            name: 1 for name in SERVICES
        }

    async def test_the_public_status_follows_a_change_within_its_max_age(
        self, make_settings, standins
    ):
        async with gateway(make_settings, urls(standins)) as gw, httpx.AsyncClient() as client:
            assert (await client.get(f"{gw.url}/health")).json() == {"status": "pass"}
            standins["notifications"].status = "fail"

            async def public_fails() -> bool:
                return (await client.get(f"{gw.url}/health")).status_code == 503

            await eventually(public_fails, timeout=10, what="the public /health failing")


# --- the monitor ----------------------------------------------------------------------------


def only(spy: Spy, type_: str) -> Any:
    [message] = spy.of_type(type_)
    return message


class TestMonitor:
    async def test_one_failed_event_per_outage_however_long_then_one_recovered(
        self, make_settings, standins, spy_on, make_broker, make_monitor
    ):
        settings = make_settings()
        spy = await spy_on(settings)
        broker = await make_broker(settings)
        monitor = await make_monitor(urls(standins), broker, settings.events_exchange)
        monitor.start()
        await polls_pass(monitor, 3)

        standins["orders"].status = "fail"
        await eventually(lambda: spy.of_type("HealthCheckFailed"), what="HealthCheckFailed")
        await polls_pass(monitor, 10)  # the service stays down through many more polls
        await spy.settle()
        assert health_events(spy) == ["HealthCheckFailed"]

        failed = only(spy, "HealthCheckFailed")
        assert failed.routing_key == "gateway.health_check_failed"
        assert failed.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        envelope = parse_envelope(failed.body)
        assert str(envelope.message_id) == failed.message_id
        assert envelope.producer == "gateway"
        assert envelope.correlation_id == failed.correlation_id
        event = decode(envelope)
        assert isinstance(event, HealthCheckFailed)
        assert event.component == "orders:health"
        assert event.status == "fail"
        assert "connection refused" in event.output

        standins["orders"].status = "pass"
        await eventually(lambda: spy.of_type("HealthCheckRecovered"), what="HealthCheckRecovered")
        await polls_pass(monitor, 10)
        await spy.settle()
        assert health_events(spy) == ["HealthCheckFailed", "HealthCheckRecovered"]

        recovered = parse_envelope(only(spy, "HealthCheckRecovered").body)
        assert isinstance(decode(recovered), HealthCheckRecovered)
        assert decode(recovered).component == "orders:health"
        assert decode(recovered).status == "pass"
        # One outage, one trail: the recovery carries the failure's correlation and cause.
        assert recovered.correlation_id == envelope.correlation_id
        assert recovered.causation_id == str(envelope.message_id)

    async def test_failed_polls_below_the_threshold_publish_nothing(
        self, make_settings, standins, spy_on, make_broker, make_monitor
    ):
        settings = make_settings()
        spy = await spy_on(settings)
        broker = await make_broker(settings)
        monitor = await make_monitor(urls(standins), broker, settings.events_exchange)
        orders = standins["orders"]

        for status in ("fail", "pass", "fail", "warn", "fail", "pass"):  # never two in a row
            orders.status = status
            await monitor.poll()
        await spy.settle()
        assert health_events(spy) == []
        assert not monitor.pending

        orders.status = "fail"
        await monitor.poll()
        await monitor.poll()  # the second in a row reaches the threshold
        await spy.settle()
        assert health_events(spy) == ["HealthCheckFailed"]

    async def test_a_warning_service_is_no_failure_and_a_recovery_to_warn_is_reported(
        self, make_settings, standins, spy_on, make_broker, make_monitor
    ):
        settings = make_settings()
        spy = await spy_on(settings)
        broker = await make_broker(settings)
        monitor = await make_monitor(
            urls(standins), broker, settings.events_exchange, failures_to_alert=1
        )
        payments = standins["payments"]
        payments.status = "warn"
        await monitor.poll()
        payments.mode = "garbage"
        await monitor.poll()
        payments.mode = "report"
        await monitor.poll()
        await spy.settle()

        assert health_events(spy) == ["HealthCheckFailed", "HealthCheckRecovered"]
        failed = decode(parse_envelope(only(spy, "HealthCheckFailed").body))
        recovered = decode(parse_envelope(only(spy, "HealthCheckRecovered").body))
        assert failed.component == recovered.component == "payments:health"
        assert "not JSON" in failed.output
        assert recovered.status == "warn"


class TestMonitorWhileTheBrokerIsAway:
    @pytest.fixture
    async def proxy(self, rabbitmq_url: str) -> AsyncIterator[TcpProxy]:
        host, port = "127.0.0.1", int(rabbitmq_url.rsplit(":", 1)[1].split("/")[0])
        proxy = TcpProxy(host, port)
        await proxy.start()
        try:
            yield proxy
        finally:
            await proxy.stop()

    async def test_a_transition_waits_for_the_broker_and_is_published_once_it_is_back(
        self, make_settings, standins, spy_on, make_broker, make_monitor, proxy, rabbitmq_url
    ):
        settings = make_settings()
        spy = await spy_on(settings)  # straight to RabbitMQ, not through the proxy
        broker = await make_broker(settings, url_via(rabbitmq_url, proxy))
        monitor = await make_monitor(urls(standins), broker, settings.events_exchange)
        monitor.start()
        await polls_pass(monitor, 2)

        await proxy.cut()
        await eventually(lambda: not broker.is_connected, what="the disconnect")
        standins["calendar"].status = "fail"
        await eventually(lambda: monitor.pending, what="the transition pending")
        await polls_pass(monitor, 10)  # still down, still one transition waiting
        assert [p.event.event_type() for p in monitor.pending] == ["HealthCheckFailed"]
        await spy.settle()
        assert health_events(spy) == []

        await proxy.restore()
        await eventually(
            lambda: spy.of_type("HealthCheckFailed"), timeout=30, what="the event after the outage"
        )
        assert not monitor.pending
        await polls_pass(monitor, 5)
        await spy.settle()
        assert health_events(spy) == ["HealthCheckFailed"]
        event = decode(parse_envelope(only(spy, "HealthCheckFailed").body))
        assert event.component == "calendar:health"

    async def test_an_outage_and_its_recovery_both_wait_and_arrive_in_order(
        self, make_settings, standins, spy_on, make_broker, make_monitor, proxy, rabbitmq_url
    ):
        settings = make_settings()
        spy = await spy_on(settings)
        broker = await make_broker(settings, url_via(rabbitmq_url, proxy))
        monitor = await make_monitor(urls(standins), broker, settings.events_exchange)
        monitor.start()

        await proxy.cut()
        await eventually(lambda: not broker.is_connected, what="the disconnect")
        standins["notifications"].status = "fail"
        await eventually(lambda: len(monitor.pending) == 1, what="the failure pending")
        standins["notifications"].status = "pass"
        await eventually(lambda: len(monitor.pending) == 2, what="the recovery pending")

        await proxy.restore()
        await eventually(lambda: len(health_events(spy)) >= 2, timeout=30, what="both events")
        await polls_pass(monitor, 5)
        await spy.settle()
        assert health_events(spy) == ["HealthCheckFailed", "HealthCheckRecovered"]
