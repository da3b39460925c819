"""The idempotent consumer: inbox + handler in one transaction, bounded retries, dead letters.

Each delivery runs its handler in a transaction that also inserts `(message_id, consumer)` into
the inbox; the primary key turns a redelivery into a no-op. The message is acked only after that
commit. Under load, deliveries that are already waiting share one transaction (a commit is the
dearest part of handling a message); if any of them fails, each is handled again on its own.

A failure of the message itself (a handler that raises while the database answers) sends it to a
delay queue (growing delay) and back, a bounded number of times; then to the dead-letter queue,
where the service's `DeadLetterKeeper` keeps it for an admin and reports it. A body that cannot
be parsed, or an event version this code does not know, is dead-lettered at once.

A broken dependency is not a poison message: when a handler fails and the database does not
answer, the consumer pauses. It stops taking deliveries, hands back the unacked ones once
(uncounted by its own retry budget; the queue's `x-delivery-limit` counts each hand-back, so it
happens once per pause, not on every attempt) and resumes when the database answers again.

The deliveries come from FastStream subscribers (booking.runtime.broker) with manual acks:
FastStream's default policy rejects on error, which dead-letters at once and skips the delay
queues. What FastStream lacks is this module, one thin wrapper around the subscriber: a
RabbitMQ subscriber of FastStream takes one delivery per call, so the transactions that span
several waiting deliveries, the inbox in them, the delay-queue retries, the dead letters and
the pause are here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from faststream.rabbit import RabbitQueue
from faststream.rabbit.subscriber import RabbitSubscriber
from sqlalchemy.ext.asyncio import AsyncSession

from booking.contracts import (
    Envelope,
    Event,
    MalformedMessage,
    UnknownEvent,
    decode,
    parse_envelope,
)
from booking.runtime import metrics, tracing
from booking.runtime.broker import (
    Broker,
    ConsumerQueues,
    ConsumerTopology,
    pause_subscriber,
    resume_subscriber,
)
from booking.runtime.context import correlated
from booking.runtime.db import Database, driver_connection
from booking.runtime.outages import OutageLog, describe, is_unreachable
from booking.runtime.outbox import Outbox
from booking.runtime.sweeping import run_quietly
from booking.runtime.tables import MessagingTables

log = logging.getLogger(__name__)

# Pauses that follow a resume this soon wait longer each time: a flapping database must not
# make the consumer hand the same deliveries back again and again (each costs one of the
# queue's delivery limit).
_RESUME_FIRST_WAIT = 0.5
_RESUME_MAX_WAIT = 5.0
_FLAPPING_WINDOW = 30.0


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
        # In the trace of this message (tracing off: `step` itself).
        self.after_commit.append(tracing.carried(step, f"{self.envelope.type} after commit"))


Handler = Callable[[Any, MessageContext], Awaitable[None]]


class QueueWorker:
    """Takes deliveries from one queue into a few workers, and pauses while the database is away.

    The deliveries come from a FastStream subscriber with manual acks (`Broker.subscriber`); its
    handler only hands each one over. Subclasses say which queue (`queue_definition`,
    `topology`) and what handling a batch of deliveries means (`handle`), and call `_subscribe`
    once they are built.
    """

    # One for every consumer of the process: a broker outage is reported once, not per queue.
    broker_outage = OutageLog(log, "RabbitMQ (consumers)")

    def __init__(
        self,
        *,
        name: str,
        db: Database,
        broker: Broker,
        prefetch: int,
        concurrency: int,
        max_batch: int,
    ) -> None:
        self.name = name
        self.db = db
        self.broker = broker
        self.prefetch = prefetch
        self.concurrency = concurrency
        self.max_batch = max_batch
        self.subscriber: RabbitSubscriber | None = None
        self._deliveries: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._paused = False
        self._resume_task: asyncio.Task[None] | None = None
        self._last_resumed: float | None = None
        self._resume_wait = _RESUME_FIRST_WAIT
        self.outage = OutageLog(log, f"the database (consumer {name})")

    def queue_definition(self) -> RabbitQueue:
        raise NotImplementedError

    def topology(self) -> ConsumerTopology | None:
        """What the broker declares before this worker's subscriber consumes (None: the queue)."""
        return None

    async def handle(self, messages: list[AbstractIncomingMessage]) -> None:
        raise NotImplementedError

    def _subscribe(self) -> None:
        self.subscriber = self.broker.subscriber(
            self.queue_definition(),
            prefetch=self.prefetch,
            take=self.on_message,
            topology=self.topology(),
        )

    @property
    def paused(self) -> bool:
        return self._paused

    def start(self) -> None:
        """Start the workers (before the broker, so that no delivery waits for them)."""
        if not self._workers:
            self._workers = [
                asyncio.create_task(self._work(), name=f"consumer-{self.name}-{i}")
                for i in range(self.concurrency)
            ]

    async def stop(self) -> None:
        tasks = [*self._workers, *([self._resume_task] if self._resume_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._workers = []
        self._resume_task = None

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """The subscriber's handler: hand the delivery to the workers (acked by them)."""
        if self._paused:
            # Sent before the broker heard of the pause: straight back.
            await self._hand_back([message])
            return
        # Bounded by the prefetch count: the broker sends no more than that unacked.
        self._deliveries.put_nowait(message)

    async def _work(self) -> None:
        """Take what has arrived (up to max_batch) and handle it; batches form only under load."""
        while True:
            batch = [await self._deliveries.get()]
            while len(batch) < self.max_batch and not self._deliveries.empty():
                batch.append(self._deliveries.get_nowait())
            try:
                if self._paused:
                    await self._hand_back(batch)
                else:
                    await self.handle(batch)
            except Exception as exc:
                # Unacked messages come back from the broker; never let a worker die.
                if is_unreachable(exc):
                    self.broker_outage.failed(exc, f"handling a batch of {len(batch)}")
                else:
                    log.exception("consumer %s failed on a batch of %d", self.name, len(batch))

    # --- pausing while the database is away ----------------------------------------------

    async def dependency_failed(self, exc: BaseException, doing: str) -> bool:
        """Whether `exc` came of the database being away (then the consumer pauses): it is
        asked directly, so an error of the message itself is never mistaken for an outage."""
        if self._paused:
            return True
        if await self.db.answers():
            return False
        self.outage.failed(exc, doing)
        await self.pause()
        return True

    async def pause(self) -> None:
        """Stop taking deliveries and hand back those not yet handled; resume when the
        database answers again."""
        if self._paused:
            return
        self._paused = True
        metrics.CONSUMER_PAUSES.labels(self.name).inc()
        if self.subscriber is not None:
            await pause_subscriber(self.subscriber)
        waiting = []
        while not self._deliveries.empty():
            waiting.append(self._deliveries.get_nowait())
        await self._hand_back(waiting)
        recently = (
            self._last_resumed is not None
            and time.monotonic() - self._last_resumed < _FLAPPING_WINDOW
        )
        self._resume_wait = (
            min(self._resume_wait * 2, _FLAPPING_WINDOW) if recently else _RESUME_FIRST_WAIT
        )
        log.warning(
            "consumer %s paused: the database does not answer; %d deliveries handed back",
            self.name,
            len(waiting),
        )
        self._resume_task = asyncio.create_task(
            self._resume_when_answering(), name=f"resume-{self.name}"
        )

    async def _resume_when_answering(self) -> None:
        wait = self._resume_wait
        while True:
            await asyncio.sleep(wait)
            wait = min(wait * 2, max(_RESUME_MAX_WAIT, self._resume_wait))
            if self.subscriber is None or not await self.db.answers():
                continue
            try:
                if not await resume_subscriber(self.subscriber):
                    continue  # the broker was never reached: its subscriber consumes once it is
            except Exception as exc:
                # The broker is away too: its robust channel comes back, then this succeeds.
                self.broker_outage.failed(exc, "resuming")
                continue
            break
        self._paused = False
        self._last_resumed = time.monotonic()
        self._resume_task = None
        self.outage.recovered()
        log.warning("consumer %s resumed: the database answers again", self.name)

    @staticmethod
    async def _hand_back(messages: list[AbstractIncomingMessage]) -> None:
        for message in messages:
            # A channel that is gone has returned them already.
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)

    async def forward(
        self, message: AbstractIncomingMessage, queue: str, headers: dict[str, Any]
    ) -> None:
        """Copy `message` to `queue` through the default exchange and wait for the confirm."""
        await self.broker.forward(message, queue, headers)


class Consumer(QueueWorker):
    """A service's events: its handlers, one transaction per delivery (or batch), the inbox."""

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
        super().__init__(
            name=name,
            db=db,
            broker=broker,
            prefetch=prefetch,
            concurrency=concurrency,
            max_batch=max_batch,
        )
        self.tables = tables
        self.outbox = outbox
        self.handlers = dict(handlers)
        self.queues = ConsumerQueues.named(name, max_attempts, retry_base_delay_ms)
        self._after_commit: set[asyncio.Task[None]] = set()
        # Each metric's children resolved once: a delivery only looks them up.
        self._handled = metrics.Children(metrics.MESSAGES_HANDLED)
        self._handler_latency = metrics.Children(metrics.HANDLER_LATENCY)
        self._batch_latency = metrics.BATCH_LATENCY.labels(name)
        self._age = metrics.MESSAGE_AGE.labels(name)
        # The whole batch in one statement, on the driver itself (`driver_connection`); what it
        # returns is new to this consumer.
        self._record_in_inbox = f"""
            INSERT INTO "{tables.schema}".inbox (message_id, consumer, event_type)
            SELECT m, $2, t FROM unnest($1::uuid[], $3::text[]) AS u(m, t)
            ON CONFLICT DO NOTHING RETURNING message_id
            """
        self._subscribe()

    @property
    def routing_keys(self) -> list[str]:
        return sorted({t.binding_key() for t in self.handlers})

    def queue_definition(self) -> RabbitQueue:
        return self.queues.main_queue()

    def topology(self) -> ConsumerTopology:
        return ConsumerTopology(self.queues, tuple(self.routing_keys))

    async def stop(self) -> None:
        for task in self._after_commit:
            task.cancel()
        await asyncio.gather(*self._after_commit, return_exceptions=True)
        await super().stop()

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
            if await self.dependency_failed(exc, f"handling {work[0][1].type}"):
                await self._hand_back([message for message, *_ in work])
                return
            if len(work) > 1:
                # One of them failed and took the others' transaction with it: handle each
                # alone, so only the failing one takes the retry path.
                for message, *_ in work:
                    if self.paused:
                        await self._hand_back([message])
                    else:
                        await self.handle([message])
                return
            message, envelope, *_ = work[0]
            with correlated(envelope.correlation_id, str(envelope.message_id)):
                await self._retry_or_dead_letter(message, envelope, exc)
            return
        if self.outage.in_outage:
            self.outage.recovered()
        committed = time.time()
        for (message, envelope, *_), outcome in zip(work, outcomes, strict=True):
            await message.ack()  # only now: the effects and the inbox record are committed
            self._handled(self.name, envelope.type, outcome).inc()
            if outcome == "handled":
                self._age.observe(max(0.0, committed - envelope.occurred_at.timestamp()))
        self._batch_latency.observe(time.perf_counter() - started)
        for step, envelope in after_commit:
            self._run_after_commit(step, envelope)

    def _run_after_commit(self, step: Callable[[], Awaitable[None]], envelope: Envelope) -> None:
        async def run() -> None:
            with correlated(envelope.correlation_id, str(envelope.message_id)):
                # The intent is committed; the service's sweeper finishes what this leaves.
                await run_quietly(step, self.outage, f"the after-commit step of {envelope.type}")

        task = asyncio.create_task(run())
        self._after_commit.add(task)
        task.add_done_callback(self._after_commit.discard)

    async def _handle_once(
        self, work: list[tuple[AbstractIncomingMessage, Envelope, Event, Handler]]
    ) -> tuple[list[str], list[tuple[Callable[[], Awaitable[None]], Envelope]]]:
        outcomes: list[str] = []
        after_commit: list[tuple[Callable[[], Awaitable[None]], Envelope]] = []
        async with self.db.transaction() as session:
            recorded = await (await driver_connection(session)).fetch(
                self._record_in_inbox,
                [envelope.message_id for _, envelope, _, _ in work],
                self.name,
                [envelope.type for _, envelope, _, _ in work],
            )
            first_seen = {row[0] for row in recorded}
            for _, envelope, event, handler in work:
                if envelope.message_id not in first_seen:
                    outcomes.append("duplicate")
                    continue
                first_seen.discard(envelope.message_id)  # the same message twice in one batch
                context = MessageContext(session, envelope, self.outbox)
                with (
                    correlated(envelope.correlation_id, str(envelope.message_id)),
                    tracing.consuming(envelope, self.name),
                ):
                    began = time.perf_counter()
                    await handler(event, context)
                    elapsed = time.perf_counter() - began
                self._handler_latency(self.name, envelope.type).observe(elapsed)
                after_commit.extend((step, envelope) for step in context.after_commit)
                outcomes.append("handled")
        return outcomes, after_commit

    async def _retry_or_dead_letter(
        self, message: AbstractIncomingMessage, envelope: Envelope, exc: Exception
    ) -> None:
        attempt = _attempts_before(message) + 1
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
            describe(exc),
        )
        await self.forward(
            message,
            self.queues.retry(attempt),
            {"x-attempt": attempt, "x-last-error": error[:1000]},
        )
        await message.ack()  # only now: the copy in the delay queue is confirmed
        self._handled(self.name, envelope.type, "retried").inc()

    async def _dead_letter(
        self,
        message: AbstractIncomingMessage,
        envelope: Envelope | None,
        *,
        reason: str,
        error: str,
    ) -> None:
        """To the dead-letter queue, where the service's keeper stores and reports it."""
        attempts = _attempts_before(message) + 1
        await self.forward(
            message,
            self.queues.dead_letter,
            {
                "x-attempt": attempts,
                "x-dead-letter-reason": reason,
                "x-error": error[:8000],
                "x-consumer": self.name,
                "x-original-routing-key": message.routing_key or "",
            },
        )
        await message.ack()
        self._handled(self.name, envelope.type if envelope else "unreadable", "dead_lettered").inc()


def _attempts_before(message: AbstractIncomingMessage) -> int:
    """How many times the message failed before this delivery (our own x-attempt header)."""
    attempts: Any = (message.headers or {}).get("x-attempt", 0)
    return int(attempts)
