"""The transactional outbox: events are rows written with the state change, published by a relay.

`record_event` adds the row inside the caller's transaction (and a NOTIFY that fires on commit),
so an event exists if and only if its state change committed. The relay claims unsent rows with
`FOR UPDATE SKIP LOCKED` (several replicas never claim the same row), publishes them with
publisher confirms, and stamps them sent in the same transaction. Delivery is at least once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import UTC, datetime

import asyncpg
from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from booking.contracts import Event, wrap
from booking.runtime import context, metrics
from booking.runtime.broker import Broker, OutgoingMessage
from booking.runtime.tables import MessagingTables

log = logging.getLogger(__name__)

_NOTIFIED = "booking.outbox.notified"


class Outbox:
    """Writes events into one schema's outbox. Knows nothing of the broker."""

    def __init__(self, tables: MessagingTables, producer: str, exchange: str) -> None:
        self.tables = tables
        self.producer = producer
        self.exchange = exchange
        # Built once: statement construction is a measurable share of a hot path.
        self._insert = insert(tables.outbox).on_conflict_do_nothing(
            index_elements=[tables.outbox.c.message_id]
        )
        self._notify = text("SELECT pg_notify(:channel, '')")

    async def record(
        self,
        session: AsyncSession,
        event: Event,
        *,
        message_id: uuid.UUID | None = None,
        exchange: str | None = None,
    ) -> uuid.UUID:
        """Add `event` to the outbox in the session's open transaction; returns its message id.

        A given `message_id` makes recording idempotent: the same id twice stores one row.
        """
        message_id = message_id or uuid.uuid4()
        envelope = wrap(
            event,
            message_id=message_id,
            correlation_id=context.current_correlation_id(),
            causation_id=context.causation_id.get(),
        )
        if event.producer == "runtime":  # reported by whichever service hit the error
            envelope = envelope.model_copy(update={"producer": self.producer})
        await session.execute(
            self._insert,
            {
                "message_id": message_id,
                "exchange": self.exchange if exchange is None else exchange,
                "routing_key": envelope.routing_key,
                "event_type": envelope.type,
                "correlation_id": envelope.correlation_id,
                "body": envelope.model_dump_json(),
            },
        )
        # One NOTIFY per transaction is enough; it reaches the relays' LISTEN on commit.
        transaction = id(session.sync_session.get_transaction())
        if session.info.get(_NOTIFIED) != transaction:
            await session.execute(self._notify, {"channel": self.tables.notify_channel})
            session.info[_NOTIFIED] = transaction
        return message_id


class OutboxRelay:
    """Publishes committed outbox rows. Safe to run in every replica at once."""

    def __init__(
        self,
        engine: AsyncEngine,
        tables: MessagingTables,
        broker: Broker,
        *,
        listen_dsn: str,
        batch_size: int = 200,
        poll_interval: float = 1.0,
    ) -> None:
        self.engine = engine
        self.tables = tables
        self.broker = broker
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self._listen_dsn = listen_dsn
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._relay_forever(), name="outbox-relay"),
            asyncio.create_task(self._listen_forever(), name="outbox-listen"),
        ]

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    async def relay_batch(self) -> int:
        """Claim, publish and stamp one batch; returns how many rows were published."""
        outbox = self.tables.outbox
        async with self.engine.begin() as conn:
            rows = (
                await conn.execute(
                    select(
                        outbox.c.id,
                        outbox.c.message_id,
                        outbox.c.exchange,
                        outbox.c.routing_key,
                        outbox.c.event_type,
                        outbox.c.correlation_id,
                        outbox.c.body,
                    )
                    .where(outbox.c.sent_at.is_(None))
                    .order_by(outbox.c.id)
                    .limit(self.batch_size)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not rows:
                return 0
            results = await asyncio.gather(
                *(
                    self.broker.publish(
                        OutgoingMessage(
                            body=row.body.encode(),
                            exchange=row.exchange,
                            routing_key=row.routing_key,
                            message_id=str(row.message_id),
                            correlation_id=row.correlation_id,
                            type=row.event_type,
                        )
                    )
                    for row in rows
                ),
                return_exceptions=True,
            )
            sent = [row.id for row, r in zip(rows, results, strict=True) if r is None]
            failed = [(row.id, r) for row, r in zip(rows, results, strict=True) if r is not None]
            now = datetime.now(UTC)
            if sent:
                await conn.execute(update(outbox).where(outbox.c.id.in_(sent)).values(sent_at=now))
            if failed:
                await conn.execute(
                    update(outbox)
                    .where(outbox.c.id.in_([i for i, _ in failed]))
                    .values(attempts=outbox.c.attempts + 1, last_error=str(failed[0][1])[:500])
                )
        metrics.OUTBOX_PUBLISHED.labels(self.tables.schema).inc(len(sent))
        if failed:
            raise failed[0][1]
        return len(sent)

    async def _relay_forever(self) -> None:
        backoff = 0.1
        while True:
            if not self.broker.is_connected:
                # The broker reports its own outage; the rows simply wait for it.
                await asyncio.sleep(0.1)
                continue
            # Cleared before the claim, so a commit that lands during it wakes the next round.
            self._wake.clear()
            try:
                published = await self.relay_batch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox relay paused %.1fs: %s", backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            if published == self.batch_size:
                continue  # more may be waiting: no pause
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def _listen_forever(self) -> None:
        """LISTEN for commits so the relay wakes at once instead of waiting for its next poll."""
        while not self._stopping:
            conn = None
            try:
                conn = await asyncpg.connect(self._listen_dsn, timeout=5)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(self.tables.notify_channel, lambda *_: self._wake.set())
                self._wake.set()  # catch up on anything committed while we were not listening
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("outbox listener reconnecting: %s", exc)
                await asyncio.sleep(1.0)
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)

    async def oldest_unsent_age(self) -> float:
        """Seconds since the oldest unsent event was committed (0 when none): the outbox lag."""
        outbox = self.tables.outbox
        async with self.engine.connect() as conn:
            oldest = await conn.scalar(
                select(func.min(outbox.c.created_at)).where(outbox.c.sent_at.is_(None))
            )
        if oldest is None:
            return 0.0
        return max(0.0, (datetime.now(UTC) - oldest).total_seconds())
