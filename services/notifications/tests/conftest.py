"""Two harnesses of the notifications service, on the real Postgres.

`notifications`: the service served over real HTTP on the real RabbitMQ. Each test gets its own
service (its own exchange and queues), a queue of its own on its admin alerts fanout, and ids of
its own. `handling`: the service's subscribers on FastStream's TestRabbitBroker, in process,
for the handler tests where a real broker is not the point; what it emits is read from its
outbox, as the relay (tested in libs/runtime on the real broker) would publish it.

The schema is migrated once per test session. The table is shared by the session, so a test
looks only at the notifications it raised: those above the highest id that existed when it
started (`baseline`), or those that occurred since it started.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from aio_pika.abc import AbstractIncomingMessage

from booking.contracts import Event, wrap
from booking.devtools.fixtures import Spy, deliver, eventually, on_test_broker, serving
from booking.notifications.app import create_app
from booking.notifications.domain import alert_for
from booking.notifications.settings import NotificationsSettings
from booking.notifications.tables import SCHEMA
from booking.runtime import metrics
from booking.runtime.auth import Role, issue_token
from booking.runtime.host import ServiceRuntime
from booking.runtime.migrations import upgrade

TABLE = f"{SCHEMA}.admin_notifications"


@pytest.fixture(scope="session")
async def migrated(database_url: str) -> str:
    settings = NotificationsSettings(database_url=database_url)
    # Alembic's env runs its own event loop: keep it off this one.
    await asyncio.to_thread(upgrade, settings, "booking.notifications", SCHEMA)
    return database_url


@dataclass
class Alerts:
    """Every message published on a test's admin alerts fanout, in the order the broker queued."""

    channel: aio_pika.abc.AbstractChannel
    exchange_name: str
    messages: list[AbstractIncomingMessage] = field(default_factory=list)

    def payloads(self, notification_id: int | None = None) -> list[dict[str, Any]]:
        found = []
        for message in self.messages:
            body = json.loads(message.body)
            assert body["type"] == "AdminNotificationRaised", body
            payload = body["payload"]
            if notification_id is None or payload["id"] == notification_id:
                found.append(payload)
        return found

    async def settle(self) -> None:
        """Wait until everything published before now has arrived (a sentinel comes after)."""
        sentinel = f"sentinel-{uuid.uuid4()}"
        exchange = await self.channel.get_exchange(self.exchange_name)
        await exchange.publish(aio_pika.Message(b"{}", message_id=sentinel), "")
        await eventually(
            lambda: any(m.message_id == sentinel for m in self.messages), what="the sentinel"
        )
        self.messages[:] = [m for m in self.messages if m.message_id != sentinel]


@dataclass
class Stored:
    """What a test's notifications service stored: its notifications and its inbox."""

    settings: NotificationsSettings
    runtime: ServiceRuntime
    conn: asyncpg.Connection
    baseline: int
    started_at: datetime

    async def handled(self, *message_ids: uuid.UUID) -> None:
        """Wait until the service has handled (committed) these messages."""

        async def all_in_inbox() -> bool:
            count = await self.conn.fetchval(
                f"SELECT count(*) FROM {SCHEMA}.inbox WHERE message_id = ANY($1::uuid[])",
                list(message_ids),
            )
            return count == len(set(message_ids))

        await eventually(all_in_inbox, what=f"handling of {message_ids}")

    async def latest_for(self, event: Event) -> dict[str, Any]:
        """The newest notification with the fingerprint of `event`."""
        found = await self.rows("fingerprint = $1", alert_for(event, self.started_at).fingerprint)
        assert found, f"no notification for {event}"
        return found[-1]

    async def rows(self, where: str = "true", *args: Any) -> list[dict[str, Any]]:
        """This test's notifications as stored, oldest first."""
        records = await self.conn.fetch(
            f"SELECT * FROM {TABLE} WHERE id > {self.baseline} AND ({where}) ORDER BY id", *args
        )
        rows = []
        for record in records:
            row = dict(record)
            row["metadata"] = json.loads(row["metadata"])
            rows.append(row)
        return rows

    def token(self, role: Role | str) -> dict[str, str]:
        secret = self.settings.auth_jwt_secret.get_secret_value()
        return {"Authorization": f"Bearer {issue_token(secret, f'{role}-1', role)}"}

    @property
    def admin(self) -> dict[str, str]:
        return self.token(Role.ADMIN)


@dataclass
class Notifications(Stored):
    """One running notifications service and the means to drive and watch it."""

    client: httpx.AsyncClient
    spy: Spy
    alerts: Alerts
    published: set[str] = field(default_factory=set)

    # --- callers ------------------------------------------------------------------------------

    async def get(self, path: str = "", **params: Any) -> httpx.Response:
        return await self.client.get(
            f"/api/admin/notifications{path}", params=params, headers=self.admin
        )

    async def page(self, **params: Any) -> dict[str, Any]:
        answer = await self.get(**params)
        assert answer.status_code == 200, answer.text
        return answer.json()

    async def mine(self, **params: Any) -> list[dict[str, Any]]:
        """The notifications this test raised that the list gives with `params`, newest first.

        Ours are the newest, so the pages that hold them come first; paging stops at the
        first notification older than the test.
        """
        found: list[dict[str, Any]] = []
        cursor = None
        while True:
            body = await self.page(limit=200, **params, **({"cursor": cursor} if cursor else {}))
            for item in body["items"]:
                if item["id"] <= self.baseline:
                    return found
                found.append(item)
            cursor = body["next_cursor"]
            if cursor is None:
                return found

    @staticmethod
    def problem(answer: httpx.Response, status: int) -> dict[str, Any]:
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")
        body = answer.json()
        assert body["status"] == status and body["detail"], body
        return body

    # --- events -------------------------------------------------------------------------------

    async def publish(
        self,
        event: Event,
        *,
        message_id: uuid.UUID | None = None,
        occurred_at: datetime | None = None,
        producer: str | None = None,
    ) -> uuid.UUID:
        """Publish `event` on the service's exchange as its producer would."""
        envelope = wrap(
            event,
            message_id=message_id or uuid.uuid4(),
            correlation_id="test",
            occurred_at=occurred_at,
            producer=producer,
        )
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
        self.published.add(str(envelope.message_id))
        return envelope.message_id

    def reported(self) -> list[AbstractIncomingMessage]:
        """The SystemErrorReported the service sent (not those the test published)."""
        return [
            m for m in self.spy.of_type("SystemErrorReported") if m.message_id not in self.published
        ]

    async def raise_(self, event: Event, **kwargs: Any) -> dict[str, Any]:
        """Publish `event`, wait for it to be handled: the notification it stored or counted."""
        await self.handled(await self.publish(event, **kwargs))
        return await self.latest_for(event)

    async def quiet(self) -> None:
        """Every alert recorded so far published and received."""
        await eventually(self.outbox_drained, what="the outbox relay")
        await self.alerts.settle()

    async def outbox_drained(self) -> bool:
        unsent = await self.conn.fetchval(
            f"SELECT count(*) FROM {SCHEMA}.outbox WHERE sent_at IS NULL"
        )
        return unsent == 0


@pytest.fixture
async def notifications(
    migrated: str,
    db: asyncpg.Connection,
    make_settings: Callable[..., NotificationsSettings],
    spy_on: Callable[..., Any],
) -> AsyncIterator[Notifications]:
    settings = make_settings(NotificationsSettings)
    spy = await spy_on(settings)  # declares the events exchange; deletes both at the end
    alerts = await watch_alerts(spy, settings)
    baseline = await notifications_baseline(db)
    app = create_app(settings)
    runtime: ServiceRuntime = app.state.runtime
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        await runtime.broker.wait_ready(timeout=15)
        harness = Notifications(
            settings=settings,
            runtime=runtime,
            conn=db,
            baseline=baseline,
            started_at=datetime.now(UTC),
            client=client,
            spy=spy,
            alerts=alerts,
        )
        yield harness
        # Leave no unsent row behind: the next test's relay would publish it to an exchange
        # that no longer exists.
        await eventually(harness.outbox_drained, what="the outbox relay at teardown")


async def watch_alerts(spy: Spy, settings: NotificationsSettings) -> Alerts:
    """A queue of the test's own on the admin alerts fanout, as a gateway replica binds one."""
    exchange = await spy.channel.declare_exchange(
        settings.admin_alerts_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    queue = await spy.channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange)
    alerts = Alerts(spy.channel, settings.admin_alerts_exchange)

    async def collect(message: AbstractIncomingMessage) -> None:
        alerts.messages.append(message)

    await queue.consume(collect, no_ack=True)
    return alerts


async def notifications_baseline(db: asyncpg.Connection) -> int:
    """The highest notification id so far, once every open notification is closed.

    No open notification is left from another test: an alert without a subject (unknown
    payment refs) would count up on that one instead of raising this test's own.
    """
    await db.execute(f"UPDATE {TABLE} SET is_open = false WHERE is_open")
    baseline: int = await db.fetchval(f"SELECT coalesce(max(id), 0) FROM {TABLE}")
    return baseline


# --- the subscribers on FastStream's TestRabbitBroker ------------------------------------------


@dataclass
class Handling(Stored):
    """The service's subscribers on FastStream's TestRabbitBroker and its routes, in process.

    No RabbitMQ: events go straight to the service's consumer, whose handler runs with the inbox
    in one transaction, as from its queue. What the service emits is what it recorded in its
    outbox in that transaction (the relay, which publishes it byte for byte, is not running).
    """

    client: httpx.AsyncClient
    outbox_baseline: int
    dead_letter_baseline: int

    async def deliver(
        self,
        event: Event,
        *,
        message_id: uuid.UUID | None = None,
        occurred_at: datetime | None = None,
        producer: str | None = None,
    ) -> uuid.UUID:
        """Hand `event` to the service's consumer as its queue would (a notification is dated
        by the envelope's occurred_at and may name its producer)."""
        return await deliver(
            self.runtime,
            event,
            message_id=message_id,
            correlation_id="test",
            occurred_at=occurred_at,
            producer=producer,
        )

    async def raise_(self, event: Event, **kwargs: Any) -> dict[str, Any]:
        """Deliver `event`, wait for it to be handled: the notification it stored or counted."""
        await self.handled(await self.deliver(event, **kwargs))
        return await self.latest_for(event)

    def duplicates(self, event_type: str) -> float:
        """How many deliveries of `event_type` the consumer found in its inbox already."""
        consumer = self.runtime.consumer
        assert consumer is not None
        return metrics.MESSAGES_HANDLED.labels(consumer.name, event_type, "duplicate")._value.get()

    async def recorded(self, where: str = "true", *args: Any) -> list[asyncpg.Record]:
        """The messages the service recorded in its outbox during this test, in order."""
        return await self.conn.fetch(
            f"SELECT * FROM {SCHEMA}.outbox WHERE id > {self.outbox_baseline} AND ({where}) "
            "ORDER BY id",
            *args,
        )

    async def alert_messages(self) -> list[asyncpg.Record]:
        """What the service recorded for the admin alerts fanout."""
        found = await self.recorded("exchange = $1", self.settings.admin_alerts_exchange)
        assert all(m["event_type"] == "AdminNotificationRaised" for m in found), found
        return found

    async def alerts(self, notification_id: int | None = None) -> list[dict[str, Any]]:
        """The payloads of the alerts recorded (about `notification_id`), in order."""
        payloads = [json.loads(m["body"])["payload"] for m in await self.alert_messages()]
        return [p for p in payloads if notification_id in (None, p["id"])]

    async def reported(self) -> list[dict[str, Any]]:
        """The SystemErrorReported the service recorded (its keeper reports each dead letter)."""
        found = await self.recorded("event_type = 'SystemErrorReported'")
        return [json.loads(m["body"])["payload"] for m in found]

    async def dead_letters(self) -> list[asyncpg.Record]:
        """The dead letters the service's keeper stored during this test."""
        return await self.conn.fetch(
            f"SELECT * FROM {SCHEMA}.dead_letters WHERE id > {self.dead_letter_baseline}"
        )


@pytest.fixture
async def handling(migrated: str, db: asyncpg.Connection) -> AsyncIterator[Handling]:
    """The service's subscribers on TestRabbitBroker: no RabbitMQ, no relay, nothing started."""
    # A consumer name of its own: the metrics it counts duplicates by are the process's.
    settings = NotificationsSettings(
        database_url=migrated, queue_prefix=f"test.{uuid.uuid4().hex[:8]}."
    )
    baseline = await notifications_baseline(db)
    outbox_baseline = await db.fetchval(f"SELECT coalesce(max(id), 0) FROM {SCHEMA}.outbox")
    dead_letter_baseline = await db.fetchval(
        f"SELECT coalesce(max(id), 0) FROM {SCHEMA}.dead_letters"
    )
    app = create_app(settings)
    runtime: ServiceRuntime = app.state.runtime
    assert runtime.db is not None
    transport = httpx.ASGITransport(app=app)
    try:
        async with (
            on_test_broker(runtime),
            httpx.AsyncClient(transport=transport, base_url="http://notifications") as client,
        ):
            yield Handling(
                settings=settings,
                runtime=runtime,
                conn=db,
                baseline=baseline,
                started_at=datetime.now(UTC),
                client=client,
                outbox_baseline=outbox_baseline,
                dead_letter_baseline=dead_letter_baseline,
            )
    finally:
        # Never to be sent: a later test's relay would publish them to an exchange of no test.
        await db.execute(f"DELETE FROM {SCHEMA}.outbox WHERE id > {outbox_baseline}")
        await runtime.verifier.aclose()
        await runtime.db.engine.dispose()
