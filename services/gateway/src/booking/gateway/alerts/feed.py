"""This replica's alert feed: its own queue on the `admin.alerts` fanout, and the fan-out to the
admins connected here.

Each gateway replica consumes a queue of its own, exclusive and auto-delete, bound to the fanout
exchange, so every replica gets every alert and an admin on any replica sees them all. The queue
is a FastStream subscriber on the runtime's broker (`Broker.subscribe_own_queue`, on the one
definition of the alerts exchange), taken with no_ack: an alert is worth something only live,
the store is elsewhere.

The queue lives as long as the broker connection; after a reconnect a new one replaces it
(booking.runtime.fanout). What was published while the connection was down is in no queue of
this replica: each admin connected here then resumes from the last id it was sent (the replay
comes from the notifications service, which stores everything, not from the broker).

The fan-out never awaits a socket: it hands each admin's connection the frame (serialised once),
and a connection that cannot take it is dropped by itself (see connection.py).
"""

from __future__ import annotations

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
from booking.runtime.fanout import FanoutQueue
from booking.runtime.health import Observation

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
        self.exchange = broker.alerts_exchange
        self.queue = FanoutQueue(
            broker,
            self.exchange,
            take=self._on_message,
            on_gap=self._interrupted,
            name="admin alert feed",
            reattach_interval=reattach_interval,
        )
        self.subscribers: set[Subscriber] = set()
        self.history: deque[Alert] = deque(maxlen=HISTORY)
        self.seq = 0  # of the last alert fanned out
        self.received = 0
        self.dropped_repeats = 0
        self._seen = Sent(REMEMBERED_IDS)

    # --- the queue --------------------------------------------------------------------------

    async def attach(self, connection: AbstractRobustConnection) -> None:
        """`Broker.on_started`: consume a queue of this replica's own, again after every
        reconnect (booking.runtime.fanout)."""
        await self.queue.attach(connection)

    def _interrupted(self) -> None:
        # What was published while this replica had no queue is in no queue of its own: each
        # admin here catches up from the notifications service.
        for subscriber in list(self.subscribers):
            subscriber.interrupted()

    @property
    def queue_name(self) -> str | None:
        return self.queue.queue_name

    @property
    def consumer(self) -> RabbitSubscriber | None:
        return self.queue.consumer

    @property
    def attachments(self) -> int:
        return self.queue.attachments

    async def stop(self) -> None:
        await self.queue.stop()

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

    # --- health ---------------------------------------------------------------------------

    @property
    def consuming(self) -> bool:
        return self.queue.consuming

    async def check_queue(self) -> Observation:
        """Pass when this replica's queue has its consumer (see FanoutQueue.check)."""
        return await self.queue.check(COMPONENT, "no live alerts")
