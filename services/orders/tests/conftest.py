"""The orders service under test, two ways, on the real Postgres.

`orders`: served over real HTTP on the real RabbitMQ, with a spy on its exchange.
`orders_in_process`: its app called in process and its subscribers on FastStream's
TestRabbitBroker, for the handler tests where the broker is not the point; what it emits is read
from its outbox.

The schema is migrated once per test session; each test gets its own service (its own exchange
and queues) and ids of its own, so tests never see each other's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from booking.contracts import (
    CalendarBookingConfirmed,
    CalendarBookingFailed,
    CalendarFailureReason,
    EscrowFrozen,
    EscrowRefundDue,
    EscrowRefunded,
    EscrowReleased,
    EscrowUnfrozen,
    Event,
    PaymentCompleted,
    PaymentFailed,
    PaymentFailureReason,
    PaymentInitiated,
    wrap,
)
from booking.devtools.fixtures import (
    TEST_PREFIX,
    Spy,
    deliver,
    eventually,
    on_test_broker,
    serving,
)
from booking.orders.app import create_app
from booking.orders.settings import OrdersSettings
from booking.orders.sweeper import Sweeper
from booking.orders.tables import SCHEMA
from booking.runtime.auth import Role, issue_token
from booking.runtime.host import ServiceRuntime
from booking.runtime.migrations import upgrade

PRICE = 120_000  # 120 TND in millimes
FEE = 18_000  # 15 %
ESCROW = PRICE - FEE


@pytest.fixture(scope="session")
async def migrated(database_url: str) -> str:
    settings = OrdersSettings.model_validate({"database_url": database_url})
    # Alembic's env runs its own event loop: keep it off this one.
    await asyncio.to_thread(upgrade, settings, "booking.orders", SCHEMA)
    return database_url


def future(days: int = 30, hour: int = 9, minute: int = 0) -> datetime:
    """A start that is safely in the future, on a whole minute, unique enough per call site."""
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day + timedelta(days=days, hours=hour, minutes=minute)


@dataclass
class Orders:
    """One orders service and the means to drive and watch it.

    How events reach it and how what it emits is seen is the subclasses' business: on RabbitMQ
    (`OrdersOnRabbitMQ`) or in process (`OrdersInProcess`).
    """

    client: httpx.AsyncClient
    settings: OrdersSettings
    runtime: ServiceRuntime
    engine: AsyncEngine
    sweeper: Sweeper

    PRICE = PRICE
    FEE = FEE
    ESCROW = ESCROW
    future = staticmethod(future)

    @staticmethod
    def problem(answer: httpx.Response, status: int) -> dict[str, Any]:
        """The problem+json body of `answer`, which must have `status`."""
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")
        body = answer.json()
        assert body["status"] == status and body["detail"], body
        return body

    # --- callers ------------------------------------------------------------------------------

    def token(self, role: Role | str, sub: str | None = None) -> dict[str, str]:
        secret = self.settings.auth_jwt_secret.get_secret_value()
        token = issue_token(secret, sub or f"{role}-{uuid.uuid4().hex[:8]}", role)
        return {"Authorization": f"Bearer {token}"}

    @property
    def admin(self) -> dict[str, str]:
        return self.token(Role.ADMIN, "admin-1")

    def mentee(self, sub: str | None = None) -> dict[str, str]:
        return self.token(Role.MENTEE, sub)

    # --- the HTTP API -------------------------------------------------------------------------

    async def add_mentor(self, name: str = "Amel Ben Salah") -> dict[str, Any]:
        answer = await self.client.post(
            "/api/mentors",
            json={
                "name": name,
                "email": f"amel.{uuid.uuid4().hex[:8]}@example.com",
                "timezone": "Africa/Tunis",
            },
            headers=self.admin,
        )
        assert answer.status_code == 201, answer.text
        return answer.json()

    async def add_offering(
        self, mentor_id: str, *, duration: int = 60, price: int = PRICE
    ) -> dict[str, Any]:
        answer = await self.client.post(
            f"/api/mentors/{mentor_id}/offerings",
            json={
                "title": "Career chat",
                "duration_minutes": duration,
                "price": {"amount": price, "currency": "TND"},
            },
            headers=self.admin,
        )
        assert answer.status_code == 201, answer.text
        return answer.json()

    async def new_offering(self, **kwargs: Any) -> dict[str, Any]:
        mentor = await self.add_mentor()
        return await self.add_offering(mentor["id"], **kwargs)

    def booking(self, offering_id: str, start_at: datetime, **changes: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "offering_id": offering_id,
            "start_at": start_at.isoformat().replace("+00:00", "Z"),
            "mentee": {
                "first_name": "Sami",
                "last_name": "Trabelsi",
                "email": "sami@example.com",
                "phone": "+216 20 123 456",
            },
        }
        body.update(changes)
        return body

    async def book(
        self,
        offering_id: str,
        start_at: datetime,
        *,
        headers: dict[str, str] | None = None,
        key: str | None = None,
        **changes: Any,
    ) -> httpx.Response:
        headers = dict(self.mentee() if headers is None else headers)
        if key is not None:
            headers["Idempotency-Key"] = key
        return await self.client.post(
            "/api/bookings", json=self.booking(offering_id, start_at, **changes), headers=headers
        )

    async def booked(self, start_at: datetime | None = None) -> Booked:
        """A fresh mentor and offering, and a booking accepted for them."""
        offering = await self.new_offering()
        mentee = self.mentee()
        answer = await self.book(offering["id"], start_at or future(), headers=mentee)
        assert answer.status_code == 202, answer.text
        return self.booked_from(answer.json(), offering, mentee)

    async def pay(self, booked: Booked, ref: str = "5f0c1e2d3a4b5c6d7e8f9a0b") -> None:
        """The booking's payment opened and completed in full: paid, awaiting the calendar."""
        await self.handled(await self.publish(booked.initiated(ref)))
        await self.handled(await self.publish(booked.completed(ref)))

    def booked_from(
        self,
        accepted: dict[str, Any],
        offering: dict[str, Any],
        mentee: dict[str, str] | None = None,
    ) -> Booked:
        return Booked(
            order_id=accepted["order_id"],
            session_id=accepted["session_id"],
            mentor_id=offering["mentor_id"],
            offering_id=offering["id"],
            mentee=mentee or self.admin,
        )

    async def order(self, booked: Booked) -> dict[str, Any]:
        answer = await self.client.get(f"/api/orders/{booked.order_id}", headers=booked.mentee)
        assert answer.status_code == 200, answer.text
        return answer.json()

    # --- events -------------------------------------------------------------------------------

    async def publish(self, event: Event, *, message_id: uuid.UUID | None = None) -> uuid.UUID:
        """Hand `event` to the service as its producer's message would reach it; its id."""
        raise NotImplementedError

    async def quiet(self, *message_ids: uuid.UUID) -> None:
        """These messages handled, and every event they caused visible to `events`."""
        raise NotImplementedError

    def emitted(self, type_: str) -> list[dict[str, Any]]:
        """Payloads of the `type_` events the service has emitted, as far as `quiet` saw."""
        raise NotImplementedError

    async def handled(self, *message_ids: uuid.UUID) -> None:
        """Wait until the service has handled (committed) these messages."""

        async def all_in_inbox() -> bool:
            async with self.engine.connect() as conn:
                count = await conn.scalar(
                    text(f"SELECT count(*) FROM {SCHEMA}.inbox WHERE message_id = ANY(:ids)"),
                    {"ids": list(message_ids)},
                )
            return count == len(set(message_ids))

        await eventually(all_in_inbox, what=f"handling of {message_ids}")

    async def consumed(self, type_: str, outcome: str) -> float:
        """How many `type_` messages the service's consumer counted with `outcome` (/metrics)."""
        return (await self.consumer_counts()).get((type_, outcome), 0.0)

    async def consumer_counts(self) -> dict[tuple[str, str], float]:
        """Every (type, outcome) count of the service's consumer (/metrics)."""
        answer = await self.client.get("/metrics")
        consumer = f"{self.settings.queue_prefix}orders"
        counts: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(answer.text):
            for sample in family.samples:
                labels = sample.labels
                if (
                    sample.name == "booking_messages_handled_total"
                    and labels.get("consumer") == consumer
                ):
                    counts[labels["type"], labels["outcome"]] = sample.value
        return counts

    async def outbox_drained(self) -> bool:
        async with self.engine.connect() as conn:
            unsent = await conn.scalar(
                text(f"SELECT count(*) FROM {SCHEMA}.outbox WHERE sent_at IS NULL")
            )
        return unsent == 0

    def events(self, type_: str, **payload: Any) -> list[dict[str, Any]]:
        """Payloads of the emitted events of `type_` whose fields match `payload`."""
        return [
            body
            for body in self.emitted(type_)
            if all(str(body.get(k)) == str(v) for k, v in payload.items())
        ]

    async def wait_for_event(self, type_: str, **payload: Any) -> dict[str, Any]:
        found = await eventually(lambda: self.events(type_, **payload), what=f"a {type_}")
        return found[0]

    # --- the database -------------------------------------------------------------------------

    async def scalar(self, sql: str, **params: Any) -> Any:
        async with self.engine.connect() as conn:
            return await conn.scalar(text(sql), params)

    async def stored(self, offering: dict[str, Any], mentee_sub: str = "") -> dict[str, int]:
        """What exists for an offering: orders, its mentor's sessions, events, the mentee's keys."""
        params = {
            "offering": offering["id"],
            "mentor": offering["mentor_id"],
            "like": f"%{offering['id']}%",
            "mentee": mentee_sub,
        }
        queries = {
            "orders": f"SELECT count(*) FROM {SCHEMA}.orders WHERE offering_id = :offering",
            "sessions": f"SELECT count(*) FROM {SCHEMA}.booked_sessions WHERE mentor_id = :mentor",
            "events": f"SELECT count(*) FROM {SCHEMA}.outbox WHERE body LIKE :like",
            "keys": f"SELECT count(*) FROM {SCHEMA}.idempotency_keys WHERE mentee_id = :mentee",
        }
        async with self.engine.connect() as conn:
            return {name: await conn.scalar(text(sql), params) for name, sql in queries.items()}

    async def audit_rows(self, order_id: str) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                text(f"SELECT * FROM {SCHEMA}.admin_actions WHERE order_id = :id ORDER BY id"),
                {"id": order_id},
            )
            return [dict(row._mapping) for row in rows]

    async def outbox_count(self, event_type: str, order_id: str) -> int:
        """How many `event_type` events about the order the outbox holds (sent or not)."""
        return await self.scalar(
            f"SELECT count(*) FROM {SCHEMA}.outbox WHERE event_type = :type AND body LIKE :like",
            type=event_type,
            like=f"%{order_id}%",
        )

    async def backdate(self, order_id: str, minutes: float) -> None:
        """Make the order look booked `minutes` ago."""
        await self.execute(
            f"UPDATE {SCHEMA}.orders SET created_at = now() - make_interval(mins => :m) "
            "WHERE id = :id",
            m=minutes,
            id=order_id,
        )

    async def execute(self, sql: str, **params: Any) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(text(sql), params)

    async def order_status(self, order_id: str) -> tuple[str, str]:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        f"SELECT o.status, s.status FROM {SCHEMA}.orders o "
                        f"JOIN {SCHEMA}.booked_sessions s ON s.order_id = o.id WHERE o.id = :id"
                    ),
                    {"id": order_id},
                )
            ).one()
        return row[0], row[1]

    async def wait_for_status(self, order_id: str, order: str, session: str) -> None:
        async def reached() -> bool:
            return await self.order_status(order_id) == (order, session)

        await eventually(reached, what=f"order {order_id} {order}, session {session}")


@dataclass
class Booked:
    order_id: str
    session_id: str
    mentor_id: str
    offering_id: str
    mentee: dict[str, str]

    def initiated(self, ref: str = "5f0c1e2d3a4b5c6d7e8f9a0b") -> PaymentInitiated:
        return PaymentInitiated(
            order_id=uuid.UUID(self.order_id),
            payment_ref=ref,
            pay_url=f"https://pay.example/pay?payment_ref={ref}",
            expires_at=datetime.now(UTC) + timedelta(minutes=30),
        )

    def completed(
        self, ref: str = "5f0c1e2d3a4b5c6d7e8f9a0b", *, paid: int = PRICE, fee: int = FEE
    ) -> PaymentCompleted:
        return PaymentCompleted(
            order_id=uuid.UUID(self.order_id),
            payment_ref=ref,
            amount=PRICE,
            amount_paid=paid,
            platform_fee=fee,
            escrow_amount=paid - fee,
            currency="TND",
            paid_at=datetime.now(UTC),
        )

    def failed(
        self, ref: str = "5f0c1e2d3a4b5c6d7e8f9a0b", reason: str = "expired"
    ) -> PaymentFailed:
        return PaymentFailed(
            order_id=uuid.UUID(self.order_id), payment_ref=ref, reason=PaymentFailureReason(reason)
        )

    def confirmed(self, event_id: str = "a1b2c3d4e5f6") -> CalendarBookingConfirmed:
        return CalendarBookingConfirmed(
            session_id=uuid.UUID(self.session_id),
            order_id=uuid.UUID(self.order_id),
            event_id=event_id,
            meet_link="https://meet.google.com/abc-defg-hij",
            html_link=f"https://calendar.google.com/event?eid={event_id}",
        )

    def calendar_failed(
        self,
        *,
        final: bool,
        reason: str = "calendar_api_error",
        attempts: int = 1,
        detail: str = "Google answered 503",
    ) -> CalendarBookingFailed:
        return CalendarBookingFailed(
            session_id=uuid.UUID(self.session_id),
            order_id=uuid.UUID(self.order_id),
            mentor_id=uuid.UUID(self.mentor_id),
            reason=CalendarFailureReason(reason),
            detail=detail,
            attempts=attempts,
            final=final,
            next_attempt_at=None if final else datetime.now(UTC) + timedelta(minutes=5),
        )

    def escrow(
        self,
        status: str,
        sequence: int,
        *,
        escrow_amount: int = ESCROW,
        refund_amount: int = PRICE,
    ) -> Event:
        """The Escrow* event payments sends when the escrow moves to `status`."""
        common: dict[str, Any] = {
            "order_id": self.order_id,
            "mentor_id": self.mentor_id,
            "escrow_amount": escrow_amount,
            "currency": "TND",
            "sequence": sequence,
        }
        now = datetime.now(UTC)
        if status == "frozen":
            return EscrowFrozen(**common, reason="scheduling_abandoned")
        if status == "held":
            return EscrowUnfrozen(**common, reason="scheduled", release_due_at=now)
        if status == "refund_due":
            return EscrowRefundDue(**common, refund_amount=refund_amount, reason="refund")
        if status == "refunded":
            return EscrowRefunded(
                **common,
                refund_amount=refund_amount,
                reason="refund paid",
                by="admin-1",
                reference="bank-transfer-42",
            )
        if status == "released":
            return EscrowReleased(**common, released_at=now)
        raise ValueError(status)


@dataclass
class OrdersOnRabbitMQ(Orders):
    """The service on the real RabbitMQ: events published on its exchange, a spy on it."""

    spy: Spy

    async def publish(self, event: Event, *, message_id: uuid.UUID | None = None) -> uuid.UUID:
        """Publish `event` on the service's exchange as its producer would."""
        envelope = wrap(event, message_id=message_id or uuid.uuid4(), correlation_id="test")
        exchange = await self.spy.channel.get_exchange(self.settings.events_exchange)
        await exchange.publish(
            aio_pika.Message(
                envelope.model_dump_json().encode(),
                message_id=str(envelope.message_id),
                type=envelope.type,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            envelope.routing_key,
        )
        return envelope.message_id

    async def quiet(self, *message_ids: uuid.UUID) -> None:
        """These messages handled, every event they caused published and seen by the spy."""
        await self.handled(*message_ids)
        await eventually(self.outbox_drained, what="the outbox relay")
        await self.spy.settle()

    def emitted(self, type_: str) -> list[dict[str, Any]]:
        return [_payload(message.body) for message in self.spy.of_type(type_)]


@dataclass
class OrdersInProcess(Orders):
    """The service in process: no RabbitMQ, no relay.

    Events reach its consumer through `deliver` (FastStream's TestRabbitBroker); what it emits is
    what it recorded in its outbox, in the handler's (or the request's) transaction. Publishing
    those rows is the relay's business, tested in libs/runtime on the real broker.
    """

    recorded: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def publish(self, event: Event, *, message_id: uuid.UUID | None = None) -> uuid.UUID:
        """Deliver `event` to the service's consumer as its queue would."""
        return await deliver(self.runtime, event, message_id=message_id, correlation_id="test")

    async def quiet(self, *message_ids: uuid.UUID) -> None:
        """These messages handled; every event the service recorded so far read from its outbox."""
        await self.handled(*message_ids)
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                text(
                    f"SELECT event_type, body FROM {SCHEMA}.outbox "
                    "WHERE exchange IN (:events, :changes) ORDER BY id"
                ),
                {
                    "events": self.settings.events_exchange,
                    "changes": self.settings.order_changes_exchange,
                },
            )
            self.recorded = [(row.event_type, _payload(row.body)) for row in rows]

    def emitted(self, type_: str) -> list[dict[str, Any]]:
        return [payload for event_type, payload in self.recorded if event_type == type_]

    async def dead_letters(self) -> int:
        """How many dead letters the service's keeper stored for its consumer."""
        return await self.scalar(
            f"SELECT count(*) FROM {SCHEMA}.dead_letters WHERE consumer = :consumer",
            consumer=f"{self.settings.queue_prefix}orders",
        )


def _payload(body: bytes | str) -> dict[str, Any]:
    return json.loads(body)["payload"]


@pytest.fixture
async def serve_orders(
    migrated: str,
    make_settings: Callable[..., OrdersSettings],
    spy_on: Callable[..., Any],
) -> Callable[..., contextlib.AbstractAsyncContextManager[OrdersOnRabbitMQ]]:
    """`async with serve_orders(**settings) as orders`: a service with settings of its own."""

    @contextlib.asynccontextmanager
    async def serve(**overrides: Any) -> AsyncIterator[OrdersOnRabbitMQ]:
        settings = make_settings(OrdersSettings, **overrides)
        spy = await spy_on(settings)  # before the service starts: it misses nothing
        app = create_app(settings)
        runtime: ServiceRuntime = app.state.runtime
        assert runtime.db is not None
        async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            await runtime.broker.wait_ready(timeout=15)
            harness = OrdersOnRabbitMQ(
                client, settings, runtime, runtime.db.engine, app.state.sweeper, spy=spy
            )
            yield harness
            # Leave no unsent row behind: the next test's relay would publish it to an exchange
            # that no longer exists.
            await eventually(harness.outbox_drained, what="the outbox relay at teardown")

    return serve


@pytest.fixture
async def orders(
    serve_orders: Callable[..., contextlib.AbstractAsyncContextManager[OrdersOnRabbitMQ]],
) -> AsyncIterator[OrdersOnRabbitMQ]:
    async with serve_orders() as harness:
        yield harness


@pytest.fixture
async def orders_in_process(migrated: str) -> AsyncIterator[OrdersInProcess]:
    """The service in process, its subscribers on FastStream's TestRabbitBroker: no RabbitMQ.

    Its app is called through ASGI without its lifespan, so the runtime never starts: no broker
    connection, no relay, no sweeper. Its names are unique to the test all the same: the outbox
    rows it records carry its own exchange's name.
    """
    tag = uuid.uuid4().hex[:8]
    settings = OrdersSettings.model_validate(
        {
            "database_url": migrated,
            "events_exchange": f"{TEST_PREFIX}{tag}.events",
            "admin_alerts_exchange": f"{TEST_PREFIX}{tag}.alerts",
            "order_changes_exchange": f"{TEST_PREFIX}{tag}.order-changes",
            "queue_prefix": f"{TEST_PREFIX}{tag}.",
            # The test broker has no delay queues to retry through: a handler that fails is
            # dead-lettered at once, so the keeper stores it and the test sees it.
            "consumer_max_attempts": 1,
        }
    )
    app = create_app(settings)
    runtime: ServiceRuntime = app.state.runtime
    assert runtime.db is not None
    transport = httpx.ASGITransport(app=app)
    try:
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://orders.test") as client,
            on_test_broker(runtime),
        ):
            yield OrdersInProcess(client, settings, runtime, runtime.db.engine, app.state.sweeper)
    finally:
        # No relay sends what it recorded: marked sent, else a later test's relay (on the real
        # broker, same database) would try them, to an exchange that never existed.
        async with runtime.db.engine.begin() as conn:
            await conn.execute(
                text(
                    f"UPDATE {SCHEMA}.outbox SET sent_at = now() "
                    "WHERE exchange IN (:events, :changes) AND sent_at IS NULL"
                ),
                {"events": settings.events_exchange, "changes": settings.order_changes_exchange},
            )
        await runtime.verifier.aclose()
        await runtime.db.engine.dispose()
