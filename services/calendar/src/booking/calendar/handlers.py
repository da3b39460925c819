"""The calendar service's event subscribers."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert

from booking.calendar.domain import BookingStatus, RetrySchedule, google_event_id
from booking.calendar.service import (
    booking_of,
    cancel_booking,
    connection_of,
    lock_mentor,
    missing_connection,
    record_failure,
    unknown_mentor,
)
from booking.calendar.tables import calendar_bookings, mentors
from booking.contracts import MentorIdentityLinked, MentorRegistered, OrderCancelled, OrderPaid
from booking.runtime.consumer import MessageContext

log = logging.getLogger(__name__)

# A step run once the message's transaction has committed: schedule a booking, delete an event.
AfterCommit = Callable[[uuid.UUID], Awaitable[None]]


async def register_mentor(event: MentorRegistered, ctx: MessageContext) -> None:
    """Keep our own record of the mentor (the first registration stands; repeats change nothing)."""
    await ctx.session.execute(
        insert(mentors)
        .values(
            id=event.mentor_id,
            name=event.name,
            email=event.email,
            timezone=event.timezone,
            identity_subject=event.identity_subject,
        )
        .on_conflict_do_nothing(index_elements=[mentors.c.id])
    )


class UnknownMentorLinked(Exception):
    """A link for a mentor whose MentorRegistered has not reached us (yet)."""


async def link_mentor_identity(event: MentorIdentityLinked, ctx: MessageContext) -> None:
    """Keep the mentor's identity-provider subject: the link of the highest sequence stands, so
    a late or replayed older link changes nothing.

    A link for a mentor we do not know raises: the consumer tries again (MentorRegistered is
    usually just behind), then keeps it as a dead letter to replay once the mentor is known.
    """
    applied = await ctx.session.execute(
        update(mentors)
        .where(mentors.c.id == event.mentor_id, mentors.c.identity_sequence < event.sequence)
        .values(identity_subject=event.identity_subject, identity_sequence=event.sequence)
        .returning(mentors.c.id)
    )
    if applied.scalar_one_or_none() is not None:
        log.info("mentor %s is linked to a new identity subject", event.mentor_id)
        return
    known = await ctx.session.scalar(select(mentors.c.id).where(mentors.c.id == event.mentor_id))
    if known is None:
        raise UnknownMentorLinked(
            f"no mentor {event.mentor_id} to link (no MentorRegistered yet); tried again"
        )


async def schedule_session(
    event: OrderPaid, ctx: MessageContext, *, schedule: AfterCommit, retries: RetrySchedule
) -> None:
    """Open the session's calendar booking, and schedule it in Google once committed.

    One booking per session, however often OrderPaid arrives: the session id's primary key
    decides, not a check (a session cancelled first has its tombstone there, and is never
    scheduled). What needs no Google is decided here, in this transaction (an unknown mentor,
    no connection, a revoked one): the first attempt, failed. Otherwise Google is called after
    the commit, never inside it. If that step is lost, the sweeper schedules the booking.
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
        .returning(*calendar_bookings.c)
    )
    row = opened.one_or_none()
    if row is None:
        return  # a repeat (the first OrderPaid scheduled it), or the session was cancelled

    # FOR SHARE: a reconnect in flight (FOR UPDATE) commits first, and then we see it.
    if await lock_mentor(ctx.session, event.mentor_id, share=True):
        missing = missing_connection(await connection_of(ctx.session, event.mentor_id))
    else:
        missing = unknown_mentor(event.mentor_id)
    if missing is None:
        ctx.call_after_commit(lambda: schedule(event.session_id))
        return

    booking = booking_of(row)
    booking.fail(*missing, now, retries)
    await record_failure(ctx.session, ctx.outbox, booking, now)


async def cancel_session(
    event: OrderCancelled, ctx: MessageContext, *, delete: AfterCommit
) -> None:
    """The order ended: its session is never scheduled, and its Google event, if it may have
    one, is deleted once committed (by the run in flight, if one holds the booking; by the
    sweeper, if this step is lost)."""
    now = datetime.now(UTC)
    if await cancel_booking(ctx.session, event, ctx.envelope.correlation_id, now):
        log.info(
            "session %s was cancelled (%s): its event is deleted", event.session_id, event.reason
        )
        ctx.call_after_commit(lambda: delete(event.session_id))
