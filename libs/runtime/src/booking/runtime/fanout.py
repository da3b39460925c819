"""A queue of this process's own on a fanout, consumed for as long as the process runs.

For what every replica reads whole and only live (the gateway's admin alerts and order changes):
the queue is exclusive and auto-delete, taken with no_ack (`Broker.subscribe_own_queue`), so it
goes away with its connection. What FastStream does not do is kept here: after a reconnect
(aio-pika's reconnect callback; FastStream does not restart such subscribers) a new subscriber,
on a queue with a new name, replaces the one whose queue went with the old connection. What was
published while there was no queue is in no queue of this process: `on_gap` then tells the
owner, which catches up from the service that stores the data (never from the broker).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aio_pika.abc import AbstractRobustConnection
from faststream.rabbit.subscriber import RabbitSubscriber

from booking.runtime.broker import Broker, Take
from booking.runtime.health import Observation, Status

log = logging.getLogger(__name__)


class FanoutQueue:
    """This process's queue on the fanout `exchange`, each delivery handed to `take`.

    Give `attach` to `Broker.on_started`: it subscribes once the broker has started, and hooks
    the connection's reconnects. `name` says what the queue feeds, in logs and health.
    """

    def __init__(
        self,
        broker: Broker,
        exchange: str,
        *,
        take: Take,
        on_gap: Callable[[], None],
        name: str,
        reattach_interval: float = 2.0,
    ) -> None:
        self.broker = broker
        self.exchange = exchange
        self.take = take
        self.on_gap = on_gap
        self.name = name
        self.reattach_interval = reattach_interval
        self.queue_name: str | None = None
        self.attachments = 0  # queues declared and consumed so far
        self.consumer: RabbitSubscriber | None = None  # FastStream's, on the current queue
        self._needs_queue = False
        self._lost_queue = False  # a queue went with a connection: messages may have been missed
        self._attaching: asyncio.Task[None] | None = None
        self._hooked: set[int] = set()

    async def attach(self, connection: AbstractRobustConnection) -> None:
        """`Broker.on_started`: consume a queue of this process's own; again after every
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
            # Never fail the broker's start: the rest of the process does not need this feed.
            log.warning("%s: could not declare its queue: %s", self.name, exc)
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
                self._attach_until_done(connection), name=f"{self.name}-attach"
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
                    "%s: could not declare its queue, retrying in %gs: %s",
                    self.name,
                    self.reattach_interval,
                    str(exc) or type(exc).__name__,
                )
                await asyncio.sleep(self.reattach_interval)

    async def _subscribe(self, *, catch_up: bool) -> None:
        consumer = await self.broker.subscribe_own_queue(self.exchange, take=self.take)
        # The new queue consumes before the old one goes: on a live connection, no gap.
        previous, self.consumer = self.consumer, consumer
        self.queue_name = consumer.queue.name
        log.info("%s consuming %s (bound to %s)", self.name, self.queue_name, self.exchange)
        self.attachments += 1
        if catch_up:
            self.on_gap()
        if previous is not None:
            await _stop_quietly(previous, self.name)

    async def stop(self) -> None:
        if self._attaching is not None:
            self._attaching.cancel()
            await asyncio.gather(self._attaching, return_exceptions=True)
        if self.consumer is not None:
            # The queue is auto-delete: it goes with its consumer.
            await _stop_quietly(self.consumer, self.name)
            self.consumer = None
        self.queue_name = None

    @property
    def consuming(self) -> bool:
        return self.queue_name is not None and self.broker.is_connected

    async def check(self, component: str, missing: str) -> Observation:
        """`component:consumers`: pass when this process's queue has its consumer; fail when the
        broker is up and it does not. Without a broker the rabbitmq:connection check already
        says so: warn, with `missing` (what goes missing meanwhile)."""
        measurement = "consumers"
        if not self.broker.is_connected:
            return Observation(
                component, measurement, "warn", "component", 0,
                output=f"not connected to RabbitMQ: {missing} until it is back",
            )  # fmt: skip
        name = self.queue_name
        if name is None:
            return Observation(
                component, measurement, "fail", "component", 0,
                output=f"no queue bound to {self.exchange} yet",
            )  # fmt: skip
        try:
            _, consumers = await self.broker.queue_stats(name)
        except Exception as exc:
            return Observation(
                component, measurement, "fail", "component", 0,
                output=f"queue {name} is gone: {type(exc).__name__}",
            )  # fmt: skip
        status: Status = "pass" if consumers > 0 else "fail"
        return Observation(
            component, measurement, status, "component", consumers,
            output=f"{name} bound to {self.exchange}",
        )  # fmt: skip


async def _stop_quietly(consumer: RabbitSubscriber, name: str) -> None:
    """Stop a subscriber whose queue may be gone with its connection, or the connection too."""
    try:
        async with asyncio.timeout(5):
            await consumer.stop()
    except Exception as exc:
        log.debug("%s: stopping the consumer of %s: %s", name, consumer.queue.name, exc)
