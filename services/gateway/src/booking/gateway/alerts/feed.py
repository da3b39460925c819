"""This replica's alert feed: its own queue on the `admin.alerts` fanout, and the fan-out to the
admins connected here.

Each gateway replica consumes a queue of its own, exclusive and auto-delete, bound to the fanout
exchange, so every replica gets every alert and an admin on any replica sees them all. The queue
is a FastStream subscriber on the runtime's broker (`Broker.subscribe_own_queue`, on the one
definition of the alerts exchange), taken with no_ack: an alert is worth something only live,
the store is elsewhere.

The queue lives as long as the broker connection. What FastStream does not do is kept thin here:
after a reconnect (aio-pika's reconnect callback; FastStream does not restart its subscribers)
a new subscriber, on a queue with a new name, replaces the one whose queue went with the old
connection. What was published while the connection was down is in no queue of this replica:
each admin connected here then resumes from the last id it was sent (the replay comes from the
notifications service, which stores everything, not from the broker).

The fan-out never awaits a socket: it hands each admin's connection the frame (serialised once),
and a connection that cannot take it is dropped by itself (see connection.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable
from typing import Protocol

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from faststream.rabbit.subscriber import RabbitSubscriber

from booking.contracts import (
    AdminNotificationRaised,
    MalformedMessage,
    UnknownEvent,
    decode,
    parse_envelope,
)
from booking.gateway.alerts.frames import Alert, Sent
from booking.runtime.broker import Broker
from booking.runtime.health import Observation, Status

log = logging.getLogger(__name__)

COMPONENT = "admin-alerts"

HISTORY = 1024
"""The last alerts fanned out here, so that a client that resumes after it went live is not sent
again what it was sent live (see AdminConnection.resume)."""

REMEMBERED_IDS = 4096
"""How many notification ids the feed remembers to drop redelivered or stale repeats."""


class Subscriber(Protocol):
    since: int

    def offer(self, alert: Alert) -> None: ...

    def interrupted(self) -> None:
        """The feed had no queue for a while (a broker reconnect): alerts may have been missed."""


class AlertFeed:
    def __init__(self, broker: Broker, *, reattach_interval: float = 2.0) -> None:
        self.broker = broker
        self.exchange = broker.alerts_exchange
        self.reattach_interval = reattach_interval
        self.subscribers: set[Subscriber] = set()
        self.history: deque[Alert] = deque(maxlen=HISTORY)
        self.seq = 0  # of the last alert fanned out
        self.received = 0
        self.dropped_repeats = 0
        self.queue_name: str | None = None
        self.attachments = 0  # queues declared and consumed so far
        self.consumer: RabbitSubscriber | None = None  # FastStream's, on this replica's queue
        self._seen = Sent(REMEMBERED_IDS)
        self._needs_queue = False
        self._lost_queue = False  # a queue went with a connection: alerts may have been missed
        self._attaching: asyncio.Task[None] | None = None
        self._hooked: set[int] = set()

    # --- the queue --------------------------------------------------------------------------

    async def attach(self, connection: AbstractRobustConnection) -> None:
        """`Broker.on_started`: consume a queue of this replica's own; again after every
        reconnect.

        Broker.on_started runs on the first connection only, once the broker's own subscribers
        consume and before it reports ready: the connection's reconnect callbacks subscribe a
        new queue each time.
        """
        if id(connection) not in self._hooked:
            self._hooked.add(id(connection))
            connection.reconnect_callbacks.add(self._on_reconnected)
        try:
            await self._subscribe(catch_up=False)
        except Exception as exc:
            # Never fail the broker's start: the rest of the gateway does not need the feed.
            log.warning("admin alert feed: could not declare its queue: %s", exc)
            self._needs_queue = True
            self._keep_attached(connection)

    def _on_reconnected(self, connection: AbstractRobustConnection | None) -> None:
        # Not awaited by aio-pika's reconnect path: it must not stall on our declarations.
        self.queue_name = None
        self._needs_queue = self._lost_queue = True
        if connection is None:  # aio-pika types a callback's sender as optional; never None here
            return
        self._keep_attached(connection)

    def _keep_attached(self, connection: AbstractRobustConnection) -> None:
        if self._attaching is None or self._attaching.done():
            self._attaching = asyncio.create_task(
                self._attach_until_done(connection), name="admin-alerts-attach"
            )

    async def _attach_until_done(self, connection: AbstractRobustConnection) -> None:
        await self.broker.wait_ready()  # subscribed before the broker started, it would start twice
        # A reconnect while subscribing asks for one more queue: the one just subscribed may
        # have been declared on the connection that went.
        while self._needs_queue and not connection.is_closed:
            self._needs_queue = False
            lost, self._lost_queue = self._lost_queue, False
            try:
                await self._subscribe(catch_up=lost)
            except Exception as exc:
                self._needs_queue = True
                self._lost_queue = self._lost_queue or lost
                log.warning(
                    "admin alert feed: could not declare its queue, retrying in %gs: %s",
                    self.reattach_interval,
                    str(exc) or type(exc).__name__,
                )
                await asyncio.sleep(self.reattach_interval)

    async def _subscribe(self, *, catch_up: bool) -> None:
        consumer = await self.broker.subscribe_own_queue(self.exchange, take=self._on_message)
        # The new queue consumes before the old one goes: on a live connection, no gap.
        previous, self.consumer = self.consumer, consumer
        self.queue_name = consumer.queue.name
        log.info("admin alert feed consuming %s (bound to %s)", self.queue_name, self.exchange)
        self.attachments += 1
        if catch_up:
            # What was published while this replica had no queue is in no queue of its own:
            # each admin here catches up from the notifications service.
            for subscriber in list(self.subscribers):
                subscriber.interrupted()
        if previous is not None:
            await _stop_quietly(previous)

    async def stop(self) -> None:
        if self._attaching is not None:
            self._attaching.cancel()
            await asyncio.gather(self._attaching, return_exceptions=True)
        if self.consumer is not None:
            # The queue is auto-delete: it goes with its consumer.
            await _stop_quietly(self.consumer)
            self.consumer = None
        self.queue_name = None

    # --- fan-out ----------------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            event = decode(parse_envelope(message.body))
        except (MalformedMessage, UnknownEvent) as exc:
            log.error("admin alert feed: dropped %s: %s", message.message_id, exc)
            return
        if not isinstance(event, AdminNotificationRaised):
            log.warning("admin alert feed: ignored a %s", type(event).__name__)
            return
        self.publish(event)

    def publish(self, notification: AdminNotificationRaised) -> None:
        """Hand the notification to every subscriber; synchronous, so the order is the queue's."""
        self.received += 1
        alert = Alert.of(notification, seq=self.seq + 1)
        if not self._seen.take(alert):
            # At-least-once delivery: the same (id, occurrences) again, or an older count late.
            self.dropped_repeats += 1
            return
        self.seq = alert.seq
        self.history.append(alert)
        for subscriber in list(self.subscribers):
            subscriber.offer(alert)

    def subscribe(self, subscriber: Subscriber) -> None:
        """From now on `subscriber` is offered every alert (its `since` marks where it joined)."""
        subscriber.since = self.seq
        self.subscribers.add(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)

    def sent_since(self, seq: int) -> Iterable[Alert]:
        """The alerts fanned out after `seq` (as far back as the history reaches)."""
        return (alert for alert in self.history if alert.seq > seq)

    # --- health -----------------------------------------------------------------------------

    @property
    def consuming(self) -> bool:
        return self.queue_name is not None and self.broker.is_connected

    async def check_queue(self) -> Observation:
        """Pass when this replica's queue has its consumer; fail when the broker is up and it
        does not. Without a broker the rabbitmq:connection check already says so: warn."""
        measurement = "consumers"
        if not self.broker.is_connected:
            return Observation(
                COMPONENT, measurement, "warn", "component", 0,
                output="not connected to RabbitMQ: no live alerts until it is back",
            )  # fmt: skip
        name = self.queue_name
        if name is None:
            return Observation(
                COMPONENT, measurement, "fail", "component", 0,
                output=f"no queue bound to {self.exchange} yet",
            )  # fmt: skip
        try:
            _, consumers = await self.broker.queue_stats(name)
        except Exception as exc:
            return Observation(
                COMPONENT, measurement, "fail", "component", 0,
                output=f"queue {name} is gone: {type(exc).__name__}",
            )  # fmt: skip
        status: Status = "pass" if consumers > 0 else "fail"
        return Observation(
            COMPONENT, measurement, status, "component", consumers,
            output=f"{name} bound to {self.exchange}",
        )  # fmt: skip


async def _stop_quietly(consumer: RabbitSubscriber) -> None:
    """Stop a subscriber whose queue may be gone with its connection, or the connection too."""
    try:
        async with asyncio.timeout(5):
            await consumer.stop()
    except Exception as exc:
        log.debug("admin alert feed: stopping the consumer of %s: %s", consumer.queue.name, exc)
