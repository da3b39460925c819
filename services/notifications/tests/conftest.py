"""The notifications service served over real HTTP, on the real Postgres and RabbitMQ.

The schema is migrated once per test session. Each test gets its own service (its own exchange
and queues), a queue of its own on its admin alerts fanout, and ids of its own. The table is
shared by the session, so a test looks only at the notifications it raised: those above the
highest id that existed when it started (`baseline`), or those that occurred since it started.
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
from booking.devtools.fixtures import Spy, eventually, serving
from booking.notifications.app import create_app
from booking.notifications.domain import alert_for
from booking.notifications.settings import NotificationsSettings
from booking.notifications.tables import SCHEMA
from booking.runtime.auth import Role, issue_token
from booking.runtime.migrations import upgrade
from booking.runtime.service import ServiceRuntime

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
class Notifications:
    """One running notifications service and the means to drive and watch it."""

    client: httpx.AsyncClient
    settings: NotificationsSettings
    runtime: ServiceRuntime
    spy: Spy
    alerts: Alerts
    conn: asyncpg.Connection
    baseline: int
    started_at: datetime
    published: set[str] = field(default_factory=set)

    # --- callers ------------------------------------------------------------------------------

    def token(self, role: Role | str) -> dict[str, str]:
        secret = self.settings.auth_jwt_secret.get_secret_value()
        return {"Authorization": f"Bearer {issue_token(secret, f'{role}-1', role)}"}

    @property
    def admin(self) -> dict[str, str]:
        return self.token(Role.ADMIN)

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

    async def handled(self, *message_ids: uuid.UUID) -> None:
        """Wait until the service has handled (committed) these messages."""

        async def all_in_inbox() -> bool:
            count = await self.conn.fetchval(
                f"SELECT count(*) FROM {SCHEMA}.inbox WHERE message_id = ANY($1::uuid[])",
                list(message_ids),
            )
            return count == len(set(message_ids))

        await eventually(all_in_inbox, what=f"handling of {message_ids}")

    async def raise_(self, event: Event, **kwargs: Any) -> dict[str, Any]:
        """Publish `event`, wait for it to be handled: the notification it stored or counted."""
        await self.handled(await self.publish(event, **kwargs))
        return await self.latest_for(event)

    async def latest_for(self, event: Event) -> dict[str, Any]:
        """The newest notification with the fingerprint of `event`."""
        found = await self.rows("fingerprint = $1", alert_for(event, self.started_at).fingerprint)
        assert found, f"no notification for {event}"
        return found[-1]

    async def quiet(self) -> None:
        """Every alert recorded so far published and received."""
        await eventually(self.outbox_drained, what="the outbox relay")
        await self.alerts.settle()

    async def outbox_drained(self) -> bool:
        unsent = await self.conn.fetchval(
            f"SELECT count(*) FROM {SCHEMA}.outbox WHERE sent_at IS NULL"
        )
        return unsent == 0

    # --- the database -------------------------------------------------------------------------

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
    # No open notification is left from another test: an alert without a subject (unknown
    # payment refs) would count up on that one instead of raising this test's own.
    await db.execute(f"UPDATE {TABLE} SET is_open = false WHERE is_open")
    baseline = await db.fetchval(f"SELECT coalesce(max(id), 0) FROM {TABLE}")
    app = create_app(settings)
    runtime: ServiceRuntime = app.state.runtime
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        await runtime.broker.wait_ready(timeout=15)
        harness = Notifications(
            client, settings, runtime, spy, alerts, db, baseline, datetime.now(UTC)
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
