"""The calendar service's event subscribers."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert

from booking.calendar.domain import BookingStatus, google_event_id
from booking.calendar.service import (
    connection_of,
    failure_event_id,
    lock_mentor,
    missing_connection,
)
from booking.calendar.tables import calendar_bookings, mentors
from booking.contracts import (
    CalendarBookingFailed,
    CalendarFailureReason,
    MentorRegistered,
    OrderPaid,
)
from booking.runtime.consumer import MessageContext

Schedule = Callable[[uuid.UUID], Awaitable[None]]


async def register_mentor(event: MentorRegistered, ctx: MessageContext) -> None:
    """Keep our own record of the mentor (the first registration stands; repeats change nothing)."""
    await ctx.session.execute(
        insert(mentors)
        .values(
            id=event.mentor_id,
            name=event.name,
            email=event.email,
            timezone=event.timezone,
        )
        .on_conflict_do_nothing(index_elements=[mentors.c.id])
    )


async def schedule_session(event: OrderPaid, ctx: MessageContext, *, schedule: Schedule) -> None:
    """Open the session's calendar booking, and schedule it in Google once committed.

    One booking per session, however often OrderPaid arrives: the session id's primary key
    decides, not a check. What needs no Google is decided here, in this transaction (an unknown
    mentor, no connection, a revoked one); otherwise Google is called after the commit, never
    inside it. If that step is lost, the sweeper schedules the booking.
    """
    now = datetime.now(UTC)
    opened = await ctx.session.execute(
        insert(calendar_bookings)
        .values(
            session_id=event.session_id,
            order_id=event.order_id,
            mentor_id=event.mentor_id,
            mentee_email=event.mentee_email,
            title=event.title,
            start_at=event.start_at,
            end_at=event.end_at,
            event_id=google_event_id(event.session_id),
            status=BookingStatus.PENDING.value,
            attempts=0,
            correlation_id=ctx.envelope.correlation_id,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=[calendar_bookings.c.session_id])
        .returning(calendar_bookings.c.session_id)
    )
    if opened.scalar_one_or_none() is None:
        return  # a repeat: the first OrderPaid scheduled it

    # FOR SHARE: a reconnect in flight (FOR UPDATE) commits first, and then we see it.
    if await lock_mentor(ctx.session, event.mentor_id, share=True):
        missing = missing_connection(await connection_of(ctx.session, event.mentor_id))
    else:
        missing = (
            CalendarFailureReason.STORE_NOT_FOUND,
            f"the calendar service knows no mentor {event.mentor_id} (no MentorRegistered)",
        )
    if missing is None:
        ctx.call_after_commit(lambda: schedule(event.session_id))
        return

    reason, detail = missing
    await ctx.session.execute(
        update(calendar_bookings)
        .where(calendar_bookings.c.session_id == event.session_id)
        .values(status=BookingStatus.FAILED.value, reason=reason.value, detail=detail, attempts=1)
    )
    await ctx.record(
        CalendarBookingFailed(
            session_id=event.session_id,
            order_id=event.order_id,
            mentor_id=event.mentor_id,
            reason=reason,
            detail=detail,
            attempts=1,
        ),
        message_id=failure_event_id(event.session_id, 1),
    )
