"""RabbitMQ on FastStream: the connection, the one topology definition, confirmed publishing,
and the subscribers the consumers take their deliveries from (docs/recovery.md).

FastStream's `RabbitBroker` owns the robust connection, declares the topology and publishes with
publisher confirms. The topology is defined once, here, as FastStream `RabbitExchange` and
`RabbitQueue` objects (`events_exchange_named`, `fanout_exchange_named`, `ConsumerQueues`): the
step that declares it before traffic (`declare_topology`, run with the migrations) and the
subscribers declare the very same objects, so their arguments can never disagree (RabbitMQ
answers 406 PRECONDITION_FAILED when they do).

Publishing on the events exchange (and straight to a queue) is mandatory: an event no queue is
bound to comes back from the broker as `Unroutable` instead of vanishing, and stays in the
outbox. The fanouts (admin alerts, order changes: `declare_fanout`) are not: with no gateway
listening nothing is lost, since the alerts and the orders are stored by the services that own
them. Every message is built here in full (persistent,
its message_id set explicitly): FastStream 0.7 sets neither for you.

What FastStream lacks is kept thin: `start()` returns at once and connects in the background (a
service keeps serving, and keeps writing its outbox, while RabbitMQ is away), a main queue is
bound to many routing keys (a FastStream subscriber binds one), and a subscriber can stop taking
deliveries for a while without dropping those already on their way (`pause_subscriber`): its
own `stop()` ignores what arrives after it, which would leave them unacked on the channel.
A queue of the connection's own (`subscribe_own_queue`: the gateway's feeds) is not restored by
a reconnect; its owner subscribes a new one (booking.runtime.fanout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import aio_pika
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustConnection,
    DeliveryMode,
)
from aiormq.abc import DeliveredMessage
from faststream import AckPolicy
from faststream.message import StreamMessage
from faststream.rabbit import (
    Channel,
    ExchangeType,
    QueueType,
    RabbitBroker,
    RabbitExchange,
    RabbitQueue,
)
from faststream.rabbit.subscriber import RabbitSubscriber

if TYPE_CHECKING:
    from faststream.rabbit.utils import RabbitClientProperties

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_SECONDS = 10.0

# Each message FastStream takes in is logged at this level: a debug line, not an info line each.
_MESSAGE_LOG_LEVEL = logging.DEBUG


# --- the topology: one definition for the declaring step and the subscribers -----------------


def events_exchange_named(name: str) -> RabbitExchange:
    """The topic exchange every event is published on, routed by the event's name."""
    return RabbitExchange(name, type=ExchangeType.TOPIC, durable=True)


def fanout_exchange_named(name: str) -> RabbitExchange:
    """A fanout every gateway replica reads whole: the admin alerts, the order changes."""
    return RabbitExchange(name, type=ExchangeType.FANOUT, durable=True)


@dataclass(frozen=True)
class ConsumerQueues:
    """The queues of one consumer: main (quorum), one delay queue per retry, and dead letters."""

    main: str
    retry_delays_ms: tuple[int, ...]
    dead_letter: str

    @classmethod
    def named(cls, name: str, max_attempts: int, base_delay_ms: int) -> ConsumerQueues:
        # Growing delay: attempt n waits base * 2^(n-1) before it is delivered again.
        delays = tuple(base_delay_ms * 2**i for i in range(max_attempts - 1))
        return cls(main=name, retry_delays_ms=delays, dead_letter=f"{name}.dlq")

    def retry(self, attempt: int) -> str:
        """The delay queue a message goes to after its `attempt`-th failed delivery (1-based)."""
        return f"{self.main}.retry.{attempt}"

    @property
    def max_attempts(self) -> int:
        return len(self.retry_delays_ms) + 1

    def main_queue(self, routing_key: str = "") -> RabbitQueue:
        """The main queue (`routing_key`: one of its bindings, for the AsyncAPI document)."""
        return RabbitQueue(
            self.main,
            QueueType.QUORUM,
            durable=True,
            routing_key=routing_key,
            arguments={
                # A message that kills the consumer before it can ack (so never reaches our own
                # retry path) is still dead-lettered after this many deliveries.
                "x-delivery-limit": max(self.max_attempts * 2, 10),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.dead_letter,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )

    def retry_queue(self, attempt: int) -> RabbitQueue:
        # A delay queue has no consumer: messages wait out the TTL, then dead-letter back into
        # the main queue through the default exchange.
        return RabbitQueue(
            self.retry(attempt),
            QueueType.QUORUM,
            durable=True,
            arguments={
                "x-message-ttl": self.retry_delays_ms[attempt - 1],
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.main,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )

    def dead_letter_queue(self) -> RabbitQueue:
        return RabbitQueue(self.dead_letter, QueueType.QUORUM, durable=True)

    def every_queue(self) -> list[RabbitQueue]:
        """Dead letters first, then the delay queues, then main (which names the others)."""
        return [
            self.dead_letter_queue(),
            *(self.retry_queue(attempt) for attempt in range(1, len(self.retry_delays_ms) + 1)),
            self.main_queue(),
        ]


@dataclass(frozen=True)
class ConsumerTopology:
    """One consumer's queues and the routing keys its main queue is bound to."""

    queues: ConsumerQueues
    routing_keys: tuple[str, ...]


# --- publishing ----------------------------------------------------------------------------


class Unroutable(Exception):
    """The broker returned a mandatory message: no queue is bound to its routing key."""

    def __init__(self, exchange: str, routing_key: str) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        where = f"exchange {exchange!r}" if exchange else "the default exchange"
        super().__init__(f"no queue takes {routing_key!r} on {where}")


@dataclass(frozen=True)
class OutgoingMessage:
    body: bytes
    exchange: str
    routing_key: str
    message_id: str
    correlation_id: str | None = None
    type: str | None = None
    headers: dict[str, Any] | None = None


Take = Callable[[AbstractIncomingMessage], Awaitable[None]]


async def _raw_delivery(message: StreamMessage[Any]) -> Any:
    """FastStream's decoder for our subscribers: the delivery itself. The worker parses the
    envelope once, and acks the delivery itself (manual acks). Async: FastStream runs a plain
    function in a thread."""
    return message.raw_message


class Broker:
    """One FastStream broker per process: its connection, its confirming publishing channel,
    and the subscribers of the service's consumers.

    `start()` returns at once; the connection is made (and remade) in the background so a service
    keeps serving, and keeps writing its outbox, while RabbitMQ is away.
    """

    def __init__(
        self,
        url: str,
        *,
        client_name: str,
        events_exchange: str,
        alerts_exchange: str,
        reconnect_interval: float = 2.0,
    ) -> None:
        self._url = url
        self._reconnect_interval = reconnect_interval
        self._client_name = client_name
        self.events_exchange = events_exchange
        self.alerts_exchange = alerts_exchange
        self.exchanges = [
            events_exchange_named(events_exchange),
            fanout_exchange_named(alerts_exchange),
        ]
        self._declared = {exchange.name: exchange for exchange in self.exchanges}
        self.faststream = _faststream_broker(url, client_name, reconnect_interval)
        self.connection: AbstractRobustConnection | None = None
        self._consumers: list[ConsumerTopology] = []
        self._subscribed: set[str] = set()
        self._on_started: list[Callable[[AbstractRobustConnection], Awaitable[None]]] = []
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One channel for every own-queue subscriber (`subscribe_own_queue`): a channel is
        # restored on each reconnect for the process's life, so it is not opened per queue.
        self._own_queues_channel = Channel(publisher_confirms=False)

    def declare_fanout(self, name: str) -> None:
        """Declare the fanout `name` with the exchanges, before traffic and on each start: by
        the service that records events to it (its relay publishes on the definition) and by
        the one that reads it (`subscribe_own_queue`). Call it before `start`."""
        if name not in self._declared:
            exchange = fanout_exchange_named(name)
            self.exchanges.append(exchange)
            self._declared[name] = exchange

    def on_started(self, callback: Callable[[AbstractRobustConnection], Awaitable[None]]) -> None:
        """Run `callback` once the first connection is up and the subscribers consume, before
        the broker reports ready (for a subscriber of one's own: `subscribe_own_queue`)."""
        self._on_started.append(callback)

    def subscriber(
        self,
        queue: RabbitQueue,
        *,
        prefetch: int,
        take: Take,
        topology: ConsumerTopology | None = None,
    ) -> RabbitSubscriber:
        """A FastStream subscriber of `queue` with manual acks, handing each delivery to `take`.

        `topology` is declared (queues and bindings) before the subscriber starts consuming.
        """
        if topology is not None:
            self._consumers.append(topology)
        self._subscribed.add(queue.name)
        subscriber = self.faststream.subscriber(
            queue,
            # Its own channel: the prefetch bounds this queue's unacked deliveries alone.
            channel=Channel(prefetch_count=prefetch),
            ack_policy=AckPolicy.MANUAL,
            decoder=_raw_delivery,
            no_reply=True,
        )
        subscriber(take)
        return subscriber

    async def subscribe_own_queue(self, exchange: str, *, take: Take) -> RabbitSubscriber:
        """Start a FastStream subscriber of a new queue of this connection's own, bound to the
        declared `exchange` (its one definition), handing each delivery to `take`, unacked.

        For a fanout that every process reads whole (the gateway's admin alerts and order
        changes: booking.runtime.fanout): the queue is exclusive and auto-delete, so it goes
        away with the connection or its consumer, and deliveries are taken with no_ack. Each
        call declares a new name, chosen here rather than by the server (through FastStream's
        declarer, aio-pika names an unnamed queue itself and keeps one queue per definition).
        A reconnect does not restore the queue: aio-pika would declare the old name again,
        which the server may still hold for the dead connection until it notices (405
        RESOURCE_LOCKED). After a reconnect the caller subscribes again and stops the old
        subscriber. Call it once the broker has started (`on_started`, `wait_ready`):
        FastStream's own start would start a subscriber registered before it a second time.
        Not persistent: FastStream forgets a subscriber that is let go.
        """
        queue = RabbitQueue(
            f"{exchange}.{self._client_name}.{uuid.uuid4().hex}",
            durable=False,
            exclusive=True,
            auto_delete=True,
            robust=False,
        )
        subscriber = self.faststream.subscriber(
            queue,
            self._declared[exchange],
            channel=self._own_queues_channel,
            ack_policy=AckPolicy.ACK_FIRST,  # consumed with no_ack
            decoder=_raw_delivery,
            no_reply=True,
            persistent=False,
        )
        subscriber(take)
        try:
            await subscriber.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await subscriber.stop()
            raise
        return subscriber

    @property
    def is_connected(self) -> bool:
        return (
            self._ready.is_set()
            and self.connection is not None
            and not self.connection.is_closed
            and self.connection.connected.is_set()
        )

    async def wait_ready(self, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await self._ready.wait()

    def start(self) -> None:
        self._task = asyncio.create_task(self._connect_until_up(), name="broker-connect")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.connection is not None:
            await self.faststream.stop()

    async def _connect_until_up(self) -> None:
        delay = 0.2
        while True:
            try:
                self.connection = await self.faststream.connect()
                break
            except Exception as exc:
                log.warning("broker unreachable, retrying in %.1fs: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._reconnect_interval * 2)
        # A queue with a subscriber is declared by that subscriber, on its own channel (FastStream
        # keeps one declared queue per definition, and consumes on the channel it declared on).
        await self._declare(self.faststream, self._consumers, skip=self._subscribed)
        await self.faststream.start()
        await self._bind(self.faststream, self._consumers)
        for callback in self._on_started:
            await callback(self.connection)
        self._ready.set()
        log.info("broker connected")

    async def _declare(
        self,
        broker: RabbitBroker,
        consumers: Iterable[ConsumerTopology],
        *,
        skip: Iterable[str] = (),
    ) -> None:
        for exchange in self.exchanges:
            await broker.declare_exchange(exchange)
        for consumer in consumers:
            for definition in consumer.queues.every_queue():
                if definition.name not in skip:
                    await broker.declare_queue(definition)

    async def _bind(self, broker: RabbitBroker, consumers: Iterable[ConsumerTopology]) -> None:
        events = self._declared[self.events_exchange]
        for consumer in consumers:
            # FastStream's declarer hands back the queue declared with this definition; bound
            # robustly, so the bindings come back with the connection.
            main = await broker.declare_queue(consumer.queues.main_queue())
            for key in consumer.routing_keys:
                await main.bind(events.name, key)
            log.info("declared %s (%s)", consumer.queues.main, ", ".join(consumer.routing_keys))

    async def publish(self, message: OutgoingMessage) -> None:
        """Publish persistently and wait for the broker's confirm; raises when not confirmed."""
        if not self.is_connected:
            raise ConnectionError("broker not connected")
        amqp = aio_pika.Message(
            body=message.body,
            content_type="application/json",
            delivery_mode=DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            type=message.type,
            headers=message.headers or {},
            timestamp=datetime.now(UTC),
            app_id=self._client_name,
        )
        # Mandatory on the events exchange and straight to a queue (a replay): never on a
        # fanout, whose readers may all be away without anything being lost.
        mandatory = message.exchange in (self.events_exchange, "")
        await self._publish(amqp, message.exchange, message.routing_key, mandatory=mandatory)

    async def forward(
        self, message: AbstractIncomingMessage, queue: str, headers: dict[str, Any]
    ) -> None:
        """Copy a delivery to `queue` through the default exchange and wait for the confirm."""
        amqp = aio_pika.Message(
            body=message.body,
            headers={**(message.headers or {}), **headers},
            content_type=message.content_type,
            delivery_mode=DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            type=message.type,
            timestamp=message.timestamp,
            app_id=message.app_id,
        )
        await self._publish(amqp, "", queue, mandatory=False)

    async def _publish(
        self, amqp: aio_pika.Message, exchange: str, routing_key: str, *, mandatory: bool
    ) -> None:
        result = await self.faststream.publish(
            amqp,  # built in full above: FastStream sends it as it is
            # The declared definition: FastStream finds the exchange it declared by it.
            exchange=self._declared.get(exchange, exchange),
            routing_key=routing_key,
            mandatory=mandatory,
            timeout=PUBLISH_TIMEOUT_SECONDS,
        )
        if isinstance(result, DeliveredMessage):  # a basic.return: nobody took it
            raise Unroutable(exchange, routing_key)

    async def declare_topology(self, consumers: Iterable[ConsumerTopology]) -> None:
        """Declare the exchanges and every given consumer's queues and bindings, then close.

        The step that runs before any service publishes (with the migrations): an event
        published before its consumer first started then waits in that consumer's queue.
        Tries for up to a minute while RabbitMQ is not up yet.
        """
        broker = _faststream_broker(self._url, self._client_name, self._reconnect_interval)
        for attempt in range(30):
            try:
                await broker.connect()
                break
            except Exception as exc:
                if attempt == 29:
                    raise
                log.warning("RabbitMQ unreachable, trying again: %s", exc)
                await asyncio.sleep(2)
        consumers = list(consumers)
        try:
            await self._declare(broker, consumers)
            await self._bind(broker, consumers)
        finally:
            await broker.stop()

    async def queue_stats(self, name: str) -> tuple[int, int]:
        """(messages ready, consumers) of a queue, read with a passive declare."""
        if self.connection is None:
            raise ConnectionError("broker not connected")
        async with self.connection.channel(publisher_confirms=False) as channel:
            queue = await channel.declare_queue(name, passive=True, robust=False)
            result = queue.declaration_result
            return result.message_count or 0, result.consumer_count or 0


def _faststream_broker(url: str, client_name: str, reconnect_interval: float) -> RabbitBroker:
    return RabbitBroker(
        url,
        # aio-pika's own client property, which FastStream's typing does not list.
        client_properties=cast("RabbitClientProperties", {"connection_name": client_name}),
        timeout=5,
        reconnect_interval=reconnect_interval,
        app_id=client_name,
        # Our subscribers take the delivery itself (see `_raw_delivery`): nothing to inject.
        apply_types=False,
        logger=logging.getLogger("booking.runtime.faststream"),
        log_level=_MESSAGE_LOG_LEVEL,
        graceful_timeout=5.0,
    )


# --- pausing a subscriber (FastStream 0.7 has no pause) ----------------------------------------


async def pause_subscriber(subscriber: RabbitSubscriber) -> None:
    """Cancel the subscriber's consumer on its queue, leaving the subscriber running.

    FastStream's own `stop()` first marks the subscriber stopped, and then ignores (never acks
    nor hands back) the deliveries already on their way until the cancel lands: they would stay
    unacked on the channel. Here the subscriber still passes each of them to its handler, which
    hands them back while paused. The robust queue forgets a cancelled consumer, so a reconnect
    does not restore it during the pause.
    """
    queue, tag = subscriber._queue_obj, subscriber._consumer_tag
    subscriber._consumer_tag = None
    if queue is not None and tag is not None:
        with contextlib.suppress(Exception):
            await queue.cancel(tag)


async def resume_subscriber(subscriber: RabbitSubscriber) -> bool:
    """Consume again with the subscriber's own callback; False while its queue is not there
    (the broker was never reached). Raises while the broker is away."""
    queue = subscriber._queue_obj
    if queue is None:
        return False
    if subscriber._consumer_tag is None:
        subscriber._consumer_tag = await queue.consume(
            subscriber.consume,  # type: ignore[arg-type]
            arguments=subscriber.consume_args,
        )
    return True
