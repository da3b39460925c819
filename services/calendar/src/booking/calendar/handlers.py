"""The calendar service's event subscribers: each event becomes one call of the service, in the
message's transaction (its inbox record and outbox rows commit with it).

Google is never called inside that transaction: what needs it (scheduling a paid session,
deleting a cancelled one's event) runs once the message is committed, and the sweeper finishes
it if that step is lost.
"""

from __future__ import annotations

from booking.calendar.service import CalendarService
from booking.contracts import (
    Event,
    MentorIdentityLinked,
    MentorRegistered,
    OrderCancelled,
    OrderPaid,
)
from booking.runtime.consumer import Handler, MessageContext


def subscribers(service: CalendarService) -> dict[type[Event], Handler]:
    """The events calendar consumes, each with the handler that turns it into a service call."""

    async def register_mentor(event: MentorRegistered, ctx: MessageContext) -> None:
        await service.register_mentor(ctx.session, event)

    async def link_mentor_identity(event: MentorIdentityLinked, ctx: MessageContext) -> None:
        await service.link_identity(ctx.session, event)

    async def schedule_session(event: OrderPaid, ctx: MessageContext) -> None:
        if await service.open_booking(ctx.session, event, ctx.envelope.correlation_id):
            ctx.call_after_commit(lambda: service.schedule(event.session_id))

    async def cancel_session(event: OrderCancelled, ctx: MessageContext) -> None:
        if await service.cancel_booking(ctx.session, event, ctx.envelope.correlation_id):
            ctx.call_after_commit(lambda: service.delete_owed(event.session_id))

    return {
        MentorRegistered: register_mentor,
        MentorIdentityLinked: link_mentor_identity,
        OrderPaid: schedule_session,
        OrderCancelled: cancel_session,
    }
