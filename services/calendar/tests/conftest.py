"""The calendar service on Postgres, against the Google sandbox over real HTTP.

`calendar` serves the app on the real RabbitMQ; `start_on_test_broker` runs its handlers on
FastStream's TestRabbitBroker (no RabbitMQ) with its routes in process, for the handler tests
where a real broker is not the point. The schema is migrated once per session; each test that
runs the service starts from empty calendar tables (the sweeper works on every row, so one
test's leftovers would be another's work) and gets its own exchange and queue names. One
sandbox serves the session (each test's mentors have their own Google accounts, so they never
meet); each test clears its fault switches first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from booking.calendar.app import create_app
from booking.calendar.service import CalendarService
from booking.calendar.settings import CalendarSettings
from booking.calendar.sweeper import Sweeper
from booking.calendar.tables import SCHEMA
from booking.contracts import Event, MentorRegistered, OrderCancelled, OrderPaid
from booking.devtools.fixtures import (
    SandboxClient,
    Served,
    Spy,
    TcpProxy,
    deliver,
    eventually,
    free_port,
    on_test_broker,
    publish_event,
    serving_with_client,
)
from booking.runtime.auth import issue_token
from booking.runtime.host import ServiceRuntime
from booking.runtime.migrations import upgrade
from booking.sandbox.control import ControlAuth
from booking.sandbox.google import create_app as create_sandbox
from booking.sandbox.settings import SandboxSettings

CLIENT_ID = "calendar-tests-client"
CLIENT_SECRET = "calendar-tests-secret"


# -- the database ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
async def migrated(database_url: str) -> str:
    settings = CalendarSettings(database_url=database_url)
    await asyncio.to_thread(upgrade, settings, "booking.calendar", SCHEMA)
    return database_url


@pytest.fixture
async def postgres_proxy(migrated: str) -> AsyncIterator[TcpProxy]:
    """A proxy a test can cut to make Postgres unreachable. Ask for it before the service: it
    then outlives the service's teardown, which still needs the database."""
    parts = urlsplit(migrated)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    yield proxy
    await proxy.stop()


async def empty_tables(conn: asyncpg.Connection) -> None:
    await conn.execute(
        f"TRUNCATE {SCHEMA}.scheduling_attempts, {SCHEMA}.calendar_bookings, "
        f"{SCHEMA}.connections, {SCHEMA}.oauth_states, {SCHEMA}.mentors, {SCHEMA}.outbox, "
        f"{SCHEMA}.inbox, {SCHEMA}.admin_actions, {SCHEMA}.dead_letters"
    )


# -- the Google sandbox ------------------------------------------------------------------------


class Sandbox(SandboxClient):
    @property
    def auth_url(self) -> str:
        return f"{self.url}/o/oauth2/v2/auth"

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    @property
    def calendar_api_url(self) -> str:
        return f"{self.url}/calendar/v3"

    async def approve(self, auth_url: str, *, deny: bool = False) -> str:
        """The mentor's click on Allow (or Deny): where Google sends the browser back."""
        answer = await self._control(
            "POST", "/oauth/approve", json={"auth_url": auth_url, "deny": deny}
        )
        return answer["location"]

    async def events(self, account: str) -> list[dict[str, Any]]:
        return (await self._control("GET", "/events", params={"account": account}))["events"]

    async def tokens(self, account: str) -> dict[str, list[dict[str, Any]]]:
        return await self._control("GET", "/tokens", params={"account": account})

    async def refresh_tokens(self, account: str) -> list[str]:
        return [t["token"] for t in (await self.tokens(account))["refresh_tokens"]]

    async def access_tokens_issued(self, account: str) -> int:
        """Every access token issued to the account: one per code exchange and per refresh."""
        return len((await self.tokens(account))["access_tokens"])

    async def revoke(self, account: str) -> None:
        await self._control("POST", "/revoke", json={"account": account})

    async def expire_access_tokens(self, account: str) -> None:
        await self._control("POST", "/expire-access-tokens", json={"account": account})

    async def fault(
        self, kind: str, count: int = 1, endpoint: str = "any", seconds: float | None = None
    ) -> None:
        body: dict[str, Any] = {"kind": kind, "count": count, "endpoint": endpoint}
        if seconds is not None:
            body["seconds"] = seconds
        await self._control("POST", "/faults", json=body)

    async def faults(self) -> list[dict[str, Any]]:
        """The switches not used up yet (a call takes one as it arrives)."""
        return (await self._control("GET", "/faults"))["faults"]

    async def event(self, account: str, event_id: str) -> dict[str, Any]:
        [event] = [e for e in await self.events(account) if e["id"] == event_id]
        return event


@contextlib.asynccontextmanager
async def google_sandbox(**settings: Any) -> AsyncIterator[Sandbox]:
    values: dict[str, Any] = {
        "google_client_id": CLIENT_ID,
        "google_client_secret": CLIENT_SECRET,
        **settings,
    }
    async with serving_with_client(create_sandbox(SandboxSettings(**values))) as (url, http):
        http.auth = ControlAuth()  # the sandbox's control API takes the test run's token
        yield Sandbox(url, http)


@pytest.fixture(scope="session")
async def sandbox_server() -> AsyncIterator[Sandbox]:
    async with google_sandbox() as sandbox:
        yield sandbox


@pytest.fixture
async def sandbox(sandbox_server: Sandbox) -> Sandbox:
    await sandbox_server.clear_faults()
    return sandbox_server


@pytest.fixture
async def pending_meet_sandbox() -> AsyncIterator[Sandbox]:
    """A sandbox whose new events show their Meet data `pending` for their first 3 reads."""
    async with google_sandbox(google_meet_pending_reads=3) as sandbox:
        yield sandbox


@pytest.fixture
async def make_pending_meet_sandbox() -> AsyncIterator[Callable[..., Awaitable[Sandbox]]]:
    """`await make_pending_meet_sandbox(reads)`: a sandbox whose new events show their Meet
    data `pending` for their first `reads` reads."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(reads: int) -> Sandbox:
            return await stack.enter_async_context(google_sandbox(google_meet_pending_reads=reads))

        yield make


# -- the calendar service ----------------------------------------------------------------------


def order_paid(mentor_id: uuid.UUID, **fields: Any) -> OrderPaid:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=3)
    values: dict[str, Any] = {
        "order_id": uuid.uuid4(),
        "session_id": uuid.uuid4(),
        "mentor_id": mentor_id,
        "mentee_email": "amira@example.com",
        "title": "Career chat",
        "start_at": start,
        "end_at": start + timedelta(hours=1),
    }
    values.update(fields)
    return OrderPaid(**values)


@dataclass
class Mentor:
    id: uuid.UUID
    email: str  # also the mentor's account in the sandbox


@dataclass
class Calendar:
    """One calendar service under test and ways to drive it; how events reach it and how what it
    emits is seen is the subclasses' business."""

    app: FastAPI
    url: str
    settings: CalendarSettings
    http: httpx.AsyncClient
    sandbox: Sandbox
    db: asyncpg.Connection

    @property
    def service(self) -> CalendarService:
        return self.app.state.calendar

    @property
    def sweeper(self) -> Sweeper:
        return self.app.state.sweeper

    def token(self, role: str = "admin", sub: str | None = None) -> dict[str, str]:
        secret = self.settings.auth_jwt_secret.get_secret_value()
        token = issue_token(secret, sub or f"test-{role}", role)
        return {"authorization": f"Bearer {token}"}

    async def publish(self, event: Event, *, message_id: uuid.UUID | None = None) -> None:
        """Hand `event` to the service, as its producer's would reach it."""
        raise NotImplementedError

    async def one(self, event_type: str, session_id: uuid.UUID) -> dict:
        """Wait for the service to emit the event, then make sure it did once."""
        raise NotImplementedError

    async def confirmed(self, session_id: uuid.UUID) -> dict:
        return await self.one("CalendarBookingConfirmed", session_id)

    async def failed(self, session_id: uuid.UUID) -> dict:
        return await self.one("CalendarBookingFailed", session_id)

    async def register_mentor(
        self,
        timezone: str = "Africa/Tunis",
        mentor_id: uuid.UUID | None = None,
        identity_subject: str | None = None,
    ) -> Mentor:
        mentor = Mentor(mentor_id or uuid.uuid4(), f"mentor-{uuid.uuid4().hex[:10]}@example.com")
        await self.publish(
            MentorRegistered(
                mentor_id=mentor.id,
                name="Ada Lovelace",
                email=mentor.email,
                timezone=timezone,
                identity_subject=identity_subject,
            )
        )

        async def known() -> bool:
            return await self.db.fetchval(
                f"SELECT count(*) FROM {SCHEMA}.mentors WHERE id = $1", mentor.id
            )

        await eventually(known, what=f"mentor {mentor.id} registered")
        return mentor

    async def consent_redirect(self, mentor: Mentor) -> str:
        response = await self.http.get(
            f"/api/mentors/{mentor.id}/calendar/connect", headers=self.token()
        )
        assert response.status_code == 302, response.text
        return response.headers["location"]

    async def callback(self, location: str) -> httpx.Response:
        """The browser, sent back by Google to our redirect_uri."""
        assert location.startswith(self.settings.oauth_redirect_uri), location
        return await self.http.get(location)

    async def connect(self, mentor: Mentor) -> dict[str, Any]:
        """The whole consent round trip; the connection as the callback answered it."""
        back = await self.sandbox.approve(await self.consent_redirect(mentor))
        response = await self.callback(back)
        assert response.status_code == 200, response.text
        return response.json()

    async def connected(self, timezone: str = "Africa/Tunis") -> Mentor:
        mentor = await self.register_mentor(timezone)
        await self.connect(mentor)
        return mentor

    @staticmethod
    def order_paid(mentor: Mentor | uuid.UUID, **fields: Any) -> OrderPaid:
        return order_paid(mentor.id if isinstance(mentor, Mentor) else mentor, **fields)

    async def pay(self, mentor: Mentor | uuid.UUID, **fields: Any) -> OrderPaid:
        event = self.order_paid(mentor, **fields)
        await self.publish(event)
        return event

    async def cancel(
        self, paid: OrderPaid, reason: str = "admin_cancelled", by: str | None = "admin-1"
    ) -> OrderCancelled:
        """Orders' OrderCancelled for the paid session's order."""
        event = OrderCancelled(
            order_id=paid.order_id,
            session_id=paid.session_id,
            mentor_id=paid.mentor_id,
            reason=reason,
            by=by,
        )
        await self.publish(event)
        return event

    async def retry(
        self, session_id: uuid.UUID, body: Any = None, role: str = "admin"
    ) -> httpx.Response:
        """An admin's retry of the session's scheduling, through the route."""
        return await self.http.post(
            f"/api/admin/sessions/{session_id}/retry-scheduling",
            json=body,
            headers=self.token(role, "admin-7" if role == "admin" else None),
        )

    async def attempts(self, session_id: uuid.UUID) -> list[asyncpg.Record]:
        return await self.db.fetch(
            f"SELECT * FROM {SCHEMA}.scheduling_attempts WHERE session_id = $1 ORDER BY attempt",
            session_id,
        )

    async def audit(self) -> list[asyncpg.Record]:
        return await self.db.fetch(f"SELECT * FROM {SCHEMA}.admin_actions ORDER BY id")

    async def booking(self, session_id: uuid.UUID) -> asyncpg.Record | None:
        return await self.db.fetchrow(
            f"SELECT * FROM {SCHEMA}.calendar_bookings WHERE session_id = $1", session_id
        )

    async def connection(self, mentor: Mentor) -> asyncpg.Record | None:
        return await self.db.fetchrow(
            f"SELECT * FROM {SCHEMA}.connections WHERE mentor_id = $1", mentor.id
        )


@dataclass
class Running(Calendar):
    """The calendar service served over HTTP on the real RabbitMQ: events are published on its
    exchange, and a spy on that exchange sees what it publishes."""

    spy: Spy

    async def publish(self, event: Event, *, message_id: uuid.UUID | None = None) -> None:
        """Publish `event` on the service's exchange, as its producer would."""
        await publish_event(self.app, self.settings.events_exchange, event, message_id=message_id)

    def failures(self, session_id: uuid.UUID) -> list[dict]:
        """The session's CalendarBookingFailed payloads so far, in the order they came."""
        return self.published("CalendarBookingFailed", session_id)

    async def failed_times(self, session_id: uuid.UUID, count: int) -> list[dict]:
        """Wait for the session's `count`-th CalendarBookingFailed; all of them."""
        await eventually(
            lambda: len(self.failures(session_id)) >= count,
            what=f"CalendarBookingFailed #{count} of {session_id}",
        )
        return self.failures(session_id)

    def published(self, event_type: str, session_id: uuid.UUID | None = None) -> list[dict]:
        """Payloads of `event_type` seen on the exchange (about `session_id`, if given)."""
        return self.spy.payloads(event_type, session_id=session_id)

    async def one(self, event_type: str, session_id: uuid.UUID) -> dict:
        return await self.spy.one(event_type, session_id=session_id)


@dataclass
class OnTestBroker(Calendar):
    """The calendar service's handlers on FastStream's TestRabbitBroker, no RabbitMQ: events go
    to its consumer through `deliver`, and what it emits is what it recorded in its outbox (the
    relay that publishes it is the runtime's, tested against the real broker). Its routes are
    called in process."""

    @property
    def runtime(self) -> ServiceRuntime:
        return self.app.state.runtime

    async def publish(self, event: Event, *, message_id: uuid.UUID | None = None) -> None:
        """Deliver `event` to the service's consumer, as its queue would."""
        await deliver(self.runtime, event, message_id=message_id)

    async def recorded(self, event_type: str, session_id: uuid.UUID | None = None) -> list[dict]:
        """Payloads of the `event_type` events the service recorded for its events exchange
        (about `session_id`, if given), in the order it recorded them."""
        bodies = await self.db.fetch(
            f"SELECT body FROM {SCHEMA}.outbox WHERE event_type = $1 AND exchange = $2 ORDER BY id",
            event_type,
            self.settings.events_exchange,
        )
        payloads = [json.loads(row["body"])["payload"] for row in bodies]
        return [p for p in payloads if session_id is None or p.get("session_id") == str(session_id)]

    async def one(self, event_type: str, session_id: uuid.UUID) -> dict:
        await eventually(
            lambda: self.recorded(event_type, session_id), what=f"{event_type} for {session_id}"
        )
        # The service's background runs end first: a second one they recorded would show.
        await self.service.settle()
        found = await self.recorded(event_type, session_id)
        assert len(found) == 1, found
        return found[0]


def service_settings(make_settings: Callable[..., Any], sandbox: Sandbox, **overrides: Any):
    port = free_port()
    values: dict[str, Any] = {
        # No gateway here: Google sends the browser straight back to the service.
        "public_base_url": f"http://127.0.0.1:{port}",
        "google_client_id": CLIENT_ID,
        "google_client_secret": CLIENT_SECRET,
        "google_auth_url": sandbox.auth_url,
        "google_token_url": sandbox.token_url,
        "google_calendar_api_url": sandbox.calendar_api_url,
        "google_timeout_seconds": 2.0,
        "google_max_attempts": 3,
        "google_retry_base_seconds": 0.01,
        "google_retry_after_max_seconds": 2.0,
        "google_meet_poll_attempts": 4,
        "google_meet_poll_base_seconds": 0.01,
        # The background sweeper stays asleep: tests sweep with run_once(now).
        "sweeper_interval_seconds": 3600,
        "scheduling_grace_seconds": 0,
    }
    values.update(overrides)
    return port, make_settings(CalendarSettings, **values)


@pytest.fixture
async def start_calendar(
    make_settings: Callable[..., Any],
    sandbox: Sandbox,
    serve_service: Callable[..., Awaitable[Served]],
    db: asyncpg.Connection,
) -> Callable[..., Awaitable[Running]]:
    """`await start_calendar(sandbox=None, **settings)`: a running service on empty tables."""
    await empty_tables(db)

    async def start(google: Sandbox | None = None, **overrides: Any) -> Running:
        google = google or sandbox
        port, settings = service_settings(make_settings, google, **overrides)
        served = await serve_service(create_app, settings, port)
        return Running(
            app=served.app,
            url=served.url,
            settings=settings,
            http=served.http,
            sandbox=google,
            db=db,
            spy=served.spy,
        )

    return start


@pytest.fixture
async def calendar(start_calendar: Callable[..., Awaitable[Running]]) -> Running:
    return await start_calendar()


@contextlib.asynccontextmanager
async def handlers_on_test_broker(app: FastAPI) -> AsyncIterator[None]:
    """What the app's lifespan opens for its handlers, with them on FastStream's TestRabbitBroker
    in place of the runtime's start: no broker connection, no relay. The sweeper is not started
    (in a served app it sleeps through a test too: tests sweep with run_once)."""
    runtime, service, google = app.state.runtime, app.state.calendar, app.state.google
    await google.open()
    try:
        async with on_test_broker(runtime):
            yield
    finally:
        await service.stop()
        await google.aclose()
        await runtime.verifier.aclose()
        await runtime.db.engine.dispose()


@pytest.fixture
async def start_on_test_broker(
    migrated: str, sandbox: Sandbox, db: asyncpg.Connection
) -> AsyncIterator[Callable[..., Awaitable[OnTestBroker]]]:
    """`await start_on_test_broker(sandbox=None, **settings)`: the service's handlers on
    FastStream's TestRabbitBroker and its routes in process, on empty tables; no RabbitMQ."""
    await empty_tables(db)

    def settings_of(settings_type: type[CalendarSettings], **values: Any) -> CalendarSettings:
        # Names of its own: the consumer's metrics are labelled with its queue's.
        tag = uuid.uuid4().hex[:8]
        names = {
            "events_exchange": f"in-process.{tag}.events",
            "admin_alerts_exchange": f"in-process.{tag}.alerts",
            "queue_prefix": f"in-process.{tag}.",
        }
        return settings_type.model_validate({"database_url": migrated, **names, **values})

    async with contextlib.AsyncExitStack() as stack:

        async def start(google: Sandbox | None = None, **overrides: Any) -> OnTestBroker:
            google = google or sandbox
            _, settings = service_settings(settings_of, google, **overrides)
            app = create_app(settings)
            await stack.enter_async_context(handlers_on_test_broker(app))
            http = await stack.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url=settings.public_base_url
                )
            )
            return OnTestBroker(
                app=app,
                url=settings.public_base_url,
                settings=settings,
                http=http,
                sandbox=google,
                db=db,
            )

        yield start
