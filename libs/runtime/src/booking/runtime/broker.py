"""RabbitMQ: the connection, the topology (docs/recovery.md), and confirmed publishing.

aio-pika is used directly (FastStream documents the contracts, see booking.contracts.asyncapi):
the consumer needs full control over acks, retry routing and one queue bound to many keys.

Publishing on the events exchange (and straight to a queue) is mandatory: an event no queue is
bound to comes back from the broker as `Unroutable` instead of vanishing, and stays in the
outbox. The admin alerts fanout is not: with no gateway listening nothing is lost, since the
alerts are stored by the notifications service.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import (
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
    DeliveryMode,
    ExchangeType,
)
from aiormq.abc import DeliveredMessage

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_SECONDS = 10.0


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
    headers: dict | None = None


class Broker:
    """One robust connection per process, a confirming channel for publishing.

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
        self.connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractRobustChannel | None = None
        self._on_connected: list[Callable[[AbstractRobustConnection], Awaitable[None]]] = []
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None

    def on_connected(self, callback: Callable[[AbstractRobustConnection], Awaitable[None]]) -> None:
        """Run `callback` once the first connection is up (aio-pika restores it on reconnects)."""
        self._on_connected.append(callback)

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
            await self.connection.close()

    async def _connect_until_up(self) -> None:
        delay = 0.2
        while True:
            try:
                self.connection = await aio_pika.connect_robust(
                    self._url,
                    timeout=5,
                    reconnect_interval=self._reconnect_interval,
                    client_properties={"connection_name": self._client_name},
                )
                break
            except Exception as exc:
                log.warning("broker unreachable, retrying in %.1fs: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._reconnect_interval * 2)
        self._publish_channel = await self.connection.channel(publisher_confirms=True)
        await self.declare_exchanges(self._publish_channel)
        for callback in self._on_connected:
            await callback(self.connection)
        self._ready.set()
        log.info("broker connected")

    async def declare_exchanges(self, channel: AbstractRobustChannel) -> None:
        await channel.declare_exchange(self.events_exchange, ExchangeType.TOPIC, durable=True)
        await channel.declare_exchange(self.alerts_exchange, ExchangeType.FANOUT, durable=True)

    async def publish(self, message: OutgoingMessage) -> None:
        """Publish persistently and wait for the broker's confirm; raises when not confirmed."""
        if not self.is_connected or self._publish_channel is None:
            raise ConnectionError("broker not connected")
        channel = self._publish_channel
        exchange = (
            channel.default_exchange
            if message.exchange == ""
            else await channel.get_exchange(message.exchange, ensure=False)
        )
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
        mandatory = message.exchange != self.alerts_exchange
        result = await exchange.publish(
            amqp, message.routing_key, mandatory=mandatory, timeout=PUBLISH_TIMEOUT_SECONDS
        )
        if isinstance(result, DeliveredMessage):  # a basic.return: nobody took it
            raise Unroutable(message.exchange, message.routing_key)

    async def declare_consumer(
        self,
        channel: AbstractRobustChannel,
        queues: ConsumerQueues,
        routing_keys: Iterable[str],
    ) -> AbstractQueue:
        """Main quorum queue bound to `routing_keys`, its delay queues and its dead-letter queue."""
        await self.declare_exchanges(channel)
        await channel.declare_queue(
            queues.dead_letter, durable=True, arguments={"x-queue-type": "quorum"}
        )
        for attempt, delay_ms in enumerate(queues.retry_delays_ms, start=1):
            # A delay queue has no consumer: messages wait out the TTL, then dead-letter back
            # into the main queue through the default exchange.
            await channel.declare_queue(
                queues.retry(attempt),
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-message-ttl": delay_ms,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": queues.main,
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                },
            )
        main = await channel.declare_queue(
            queues.main,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                # A message that kills the consumer before it can ack (so never reaches our own
                # retry path) is still dead-lettered after this many deliveries.
                "x-delivery-limit": max(queues.max_attempts * 2, 10),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": queues.dead_letter,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
        for key in routing_keys:
            await main.bind(self.events_exchange, key)
        return main

    async def declare_topology(self, consumers: Iterable[tuple[ConsumerQueues, Iterable[str]]]):
        """Declare the exchanges and every given consumer's queues and bindings, then close.

        The step that runs before any service publishes (with the migrations): an event
        published before its consumer first started then waits in that consumer's queue.
        Tries for up to a minute while RabbitMQ is not up yet.
        """
        connection = None
        for attempt in range(30):
            try:
                connection = await aio_pika.connect(
                    self._url, timeout=5, client_properties={"connection_name": self._client_name}
                )
                break
            except Exception as exc:
                if attempt == 29:
                    raise
                log.warning("RabbitMQ unreachable, trying again: %s", exc)
                await asyncio.sleep(2)
        assert connection is not None
        async with connection:
            channel = await connection.channel()
            await self.declare_exchanges(channel)  # type: ignore[arg-type]
            for queues, routing_keys in consumers:
                await self.declare_consumer(channel, queues, routing_keys)  # type: ignore[arg-type]

    async def queue_stats(self, name: str) -> tuple[int, int]:
        """(messages ready, consumers) of a queue, read with a passive declare."""
        if self.connection is None:
            raise ConnectionError("broker not connected")
        async with self.connection.channel(publisher_confirms=False) as channel:
            queue = await channel.declare_queue(name, passive=True, robust=False)
            result = queue.declaration_result
            return result.message_count or 0, result.consumer_count or 0
