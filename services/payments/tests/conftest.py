"""The payments service on the real servers, against the Konnect sandbox over real HTTP.

The schema is migrated once per session; each test that runs the service starts from empty
payments tables (the sweeper works on every row, so one test's leftovers would be another's
work). On the real RabbitMQ (`payments_service`: the routes, the sweeper, the app) each test
gets its own exchange and queues; the handler tests (`payments`) run the subscribers on
FastStream's test broker instead and read what the service emits from its outbox. One sandbox
serves the session; each test clears its fault switches first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from booking.contracts import (
    BookingRequested,
    CalendarFailureReason,
    Event,
    MenteeContact,
    Offering,
    OrderCancelled,
    OrderConfirmed,
    SchedulingAbandoned,
)
from booking.devtools.fixtures import (
    SandboxClient,
    Served,
    Spy,
    deliver,
    eventually,
    free_port,
    on_test_broker,
    publish_event,
    serving_with_client,
)
from booking.payments.app import create_app
from booking.payments.service import PaymentService
from booking.payments.settings import PaymentsSettings
from booking.payments.sweeper import Sweeper
from booking.payments.tables import SCHEMA
from booking.runtime.auth import Role, issue_token
from booking.runtime.migrations import upgrade
from booking.sandbox.control import ControlAuth
from booking.sandbox.konnect import create_app as create_sandbox
from booking.sandbox.settings import SandboxSettings

SANDBOX_HANG_SECONDS = 3.0  # a "timeout" fault: longer than the clients' timeouts here


# -- the database ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
async def migrated(database_url: str) -> str:
    settings = PaymentsSettings(database_url=database_url)
    await asyncio.to_thread(upgrade, settings, "booking.payments", SCHEMA)
    return database_url


@pytest.fixture
async def status_changes(db: asyncpg.Connection) -> AsyncIterator[Callable[[], Awaitable[list]]]:
    """Every status change of a payment or an escrow hold from now on, logged by a trigger:
    `await status_changes()` -> [(table, order_id, new status), ...] in commit order."""
    await db.execute(
        f"""
        CREATE TABLE {SCHEMA}.test_status_changes (
            seq bigserial, tbl text, order_id uuid, status text);
        CREATE FUNCTION {SCHEMA}.test_log_status() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO {SCHEMA}.test_status_changes (tbl, order_id, status)
            VALUES (TG_TABLE_NAME, NEW.order_id, NEW.status);
            RETURN NULL;
        END $$;
        CREATE TRIGGER test_status_changes AFTER UPDATE ON {SCHEMA}.payments FOR EACH ROW
            WHEN (OLD.status IS DISTINCT FROM NEW.status)
            EXECUTE FUNCTION {SCHEMA}.test_log_status();
        CREATE TRIGGER test_status_changes AFTER UPDATE ON {SCHEMA}.escrow_holds FOR EACH ROW
            WHEN (OLD.status IS DISTINCT FROM NEW.status)
            EXECUTE FUNCTION {SCHEMA}.test_log_status();
        """
    )

    async def changes() -> list[tuple[str, uuid.UUID, str]]:
        rows = await db.fetch(f"SELECT * FROM {SCHEMA}.test_status_changes ORDER BY seq")
        return [(r["tbl"], r["order_id"], r["status"]) for r in rows]

    try:
        yield changes
    finally:
        await db.execute(
            f"""
            DROP TRIGGER test_status_changes ON {SCHEMA}.payments;
            DROP TRIGGER test_status_changes ON {SCHEMA}.escrow_holds;
            DROP FUNCTION {SCHEMA}.test_log_status();
            DROP TABLE {SCHEMA}.test_status_changes;
            """
        )


async def empty_tables(conn: asyncpg.Connection) -> None:
    await conn.execute(
        f"TRUNCATE {SCHEMA}.escrow_holds, {SCHEMA}.payments, {SCHEMA}.order_endings, "
        f"{SCHEMA}.admin_actions, {SCHEMA}.dead_letters, {SCHEMA}.outbox, {SCHEMA}.inbox"
    )


# -- the Konnect sandbox -----------------------------------------------------------------------


class Sandbox(SandboxClient):
    @property
    def api_url(self) -> str:
        return f"{self.url}/api/v2"

    async def complete(self, ref: str, *, amount: int | None = None, webhook: str = "once"):
        body: dict[str, Any] = {"webhook": webhook, "delay_seconds": 0}
        if amount is not None:
            body["amount"] = amount
        return await self._control("POST", f"/payments/{ref}/complete", json=body)

    async def fail(self, ref: str, *, webhook: str = "once") -> Any:
        return await self._control(
            "POST", f"/payments/{ref}/fail", json={"webhook": webhook, "delay_seconds": 0}
        )

    async def expire(self, ref: str) -> Any:
        return await self._control("POST", f"/payments/{ref}/expire")

    async def payments(self, order_id: uuid.UUID) -> list[dict[str, Any]]:
        answer = await self._control("GET", "/payments", params={"order_id": str(order_id)})
        return answer["payments"]

    async def fault(self, kind: str, count: int = 1, endpoint: str = "any") -> None:
        await self._control(
            "POST", "/faults", json={"kind": kind, "count": count, "endpoint": endpoint}
        )

    async def faults(self) -> list[dict[str, Any]]:
        return (await self._control("GET", "/faults"))["faults"]

    async def forge_webhook(self, url: str, ref: str) -> dict[str, Any]:
        return await self._control("POST", "/webhooks/send", json={"url": url, "payment_ref": ref})


@pytest.fixture(scope="session")
async def sandbox_server() -> AsyncIterator[Sandbox]:
    settings = SandboxSettings(konnect_timeout_fault_seconds=SANDBOX_HANG_SECONDS)
    async with serving_with_client(create_sandbox(settings)) as (url, http):
        http.auth = ControlAuth()  # the sandbox's control API takes the test run's token
        yield Sandbox(url, http)


@pytest.fixture
async def sandbox(sandbox_server: Sandbox) -> Sandbox:
    await sandbox_server.clear_faults()
    return sandbox_server


# -- the payments service ----------------------------------------------------------------------


@dataclass(kw_only=True)
class Payments:
    """A payments service under test, served over HTTP, and ways to drive it. How events reach
    it and how what it emits is read is its subclasses' business: `Running` on the real broker,
    `InProcess` on FastStream's test broker."""

    app: FastAPI
    url: str
    settings: PaymentsSettings
    http: httpx.AsyncClient
    db: asyncpg.Connection
    konnect_requests: list[httpx.Request] = field(default_factory=list)

    def count_konnect_requests(self) -> None:
        """From now on, every request the service sends Konnect lands in `konnect_requests`
        (counted at its client, so a retry counts again)."""

        async def count(request: httpx.Request) -> None:
            self.konnect_requests.append(request)

        self.app.state.konnect.http.event_hooks["request"].append(count)

    def konnect_reads(self, ref: str | None = None) -> int:
        """How many payment reads (`GET /payments/{ref}`) the service sent Konnect."""
        reads = [r.url.path for r in self.konnect_requests if r.method == "GET"]
        reads = [path for path in reads if "/payments/" in path]
        return len([p for p in reads if p.endswith(f"/payments/{ref}")] if ref else reads)

    @property
    def service(self) -> PaymentService:
        return self.app.state.payments

    @property
    def sweeper(self) -> Sweeper:
        return self.app.state.sweeper

    async def publish(self, event: Event, *, message_id: uuid.UUID | None = None) -> uuid.UUID:
        """Hand payments an event of orders', as its queue would; its message id."""
        raise NotImplementedError

    async def one(self, event_type: str, order_id: uuid.UUID | None = None) -> dict:
        """Wait for the event, then make sure it came once."""
        raise NotImplementedError

    async def request_booking(
        self,
        event: BookingRequested | None = None,
        *,
        message_id: uuid.UUID | None = None,
        **fields: Any,
    ) -> BookingRequested:
        """Send BookingRequested, as orders would."""
        event = event or booking_requested(**fields)
        await self.publish(event, message_id=message_id)
        return event

    async def initiated(self, order_id: uuid.UUID) -> dict:
        return await self.one("PaymentInitiated", order_id)

    @staticmethod
    def new_booking(**fields: Any) -> BookingRequested:
        """A BookingRequested as orders would send it (not sent)."""
        return booking_requested(**fields)

    async def handled(self, message_id: uuid.UUID) -> None:
        """Wait until the consumer has handled (committed) the message."""

        async def seen() -> bool:
            query = f"SELECT 1 FROM {SCHEMA}.inbox WHERE message_id = $1"
            return await self.db.fetchval(query, message_id) is not None

        await eventually(seen, what=f"message {message_id} handled")

    async def deliver(self, event: Event) -> None:
        """Send an event of orders' and wait until payments has handled it."""
        await self.handled(await self.publish(event))

    async def confirm(self, booking: BookingRequested, end_at: datetime | None = None) -> None:
        """OrderConfirmed, as orders sends it once the session is in the calendar."""
        await self.deliver(
            OrderConfirmed(
                order_id=booking.order_id,
                session_id=booking.session_id,
                mentor_id=booking.mentor_id,
                end_at=end_at or booking.end_at,
            )
        )

    async def cancel(
        self, booking: BookingRequested, *, by: str | None = "admin-1", reason: str = "ill"
    ) -> None:
        """OrderCancelled, as orders sends it (`by` None: orders ended it itself)."""
        await self.deliver(
            OrderCancelled(
                order_id=booking.order_id,
                session_id=booking.session_id,
                mentor_id=booking.mentor_id,
                reason=reason,
                by=by,
            )
        )

    async def abandon_scheduling(self, booking: BookingRequested) -> None:
        """SchedulingAbandoned, as orders sends it on a final CalendarBookingFailed."""
        await self.deliver(
            SchedulingAbandoned(
                order_id=booking.order_id,
                session_id=booking.session_id,
                mentor_id=booking.mentor_id,
                reason=CalendarFailureReason.CALENDAR_API_ERROR,
                detail="Google answered 503 after every attempt",
            )
        )

    async def escrow(self, order_id: uuid.UUID) -> asyncpg.Record | None:
        return await self.db.fetchrow(
            f"SELECT * FROM {SCHEMA}.escrow_holds WHERE order_id = $1", order_id
        )

    async def payment_status(self, order_id: uuid.UUID) -> str | None:
        return await self.db.fetchval(
            f"SELECT status FROM {SCHEMA}.payments WHERE order_id = $1", order_id
        )

    async def audit(self, order_id: uuid.UUID) -> list[asyncpg.Record]:
        return await self.db.fetch(
            f"SELECT * FROM {SCHEMA}.admin_actions WHERE order_id = $1 ORDER BY id", order_id
        )

    async def admin(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        sub: str = "admin-1",
        role: Role = Role.ADMIN,
    ) -> httpx.Response:
        """Call a route as `sub` in `role` (an admin by default)."""
        token = issue_token(self.settings.auth_jwt_secret.get_secret_value(), sub, role)
        return await self.http.request(
            method, path, json=json, headers={"Authorization": f"Bearer {token}"}
        )

    async def webhook(self, ref: str | None) -> httpx.Response:
        params = {} if ref is None else {"payment_ref": ref}
        return await self.http.get("/api/payments/webhook", params=params)

    @property
    def webhook_url(self) -> str:
        return f"{self.url}/api/payments/webhook"


@dataclass(kw_only=True)
class Running(Payments):
    """The payments service on the real RabbitMQ: events come on its exchange, and a spy on
    that exchange sees what it publishes (the relay included)."""

    spy: Spy

    async def publish(self, event: Event, *, message_id: uuid.UUID | None = None) -> uuid.UUID:
        """Publish an event of orders' on the service's exchange; its message id."""
        message_id = message_id or uuid.uuid4()
        await publish_event(self.app, self.settings.events_exchange, event, message_id=message_id)
        return message_id

    def published(self, event_type: str, order_id: uuid.UUID | None = None) -> list[dict]:
        """Payloads of `event_type` seen on the exchange (about `order_id`, if given)."""
        return self.spy.payloads(event_type, order_id=order_id)

    async def one(self, event_type: str, order_id: uuid.UUID | None = None) -> dict:
        return await self.spy.one(event_type, order_id=order_id)


@dataclass(kw_only=True)
class InProcess(Payments):
    """The payments service's subscribers on FastStream's test broker (`on_test_broker`): no
    RabbitMQ, no relay. Events go in through `deliver`; what the service emits is read from its
    outbox, where each of its transactions records its events (publishing them is the relay's
    business, tested in libs/runtime on the real broker). The HTTP routes are served as usual,
    so Konnect's webhooks reach it."""

    async def publish(self, event: Event, *, message_id: uuid.UUID | None = None) -> uuid.UUID:
        return await deliver(self.app.state.runtime, event, message_id=message_id)

    async def recorded(self, event_type: str, order_id: uuid.UUID | None = None) -> list[dict]:
        """Payloads of the `event_type` events the service recorded (about `order_id`, if
        given), in the order it recorded them. Once a transaction has committed its events are
        all here: nothing is on its way, so no settling is needed before asserting none came."""
        rows = await self.db.fetch(
            f"SELECT body FROM {SCHEMA}.outbox WHERE event_type = $1 ORDER BY id", event_type
        )
        payloads = [json.loads(row["body"])["payload"] for row in rows]
        return [p for p in payloads if order_id is None or p.get("order_id") == str(order_id)]

    async def one(self, event_type: str, order_id: uuid.UUID | None = None) -> dict:
        await eventually(
            lambda: self.recorded(event_type, order_id), what=f"{event_type} for {order_id}"
        )
        found = await self.recorded(event_type, order_id)
        assert len(found) == 1, found
        return found[0]


def booking_requested(
    *,
    amount: int = 120_000,
    currency: str = "TND",
    end_at: datetime | None = None,
    title: str = "Career chat",
) -> BookingRequested:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
    return BookingRequested(
        order_id=uuid.uuid4(),
        session_id=uuid.uuid4(),
        mentor_id=uuid.uuid4(),
        offering=Offering(offering_id=uuid.uuid4(), title=title, duration_minutes=60),
        amount=amount,
        currency=currency,
        mentee=MenteeContact(
            first_name="Amira",
            last_name="Ben Salah",
            email="amira@example.com",
            phone="+216 20 123 456",
        ),
        start_at=start,
        end_at=end_at or start + timedelta(hours=1),
    )


def service_settings(make_settings: Callable[..., Any], sandbox: Sandbox, **overrides: Any):
    port = free_port()
    values: dict[str, Any] = {
        "konnect_api_url": sandbox.api_url,
        "public_base_url": f"http://127.0.0.1:{port}",
        "platform_fee_rate": Decimal("0.15"),
        "konnect_timeout_seconds": 2.0,
        "konnect_max_attempts": 3,
        "konnect_retry_base_seconds": 0.01,
        # The background loops stay asleep: tests sweep with run_once(now).
        "reconciliation_interval_seconds": 3600,
        "escrow_release_interval_seconds": 3600,
        "reconciliation_grace_seconds": 0,
        "initiation_grace_seconds": 0,
    }
    values.update(overrides)
    return port, make_settings(PaymentsSettings, **values)


@pytest.fixture
async def start_payments(
    make_settings: Callable[..., Any],
    sandbox: Sandbox,
    serve_service: Callable[..., Awaitable[Served]],
    db: asyncpg.Connection,
) -> Callable[..., Awaitable[Running]]:
    """`await start_payments(**settings)`: a running service on empty tables."""
    await empty_tables(db)

    async def start(**overrides: Any) -> Running:
        port, settings = service_settings(make_settings, sandbox, **overrides)
        served = await serve_service(create_app, settings, port)
        running = Running(
            app=served.app,
            url=served.url,
            settings=settings,
            http=served.http,
            db=db,
            spy=served.spy,
        )
        running.count_konnect_requests()
        return running

    return start


@contextlib.asynccontextmanager
async def served_in_process(settings: PaymentsSettings, port: int) -> AsyncIterator[FastAPI]:
    """The app `create_app(settings)` builds, its routes served on `port` and its subscribers on
    the test broker, its runtime never started: no RabbitMQ connection, no relay. What the
    lifespans would start that the tests need (the Konnect client) is opened here; the sweeper's
    loop stays off (tests sweep with run_once)."""
    app = create_app(settings)
    runtime = app.state.runtime
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off")
    )
    await app.state.konnect.open()
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        async with on_test_broker(runtime):
            yield app
    finally:
        server.should_exit = True
        async with asyncio.timeout(15):
            await task
        await app.state.konnect.aclose()
        await runtime.verifier.aclose()
        await runtime.db.engine.dispose()


class ConsumerTrouble(logging.Handler):
    """Keeps what the consumer logs at WARNING or above: a handler that failed (it retries or
    dead-letters the message, which on the test broker has nowhere to go)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
async def start_in_process(
    migrated: str, sandbox: Sandbox, db: asyncpg.Connection
) -> AsyncIterator[Callable[..., Awaitable[InProcess]]]:
    """`await start_in_process(**settings)`: the service on empty tables, its subscribers on the
    test broker (`InProcess`); at the test's end, no delivery failed or was dead-lettered."""
    await empty_tables(db)

    def settings_of(settings_type: type[PaymentsSettings], **values: Any) -> PaymentsSettings:
        # Names of its own, though nothing reaches a broker: the settings of make_settings,
        # without the broker its teardown cleans.
        tag = uuid.uuid4().hex[:8]
        names = {
            "events_exchange": f"test.{tag}.events",
            "admin_alerts_exchange": f"test.{tag}.alerts",
            "queue_prefix": f"test.{tag}.",
        }
        return settings_type.model_validate({"database_url": migrated, **names, **values})

    trouble = ConsumerTrouble()
    consumer_log = logging.getLogger("booking.runtime.consumer")
    consumer_log.addHandler(trouble)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(consumer_log.removeHandler, trouble)

        async def start(**overrides: Any) -> InProcess:
            port, settings = service_settings(settings_of, sandbox, **overrides)
            app = await stack.enter_async_context(served_in_process(settings, port))
            url = f"http://127.0.0.1:{port}"
            http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=url, trust_env=False, timeout=30)
            )
            running = InProcess(app=app, url=url, settings=settings, http=http, db=db)
            running.count_konnect_requests()
            return running

        yield start
        # No delivery failed: on the test broker a retry's delay queue has no consumer (the
        # message is not retried, only logged), and a dead letter is stored by the keeper in
        # dead_letters and reported (SystemErrorReported) in the outbox.
        assert trouble.messages == []
        assert await db.fetch(f"SELECT * FROM {SCHEMA}.dead_letters") == []
        reported = f"SELECT body FROM {SCHEMA}.outbox WHERE event_type = 'SystemErrorReported'"
        assert await db.fetch(reported) == []


@pytest.fixture
async def payments(start_in_process: Callable[..., Awaitable[InProcess]]) -> InProcess:
    """The service with its subscribers on the test broker, for the handler tests."""
    return await start_in_process()


@pytest.fixture
async def payments_service(start_payments: Callable[..., Awaitable[Running]]) -> Running:
    return await start_payments()


async def booked(running: Payments, **fields: Any) -> tuple[BookingRequested, str]:
    """A booking whose payment is open at Konnect: the event and the payment ref."""
    event = await running.request_booking(**fields)
    initiated = await running.initiated(event.order_id)
    return event, initiated["payment_ref"]


@pytest.fixture
def book() -> Callable[..., Awaitable[tuple[BookingRequested, str]]]:
    return booked


async def paid(running: Payments, sandbox: Sandbox, **fields: Any) -> BookingRequested:
    """A booking paid in full: its escrow is held."""
    event, ref = await booked(running, **fields)
    await sandbox.complete(ref)
    await running.one("PaymentCompleted", event.order_id)
    return event


@pytest.fixture
def pay() -> Callable[..., Awaitable[BookingRequested]]:
    return paid
