"""The idempotent consumer: inbox + handler in one transaction, bounded retries, dead letters.

Each delivery runs its handler in a transaction that also inserts `(message_id, consumer)` into
the inbox; the primary key turns a redelivery into a no-op. The message is acked only after that
commit. Under load, deliveries that are already waiting share one transaction (a commit is the
dearest part of handling a message); if any of them fails, each is handled again on its own.

A failing handler's message goes to a delay queue (growing delay) and comes back, a bounded
number of times; then it is dead-lettered and a SystemErrorReported is raised. A body that
cannot be parsed, or an event version this code does not know, is dead-lettered at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from booking.contracts import (
    Envelope,
    Event,
    MalformedMessage,
    SystemErrorReported,
    UnknownEvent,
    decode,
    parse_envelope,
    wrap,
)
from booking.runtime import metrics
from booking.runtime.broker import Broker, ConsumerQueues, OutgoingMessage
from booking.runtime.context import correlated
from booking.runtime.db import Database
from booking.runtime.outbox import Outbox
from booking.runtime.tables import MessagingTables

log = logging.getLogger(__name__)

# Deterministic ids for the SystemErrorReported of a dead letter: reporting twice stores once.
_DEAD_LETTER_NAMESPACE = uuid.UUID("4f7c8f0e-6d0b-4a3e-9a51-8b1f5d0d2c11")


@dataclass
class MessageContext:
    """What a handler gets besides its event: the open transaction and a way to record events."""

    session: AsyncSession
    envelope: Envelope
    outbox: Outbox
    after_commit: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def record(
        self, event: Event, *, message_id: uuid.UUID | None = None, exchange: str | None = None
    ) -> uuid.UUID:
        return await self.outbox.record(
            self.session, event, message_id=message_id, exchange=exchange
        )

    def call_after_commit(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run `step` once this message's transaction has committed and it is acked.

        For a call to an outside system, which must never run inside an open transaction: the
        handler records the intent, and `step` makes the call and records the result in a
        transaction of its own. A crash before `step` ends leaves the intent for a sweeper to
        finish, so `step` is a fast path, never the only path. It is dropped if the commit fails.
        """
        self.after_commit.append(step)


Handler = Callable[[Any, MessageContext], Awaitable[None]]


class Consumer:
    def __init__(
        self,
        *,
        name: str,
        db: Database,
        tables: MessagingTables,
        outbox: Outbox,
        broker: Broker,
        handlers: Mapping[type[Event], Handler],
        max_attempts: int,
        retry_base_delay_ms: int,
        prefetch: int,
        concurrency: int = 8,
        max_batch: int = 32,
    ) -> None:
        self.name = name
        self.db = db
        self.tables = tables
        self.outbox = outbox
        self.broker = broker
        self.handlers = dict(handlers)
        self.queues = ConsumerQueues.named(name, max_attempts, retry_base_delay_ms)
        self.prefetch = prefetch
        self.concurrency = concurrency
        self.max_batch = max_batch
        self.queue: AbstractQueue | None = None
        self._channel: AbstractRobustChannel | None = None
        self._deliveries: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._workers: list[asyncio.Task] = []
        self._after_commit: set[asyncio.Task] = set()
        # Executed with a list of rows: one multi-row INSERT, compiled once and cached.
        self._record_in_inbox = (
            insert(tables.inbox).on_conflict_do_nothing().returning(tables.inbox.c.message_id)
        )

    @property
    def routing_keys(self) -> list[str]:
        return sorted({t.binding_key() for t in self.handlers})

    async def attach(self, connection: AbstractRobustConnection) -> None:
        """Declare the topology and start consuming (aio-pika re-attaches after reconnects)."""
        if not self._workers:
            self._workers = [
                asyncio.create_task(self._work(), name=f"consumer-{self.name}-{i}")
                for i in range(self.concurrency)
            ]
        self._channel = await connection.channel(publisher_confirms=True)
        await self._channel.set_qos(prefetch_count=self.prefetch)
        self.queue = await self.broker.declare_consumer(
            self._channel, self.queues, self.routing_keys
        )
        await self.queue.consume(self.on_message)
        log.info("consuming %s (%s)", self.queues.main, ", ".join(self.routing_keys))

    async def stop(self) -> None:
        for task in [*self._workers, *self._after_commit]:
            task.cancel()
        await asyncio.gather(*self._workers, *self._after_commit, return_exceptions=True)
        self._workers = []

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        # Bounded by the prefetch count: the broker sends no more than that unacked.
        self._deliveries.put_nowait(message)

    async def _work(self) -> None:
        """Take what has arrived (up to max_batch) and handle it; batches form only under load."""
        while True:
            batch = [await self._deliveries.get()]
            while len(batch) < self.max_batch and not self._deliveries.empty():
                batch.append(self._deliveries.get_nowait())
            try:
                await self.handle(batch)
            except Exception:
                # Unacked messages come back from the broker; never let a worker die.
                log.exception("consumer %s failed on a batch of %d", self.name, len(batch))

    async def handle(self, messages: list[AbstractIncomingMessage]) -> None:
        """Handle deliveries: readable ones in one transaction, each at most once."""
        started = time.perf_counter()
        work: list[tuple[AbstractIncomingMessage, Envelope, Event, Handler]] = []
        for message in messages:
            try:
                envelope = parse_envelope(message.body)
                event = decode(envelope)
            except (MalformedMessage, UnknownEvent) as exc:
                log.error(
                    "dead-lettering unreadable message %s on %s: %s",
                    message.message_id,
                    self.name,
                    exc,
                )
                await self._dead_letter(message, None, reason="unreadable", error=str(exc))
                continue
            handler = self.handlers.get(type(event))
            if handler is None:
                # A valid event this consumer is not subscribed to: nothing to do.
                log.warning("no handler for %s on %s; acked", envelope.type, self.name)
                await message.ack()
                continue
            work.append((message, envelope, event, handler))
        if not work:
            return
        try:
            outcomes, after_commit = await self._handle_once(work)
        except Exception as exc:
            if len(work) > 1:
                # One of them failed and took the others' transaction with it: handle each
                # alone, so only the failing one takes the retry path.
                for message, *_ in work:
                    await self.handle([message])
                return
            message, envelope, *_ = work[0]
            with correlated(envelope.correlation_id, str(envelope.message_id)):
                await self._retry_or_dead_letter(message, envelope, exc)
            return
        for (message, envelope, *_), outcome in zip(work, outcomes, strict=True):
            await message.ack()  # only now: the effects and the inbox record are committed
            metrics.MESSAGES_HANDLED.labels(self.name, envelope.type, outcome).inc()
        metrics.HANDLER_LATENCY.labels(self.name).observe(time.perf_counter() - started)
        for step, envelope in after_commit:
            self._run_after_commit(step, envelope)

    def _run_after_commit(self, step: Callable[[], Awaitable[None]], envelope: Envelope) -> None:
        async def run() -> None:
            with correlated(envelope.correlation_id, str(envelope.message_id)):
                try:
                    await step()
                except Exception:
                    # The intent is committed; the service's sweeper finishes what this left.
                    log.exception("after-commit step of %s %s failed", envelope.type, self.name)

        task = asyncio.create_task(run())
        self._after_commit.add(task)
        task.add_done_callback(self._after_commit.discard)

    async def _handle_once(
        self, work: list[tuple[AbstractIncomingMessage, Envelope, Event, Handler]]
    ) -> tuple[list[str], list[tuple[Callable[[], Awaitable[None]], Envelope]]]:
        outcomes = []
        after_commit = []
        async with self.db.transaction() as session:
            # One statement records the whole batch in the inbox; what it returns is new.
            first_seen = set(
                (
                    await session.execute(
                        self._record_in_inbox,
                        [
                            {
                                "message_id": envelope.message_id,
                                "consumer": self.name,
                                "event_type": envelope.type,
                            }
                            for _, envelope, _, _ in work
                        ],
                    )
                ).scalars()
            )
            for _, envelope, event, handler in work:
                if envelope.message_id not in first_seen:
                    outcomes.append("duplicate")
                    continue
                first_seen.discard(envelope.message_id)  # the same message twice in one batch
                context = MessageContext(session, envelope, self.outbox)
                with correlated(envelope.correlation_id, str(envelope.message_id)):
                    await handler(event, context)
                after_commit.extend((step, envelope) for step in context.after_commit)
                outcomes.append("handled")
        return outcomes, after_commit

    async def _retry_or_dead_letter(
        self, message: AbstractIncomingMessage, envelope: Envelope, exc: Exception
    ) -> None:
        attempt = int((message.headers or {}).get("x-attempt", 0)) + 1
        error = f"{type(exc).__name__}: {exc}"
        if attempt >= self.queues.max_attempts:
            log.error(
                "dead-lettering %s %s after %d attempts: %s",
                envelope.type,
                envelope.message_id,
                attempt,
                error,
                exc_info=exc,
            )
            trace = "".join(traceback.format_exception(exc))
            await self._dead_letter(message, envelope, reason="retries_exhausted", error=trace)
            return
        log.warning(
            "%s %s failed (attempt %d of %d), retrying: %s",
            envelope.type,
            envelope.message_id,
            attempt,
            self.queues.max_attempts,
            error,
        )
        await self._forward(
            message,
            self.queues.retry(attempt),
            {"x-attempt": attempt, "x-last-error": error[:1000]},
        )
        await message.ack()  # only now: the copy in the delay queue is confirmed
        metrics.MESSAGES_HANDLED.labels(self.name, envelope.type, "retried").inc()

    async def _dead_letter(
        self,
        message: AbstractIncomingMessage,
        envelope: Envelope | None,
        *,
        reason: str,
        error: str,
    ) -> None:
        attempts = int((message.headers or {}).get("x-attempt", 0)) + 1
        dead_id = str(envelope.message_id) if envelope else (message.message_id or None)
        if envelope is not None and envelope.type == SystemErrorReported.__name__:
            # Reporting a report that could not be handled would feed the same failing handler
            # again, in a loop; it stays in the dead-letter queue, which health reports.
            log.critical(
                "dead-lettered SystemErrorReported %s on %s; not reported again: %s",
                dead_id,
                self.name,
                error[:500],
            )
        else:
            await self._report_dead_letter(
                SystemErrorReported(
                    service=self.outbox.producer,
                    consumer=self.name,
                    message_type=envelope.type if envelope else message.type,
                    error=error[:8000],
                    dead_lettered_message_id=dead_id,
                    attempts=attempts,
                ),
                key=dead_id or message.body.hex()[:200],
                correlation_id=envelope.correlation_id if envelope else message.correlation_id,
            )
        await self._forward(
            message,
            self.queues.dead_letter,
            {
                "x-attempt": attempts,
                "x-dead-letter-reason": reason,
                "x-error": error[:4000],
                "x-consumer": self.name,
                "x-original-routing-key": message.routing_key or "",
            },
        )
        await message.ack()
        metrics.MESSAGES_HANDLED.labels(
            self.name, envelope.type if envelope else "unreadable", "dead_lettered"
        ).inc()

    async def _report_dead_letter(
        self, report: SystemErrorReported, *, key: str, correlation_id: str | None
    ) -> None:
        message_id = uuid.uuid5(_DEAD_LETTER_NAMESPACE, f"{self.name}:{key}")
        with correlated(correlation_id, report.dead_lettered_message_id):
            try:
                async with self.db.transaction() as session:
                    await self.outbox.record(session, report, message_id=message_id)
                return
            except Exception as exc:
                log.error(
                    "outbox unavailable for SystemErrorReported, publishing directly: %s", exc
                )
            envelope = wrap(
                report,
                message_id=message_id,
                correlation_id=correlation_id or str(uuid.uuid4()),
                causation_id=report.dead_lettered_message_id,
                producer=self.outbox.producer,
            )
            await self.broker.publish(
                OutgoingMessage(
                    body=envelope.model_dump_json().encode(),
                    exchange=self.outbox.exchange,
                    routing_key=envelope.routing_key,
                    message_id=str(message_id),
                    correlation_id=envelope.correlation_id,
                    type=envelope.type,
                )
            )

    async def _forward(
        self, message: AbstractIncomingMessage, queue: str, headers: dict[str, Any]
    ) -> None:
        """Copy `message` to `queue` through the default exchange and wait for the confirm."""
        assert self._channel is not None
        await self._channel.default_exchange.publish(
            aio_pika.Message(
                body=message.body,
                headers={**(message.headers or {}), **headers},
                content_type=message.content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message.message_id,
                correlation_id=message.correlation_id,
                type=message.type,
                timestamp=message.timestamp,
                app_id=message.app_id,
            ),
            routing_key=queue,
            timeout=10,
        )
