"""Topology before traffic: a service's queues exist before it ever starts."""

from __future__ import annotations

import aio_pika
from aiormq.abc import DeliveredMessage

from booking.devtools.fixtures import eventually

from .test_consumer import envelope_bytes


async def test_an_event_published_before_its_consumer_first_starts_waits_for_it(
    make_service, new_event, rabbitmq_url
):
    service = await make_service(start=False)
    # The step `python -m booking.<service> migrate` runs before any service publishes.
    await service.runtime.declare_topology()
    queues = service.runtime.consumer.queues

    event = new_event()
    _, body = envelope_bytes(event)
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(service.settings.events_exchange)
        # Mandatory, as the relay publishes: a message no queue took would come back.
        result = await exchange.publish(
            aio_pika.Message(body=body), event.routing_key(), mandatory=True
        )
        assert not isinstance(result, DeliveredMessage), "the event was returned: no queue"
        for name in (queues.dead_letter, queues.retry(1)):
            await channel.declare_queue(name, passive=True)  # each exists already
        main = await channel.declare_queue(queues.main, passive=True)
        assert main.declaration_result.message_count == 1  # waiting for its consumer

    await service.runtime.start()
    await eventually(
        lambda: service.effect_count(str(event.mentor_id)),
        what="the event handled once its consumer started",
    )
