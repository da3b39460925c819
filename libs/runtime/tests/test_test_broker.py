"""Handlers on FastStream's TestRabbitBroker: the inbox and the handler's transaction, in process.

Where a real broker is not the point. The delivery guarantees themselves (acks after commit,
delay queues, dead letters, the pause) are tested on the real RabbitMQ (test_consumer.py)."""

from __future__ import annotations

import uuid

from booking.devtools.fixtures import deliver, eventually, on_test_broker
from booking.runtime.consumer import MessageContext

from .test_consumer import handled


async def test_a_delivered_event_is_handled_once_whatever_the_redeliveries(make_service, new_event):
    service = await make_service(start=False)
    runtime, event = service.runtime, new_event()
    async with on_test_broker(runtime):
        message_id = await deliver(runtime, event)
        await eventually(
            lambda: service.effect_count(str(event.mentor_id)), what="the event handled"
        )
        await deliver(runtime, event, message_id=message_id)  # the same message again
        await eventually(
            lambda: handled(runtime.consumer.name, "MentorRegistered", "duplicate") == 1,
            what="the redelivery recognised as a duplicate",
        )
    assert await service.effect_count(str(event.mentor_id)) == 1


async def test_a_handler_records_its_events_in_its_own_transaction(make_service, new_event):
    seen: list[tuple[uuid.UUID, str]] = []

    async def forward(event, ctx: MessageContext) -> None:
        seen.append((ctx.envelope.message_id, ctx.envelope.correlation_id))
        await ctx.record(new_event("caused"))

    service = await make_service(forward, start=False)
    async with on_test_broker(service.runtime):
        message_id = await deliver(service.runtime, new_event(), correlation_id="booking-42")
        await eventually(lambda: service.unsent(), what="the caused event in the outbox")
    assert seen == [(message_id, "booking-42")]
    outbox = service.tables.outbox
    async with service.db.engine.connect() as conn:
        [row] = (await conn.execute(outbox.select())).all()
    assert row.correlation_id == "booking-42"  # the chain carries on
