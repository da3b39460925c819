"""Fixtures for whole-system tests: a fresh database, a fresh vhost, free ports.

Every e2e run gets its own Postgres database and (where `rabbitmqctl` is at hand) its own RabbitMQ
virtual host, and listens on ports picked free, so it never meets a developer's running system.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest

from booking.devtools.fixtures import (
    Spy,
    eventually,
    pick_free_ports,
    private_database,
    private_vhost,
)
from booking.runtime.auth import issue_token
from booking.runtime.settings import RuntimeSettings
from booking.sandbox.control import ControlAuth

ROOT = Path(__file__).resolve().parents[2]
RUN_PREFIX = "booking_e2e"  # of each run's database and vhost
FLOW_SECONDS = 30  # one step of the flow (events through three services), on a loaded machine
# Four migrations and seven processes starting at once, on a slow machine.
SYSTEM_READY_SECONDS = 180

PORT_VARIABLES = (
    "GATEWAY_PORT",
    "ORDERS_PORT",
    "PAYMENTS_PORT",
    "CALENDAR_PORT",
    "NOTIFICATIONS_PORT",
    "SANDBOX_KONNECT_PORT",
    "SANDBOX_GOOGLE_PORT",
)
# Addresses that `make run` derives from the ports: a developer's own values must not leak in.
DERIVED_VARIABLES = (
    "PUBLIC_BASE_URL",
    "ORDERS_URL",
    "PAYMENTS_URL",
    "CALENDAR_URL",
    "NOTIFICATIONS_URL",
    "KONNECT_API_URL",
    "SANDBOX_KONNECT_PUBLIC_URL",
    "GOOGLE_AUTH_URL",
    "GOOGLE_TOKEN_URL",
    "GOOGLE_CALENDAR_API_URL",
)


@pytest.fixture
async def fresh_database() -> AsyncIterator[str]:
    async with private_database(RUN_PREFIX) as url:
        yield url


@pytest.fixture
async def fresh_rabbitmq() -> AsyncIterator[dict[str, str]]:
    async with private_vhost(RUN_PREFIX) as settings:
        yield settings


@pytest.fixture
def free_ports() -> Callable[[int], list[int]]:
    return pick_free_ports


def system_environment(database_url: str, rabbitmq: dict[str, str]) -> dict[str, str]:
    """The environment for `make run`: ours, pointed at the given database, vhost and free ports."""
    env = {k: v for k, v in os.environ.items() if k not in DERIVED_VARIABLES}
    env.update(rabbitmq)
    env["DATABASE_URL"] = database_url
    env["BIND_HOST"] = "127.0.0.1"
    env["NO_COLOR"] = "1"
    env.update(zip(PORT_VARIABLES, map(str, pick_free_ports(len(PORT_VARIABLES))), strict=True))
    return env


@pytest.fixture
def system_env(fresh_database: str, fresh_rabbitmq: dict[str, str]) -> dict[str, str]:
    return system_environment(fresh_database, fresh_rabbitmq)


@dataclass
class RunningSystem:
    """The whole system as `make run` starts it (its supervisor, devrun), for one test module."""

    env: dict[str, str]
    log: Path
    process: subprocess.Popen | None = None

    def url(self, port_variable: str) -> str:
        return f"http://127.0.0.1:{self.env[port_variable]}"

    @property
    def gateway(self) -> str:
        return self.url("GATEWAY_PORT")

    @property
    def konnect(self) -> str:
        """The sandbox Konnect: its API under /api/v2, its control API under /_sandbox (the
        system runs in development mode, as the tests do: ControlAuth's development token)."""
        return self.url("SANDBOX_KONNECT_PORT")

    @property
    def google(self) -> str:
        """The sandbox Google: OAuth, Calendar v3, its control API under /_sandbox."""
        return self.url("SANDBOX_GOOGLE_PORT")

    @property
    def rabbitmq_url(self) -> str:
        return self.env["RABBITMQ_URL"]

    @property
    def events_exchange(self) -> str:
        return self.env.get("EVENTS_EXCHANGE", "booking.events")

    def token(self, role: str, sub: str | None = None) -> dict[str, str]:
        """An Authorization header for `role`, signed with the system's secret."""
        secret = self.env.get("AUTH_JWT_SECRET") or RuntimeSettings().auth_jwt_secret
        if not isinstance(secret, str):
            secret = secret.get_secret_value()
        token = issue_token(secret, sub or f"{role}-{uuid.uuid4().hex[:8]}", role)
        return {"Authorization": f"Bearer {token}"}

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "booking.devtools.devrun"],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def wait_ready(self) -> None:
        async def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"the system exited ({self.process.returncode}):\n{self.tail()}")
            return bool(re.search(r"all \d+ processes are ready", self.log.read_text()))

        await eventually(ready, timeout=SYSTEM_READY_SECONDS, interval=0.2, what="make run ready")

    async def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C, as a developer stops it
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait, 10)


@pytest.fixture(scope="module")
def system_overrides() -> dict[str, str]:
    """Settings a test module wants for its running system; override the fixture to set some."""
    return {}


@pytest.fixture(scope="module")
async def running_system(
    system_overrides: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningSystem]:
    """Every service and sandbox running against a fresh database and vhost, for one module."""
    async with private_database(RUN_PREFIX) as database_url, private_vhost(RUN_PREFIX) as rabbitmq:
        env = system_environment(database_url, rabbitmq)
        env.update(system_overrides)
        system = RunningSystem(env, tmp_path_factory.mktemp("system") / "make-run.log")
        system.start()
        try:
            await system.wait_ready()
            yield system
        finally:
            await system.stop()


# --- driving the running system --------------------------------------------------------------


@pytest.fixture
async def api(running_system) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=running_system.gateway, timeout=30, trust_env=False
    ) as client:
        yield client


@pytest.fixture
async def konnect(running_system) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=running_system.konnect, timeout=30, trust_env=False, auth=ControlAuth()
    ) as client:
        yield client
        await client.delete("/_sandbox/faults")


@pytest.fixture
async def events(running_system) -> AsyncIterator[SystemEvents]:
    """Every event the system publishes while the test runs."""
    connection = await aio_pika.connect(running_system.rabbitmq_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(running_system.events_exchange)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, "#")
        spy = SystemEvents(channel, running_system.events_exchange)

        async def collect(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            spy.messages.append(message)

        await queue.consume(collect, no_ack=True)
        yield spy


class SystemEvents(Spy):
    def payloads(self, type_: str, **match: Any) -> list[dict[str, Any]]:
        """The payloads of the events of `type_` seen so far whose fields equal `match`."""
        found = [json.loads(m.body)["payload"] for m in self.of_type(type_)]
        return [p for p in found if all(p.get(k) == v for k, v in match.items())]

    async def seen(self, type_: str, **match: Any) -> list[dict[str, Any]]:
        """Wait for an event of `type_` whose fields equal `match`; the payloads found."""
        return await eventually(
            lambda: self.payloads(type_, **match),
            timeout=FLOW_SECONDS,
            what=f"{type_} with {match}",
        )


class Marketplace:
    """What a test does through the gateway (as admin, mentor and mentee) and as the payer."""

    @staticmethod
    def next_week(hours: int = 0) -> datetime:
        base = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=7)
        return base + timedelta(hours=hours)

    async def pay(self, ref: str, **body: Any) -> dict[str, Any]:
        """The payer pays at the sandbox Konnect (`amount`, `webhook` as its control API takes)."""
        response = await self.konnect.post(f"/_sandbox/payments/{ref}/complete", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    def __init__(
        self,
        api: httpx.AsyncClient,
        konnect: httpx.AsyncClient,
        google: httpx.AsyncClient,
        system: RunningSystem,
    ) -> None:
        self.api = api
        self.konnect = konnect
        self.google = google
        self.system = system
        self.admin = system.token("admin")
        self.mentee = system.token("mentee")
        self.mentor_emails: dict[str, str] = {}

    async def consent_url(self, mentor_id: str, headers: dict[str, str]) -> str:
        """Where the gateway redirects to start connecting Google.

        The calendar service answers 404 until it has consumed the mentor's MentorRegistered,
        which can come a moment after the 201 that registered them.
        """

        async def redirect() -> str | None:
            start = await self.api.get(
                f"/api/mentors/{mentor_id}/calendar/connect", headers=headers
            )
            if start.status_code == 404:
                return None
            assert start.status_code == 302, start.text
            return start.headers["location"]

        location: str | None = await eventually(
            redirect, timeout=FLOW_SECONDS, interval=0.05, what="the calendar knows the mentor"
        )
        assert location is not None  # eventually returns only a truthy answer
        return location

    async def connect_calendar(self, mentor_id: str) -> dict[str, Any]:
        """The mentor connects Google: the consent the gateway redirects to, approved."""
        auth_url = await self.consent_url(mentor_id, self.system.token("mentor", mentor_id))
        approved = await self.google.post("/_sandbox/oauth/approve", json={"auth_url": auth_url})
        assert approved.status_code == 200, approved.text
        back = approved.json()["location"]  # the callback, through the gateway
        assert back.startswith(f"{self.system.gateway}/api/calendar/oauth/callback?"), back
        finished = await self.api.get(back)
        assert finished.status_code == 200, finished.text
        return finished.json()

    async def google_events(self, mentor_id: str) -> list[dict[str, Any]]:
        listed = await self.google.get(
            "/_sandbox/events", params={"account": self.mentor_emails[mentor_id]}
        )
        assert listed.status_code == 200, listed.text
        return listed.json()["events"]

    async def offering(self, *, price: int = 120_000, minutes: int = 60) -> dict[str, Any]:
        mentor = await self.api.post(
            "/api/mentors",
            json={
                "name": "Amira Ben Salah",
                # Each mentor their own Google account (the consent's login_hint).
                "email": f"amira-{uuid.uuid4().hex[:8]}@example.com",
                "timezone": "Africa/Tunis",
            },
            headers=self.admin,
        )
        assert mentor.status_code == 201, mentor.text
        mentor_id = mentor.json()["id"]
        self.mentor_emails[mentor_id] = mentor.json()["email"]
        offering = await self.api.post(
            f"/api/mentors/{mentor_id}/offerings",
            json={
                "title": "System design review",
                "duration_minutes": minutes,
                "price": {"amount": price, "currency": "TND"},
            },
            headers=self.system.token("mentor", mentor_id),
        )
        assert offering.status_code == 201, offering.text
        return offering.json()

    async def book(
        self,
        offering: dict[str, Any],
        start_at: datetime | None = None,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> httpx.Response:
        start_at = start_at or self.next_week()
        body = {
            "offering_id": offering["id"],
            "start_at": start_at.isoformat(),
            "mentee": {
                "first_name": "Youssef",
                "last_name": "Trabelsi",
                "email": "youssef@example.com",
                "phone": "+216 20 123 456",
            },
            **extra,
        }
        return await self.api.post("/api/bookings", json=body, headers=headers or self.mentee)

    async def order(self, order_id: str) -> dict[str, Any]:
        response = await self.api.get(f"/api/orders/{order_id}", headers=self.mentee)
        assert response.status_code == 200, response.text
        return response.json()

    async def order_when(self, order_id: str, what: str, predicate) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            order = await self.order(order_id)
            return order if predicate(order) else None

        found: dict[str, Any] | None = await eventually(
            probe, timeout=FLOW_SECONDS, interval=0.1, what=what
        )
        assert found is not None  # eventually returns only a truthy answer
        return found

    async def payment_ref(self, order_id: str) -> str:
        order = await self.order_when(
            order_id, "the pay link", lambda o: o["payment"] and o["payment"]["pay_url"]
        )
        assert order["status"] == "awaiting_payment"
        return order["payment"]["ref"]

    async def booked(self, offering: dict[str, Any], start_at: datetime | None = None) -> str:
        response = await self.book(offering, start_at)
        assert response.status_code == 202, response.text
        return response.json()["order_id"]


@pytest.fixture
async def google(running_system) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=running_system.google, timeout=30, trust_env=False, auth=ControlAuth()
    ) as client:
        yield client
        await client.delete("/_sandbox/faults")


@pytest.fixture
def market(api, konnect, google, running_system) -> Marketplace:
    return Marketplace(api, konnect, google, running_system)
