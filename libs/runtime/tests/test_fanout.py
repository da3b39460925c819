"""The fanouts: declared with the topology, published to without `mandatory` (nobody listening
loses nothing), and read whole by a queue of each process's own (`FanoutQueue`)."""

from __future__ import annotations

import uuid
from typing import Any

import aio_pika
import pytest

from booking.devtools.fixtures import eventually
from booking.runtime.broker import Broker, OutgoingMessage, Unroutable
from booking.runtime.fanout import FanoutQueue


def message(exchange: str) -> OutgoingMessage:
    return OutgoingMessage(
        body=b"{}", exchange=exchange, routing_key="orders.order_changed", message_id="m-1"
    )


@pytest.fixture
async def broker(make_settings, rabbitmq_url: str):
    settings = make_settings()
    broker = Broker(
        rabbitmq_url,
        client_name=f"fanout-test-{uuid.uuid4().hex[:6]}",
        events_exchange=settings.events_exchange,
        alerts_exchange=settings.admin_alerts_exchange,
        reconnect_interval=0.3,
    )
    broker.declare_fanout(settings.order_changes_exchange)
    yield broker, settings
    await broker.stop()


class TestPublishing:
    async def test_a_fanout_nobody_reads_takes_the_message_the_events_exchange_does_not(
        self, broker: Any
    ) -> None:
        broker, settings = broker
        broker.start()
        await broker.wait_ready(timeout=15)
        # No queue on either: the fanout is not mandatory, the events exchange is.
        await broker.publish(message(settings.order_changes_exchange))
        await broker.publish(message(settings.admin_alerts_exchange))
        with pytest.raises(Unroutable):
            await broker.publish(message(settings.events_exchange))

    async def test_the_topology_step_declares_the_fanout(self, broker: Any, rabbitmq_url) -> None:
        broker, settings = broker
        await broker.declare_topology([])
        async with await aio_pika.connect(rabbitmq_url) as connection:
            channel = await connection.channel()
            # Raises when it is not there.
            await channel.declare_exchange(settings.order_changes_exchange, passive=True)


class TestFanoutQueue:
    async def test_every_message_reaches_the_process_and_no_gap_is_reported_at_first(
        self, broker: Any
    ) -> None:
        broker, settings = broker
        exchange = settings.order_changes_exchange
        taken: list[bytes] = []
        gaps: list[bool] = []

        async def take(delivery: Any) -> None:
            taken.append(delivery.body)

        queue = FanoutQueue(
            broker, exchange, take=take, on_gap=lambda: gaps.append(True), name="test feed"
        )
        broker.on_started(queue.attach)
        broker.start()
        await broker.wait_ready(timeout=15)
        assert queue.consuming and queue.queue_name is not None
        assert queue.queue_name.startswith(exchange)

        await broker.publish(message(exchange))
        await eventually(lambda: taken == [b"{}"], what="the message taken")
        observation = await queue.check("test-feed", "nothing")
        assert (observation.status, observation.observed_value) == ("pass", 1)
        assert gaps == []

        await queue.stop()
        assert not queue.consuming
