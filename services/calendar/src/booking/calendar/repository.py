"""The calendar schema as the use cases see it: mentors, their Google connections, consent
states, bookings and their attempts. All of calendar's SQL is here, and the mapping between
rows and the domain's objects or the small records below.

Nothing here commits: every function works in the session of its caller's unit of work (a
transaction the service opened, or the one a handler's message runs in).

A booking's row lock (`lock_booking`) and its lease (`claimed_until`, stamped by the claims)
are how runs, the sweeper and cancellations take turns on a booking; the mentor's row lock
(`lock_mentor`) orders a reconnect against a failure for lack of a connection. The service's
docstring tells the whole story.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Row, Text, Uuid, column, delete, select, update, values
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from booking.calendar.domain import RECOVERABLE, BookingStatus, CalendarBooking, google_event_id
from booking.calendar.tables import (
    calendar_bookings,
    connections,
    mentors,
    oauth_states,
    scheduling_attempts,
)
from booking.contracts import CalendarFailureReason, OrderPaid

bookings = calendar_bookings.c


@dataclass(frozen=True, slots=True)
class Connection:
    """A mentor's stored connection, with what scheduling needs of the mentor."""

    mentor_id: uuid.UUID
    timezone: str
    calendar_id: str
    refresh_token_encrypted: str
    connected_at: datetime
    revoked_at: datetime | None

    @property
    def working(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True, slots=True)
class ClaimedBooking:
    """A booking as a run took it under its lease: what the run needs to ask Google, and the
    lease it holds (`claimed_until`, its token: only its holder settles what it claimed)."""

    session_id: uuid.UUID
    order_id: uuid.UUID
    mentor_id: uuid.UUID
    event_id: str
    attempts: int
    correlation_id: str
    claimed_until: datetime
    # The session as OrderPaid told it; None in a tombstone (cancelled before it was paid).
    title: str | None
    mentee_email: str | None
    start_at: datetime | None
    end_at: datetime | None


@dataclass(frozen=True, slots=True)
class TrackedBooking:
    """A booking, and the correlation id every event about it carries."""

    booking: CalendarBooking
    correlation_id: str


# -- rows <-> the domain -------------------------------------------------------------------------


def booking_of(row: Row[Any]) -> CalendarBooking:
    """The domain's view of a `calendar_bookings` row."""
    return CalendarBooking(
        session_id=row.session_id,
        order_id=row.order_id,
        mentor_id=row.mentor_id,
        status=BookingStatus(row.status),
        attempts=row.attempts,
        updated_at=row.updated_at,
        reason=CalendarFailureReason(row.reason) if row.reason else None,
        detail=row.detail,
        event_id=row.event_id,
        meet_link=row.meet_link,
        html_link=row.html_link,
        start_at=row.start_at,
        schedule_failures=row.schedule_failures,
        final=row.final,
        next_attempt_at=row.next_attempt_at,
        event_delete_pending=row.event_delete_pending,
    )


def _claimed(row: Row[Any]) -> ClaimedBooking:
    return ClaimedBooking(
        session_id=row.session_id,
        order_id=row.order_id,
        mentor_id=row.mentor_id,
        event_id=row.event_id,
        attempts=row.attempts,
        correlation_id=row.correlation_id,
        claimed_until=row.claimed_until,
        title=row.title,
        mentee_email=row.mentee_email,
        start_at=row.start_at,
        end_at=row.end_at,
    )


def _stored(booking: CalendarBooking) -> dict[str, Any]:
    """The columns of a `calendar_bookings` row the domain may change."""
    return {
        "status": booking.status.value,
        "reason": booking.reason.value if booking.reason else None,
        "detail": booking.detail,
        "event_id": booking.event_id,
        "meet_link": booking.meet_link,
        "html_link": booking.html_link,
        "attempts": booking.attempts,
        "schedule_failures": booking.schedule_failures,
        "final": booking.final,
        "next_attempt_at": booking.next_attempt_at,
        "event_delete_pending": booking.event_delete_pending,
        "updated_at": booking.updated_at,
    }


# -- mentors -------------------------------------------------------------------------------------


async def add_mentor(
    session: AsyncSession,
    *,
    mentor_id: uuid.UUID,
    name: str,
    email: str,
    timezone: str,
    identity_subject: str | None,
) -> None:
    """Keep the mentor as first registered: a repeat changes nothing."""
    await session.execute(
        insert(mentors)
        .values(
            id=mentor_id,
            name=name,
            email=email,
            timezone=timezone,
            identity_subject=identity_subject,
        )
        .on_conflict_do_nothing(index_elements=[mentors.c.id])
    )


async def link_identity(
    session: AsyncSession, mentor_id: uuid.UUID, subject: str, sequence: int
) -> bool:
    """Set the mentor's identity subject if `sequence` is above the one it came with; whether
    it was set (False: an older link, or an unknown mentor)."""
    applied = await session.execute(
        update(mentors)
        .where(mentors.c.id == mentor_id, mentors.c.identity_sequence < sequence)
        .values(identity_subject=subject, identity_sequence=sequence)
        .returning(mentors.c.id)
    )
    return applied.scalar_one_or_none() is not None


async def mentor_known(session: AsyncSession, mentor_id: uuid.UUID) -> bool:
    found = await session.scalar(select(mentors.c.id).where(mentors.c.id == mentor_id))
    return found is not None


async def lock_mentor(session: AsyncSession, mentor_id: uuid.UUID, *, share: bool) -> bool:
    """Take the mentor's row lock (FOR SHARE or FOR UPDATE); False if the mentor is unknown."""
    query = select(mentors.c.id).where(mentors.c.id == mentor_id).with_for_update(read=share)
    return (await session.execute(query)).scalar_one_or_none() is not None


async def mentor_email(session: AsyncSession, mentor_id: uuid.UUID) -> str | None:
    """The mentor's email; None if the mentor is unknown."""
    email: str | None = await session.scalar(
        select(mentors.c.email).where(mentors.c.id == mentor_id)
    )
    return email


async def identity_subject(session: AsyncSession, mentor_id: uuid.UUID) -> str | None:
    """The identity-provider subject of the mentor; None if none or the mentor is unknown."""
    subject: str | None = await session.scalar(
        select(mentors.c.identity_subject).where(mentors.c.id == mentor_id)
    )
    return subject


# -- connections ---------------------------------------------------------------------------------


def _connection_columns() -> tuple[Any, ...]:
    return (
        connections.c.mentor_id,
        mentors.c.timezone,
        connections.c.calendar_id,
        connections.c.refresh_token_encrypted,
        connections.c.connected_at,
        connections.c.revoked_at,
    )


def _connection(row: Row[Any]) -> Connection:
    return Connection(
        mentor_id=row.mentor_id,
        timezone=row.timezone,
        calendar_id=row.calendar_id,
        refresh_token_encrypted=row.refresh_token_encrypted,
        connected_at=row.connected_at,
        revoked_at=row.revoked_at,
    )


async def connection_of(session: AsyncSession, mentor_id: uuid.UUID) -> Connection | None:
    query = (
        select(*_connection_columns())
        .join(mentors, mentors.c.id == connections.c.mentor_id)
        .where(connections.c.mentor_id == mentor_id)
    )
    row = (await session.execute(query)).one_or_none()
    return _connection(row) if row is not None else None


async def mentor_standing(
    session: AsyncSession, mentor_id: uuid.UUID
) -> tuple[bool, Connection | None]:
    """Whether we know the mentor, and their connection if they have one (one query)."""
    query = (
        select(mentors.c.id.label("known"), *_connection_columns())
        .outerjoin(connections, connections.c.mentor_id == mentors.c.id)
        .where(mentors.c.id == mentor_id)
    )
    row = (await session.execute(query)).one_or_none()
    if row is None:
        return False, None
    if row.mentor_id is None:
        return True, None
    return True, _connection(row)


async def store_connection(
    session: AsyncSession,
    mentor_id: uuid.UUID,
    *,
    refresh_token_encrypted: str,
    scope: str | None,
    connected_at: datetime,
) -> str:
    """The mentor's connection, new or replacing theirs (working again); its calendar id."""
    stored = await session.execute(
        insert(connections)
        .values(
            mentor_id=mentor_id,
            refresh_token_encrypted=refresh_token_encrypted,
            scope=scope,
            connected_at=connected_at,
            revoked_at=None,
        )
        .on_conflict_do_update(
            index_elements=[connections.c.mentor_id],
            set_={
                "refresh_token_encrypted": refresh_token_encrypted,
                "scope": scope,
                "connected_at": connected_at,
                "revoked_at": None,
            },
        )
        .returning(connections.c.calendar_id)
    )
    calendar_id: str = stored.scalar_one()
    return calendar_id


async def delete_connection(session: AsyncSession, mentor_id: uuid.UUID) -> None:
    await session.execute(delete(connections).where(connections.c.mentor_id == mentor_id))


async def mark_revoked(
    session: AsyncSession, mentor_id: uuid.UUID, connected_at: datetime, now: datetime
) -> None:
    """Google refused the connection made at `connected_at`: revoked, unless the mentor has
    connected again since (a newer connection is not the one refused)."""
    await session.execute(
        update(connections)
        .where(
            connections.c.mentor_id == mentor_id,
            connections.c.connected_at == connected_at,
            connections.c.revoked_at.is_(None),
        )
        .values(revoked_at=now)
    )


# -- consent states ------------------------------------------------------------------------------


async def add_state(
    session: AsyncSession,
    *,
    nonce: str,
    mentor_id: uuid.UUID,
    expires_at: datetime,
    created_at: datetime,
) -> None:
    await session.execute(
        oauth_states.insert().values(
            nonce=nonce, mentor_id=mentor_id, expires_at=expires_at, created_at=created_at
        )
    )


async def spend_state(
    session: AsyncSession, nonce: str, mentor_id: uuid.UUID, now: datetime
) -> bool:
    """Mark the state used, if it is unused and unexpired: a conditional UPDATE, never a check
    and then a set. Whether this call spent it."""
    spent = await session.execute(
        update(oauth_states)
        .where(
            oauth_states.c.nonce == nonce,
            oauth_states.c.mentor_id == mentor_id,
            oauth_states.c.used_at.is_(None),
            oauth_states.c.expires_at > now,
        )
        .values(used_at=now)
        .returning(oauth_states.c.nonce)
    )
    return spent.scalar_one_or_none() is not None


async def state_used_at(session: AsyncSession, nonce: str) -> datetime | None:
    """When the state was spent; None if it was not, or is not ours."""
    used_at: datetime | None = await session.scalar(
        select(oauth_states.c.used_at).where(oauth_states.c.nonce == nonce)
    )
    return used_at


async def prune_states(session: AsyncSession, expired_before: datetime) -> int:
    """Delete the states that expired before then; how many."""
    pruned = await session.execute(
        delete(oauth_states)
        .where(oauth_states.c.expires_at < expired_before)
        .returning(oauth_states.c.nonce)
    )
    return len(pruned.all())


# -- bookings ------------------------------------------------------------------------------------


async def open_booking(
    session: AsyncSession, event: OrderPaid, correlation_id: str, now: datetime
) -> CalendarBooking | None:
    """The paid session's booking, pending; None if the session has one already (a repeat, or
    its tombstone): the primary key decides, not a check."""
    opened = await session.execute(
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
            correlation_id=correlation_id,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=[bookings.session_id])
        .returning(*calendar_bookings.c)
    )
    row = opened.one_or_none()
    return booking_of(row) if row is not None else None


async def add_tombstone(
    session: AsyncSession,
    *,
    session_id: uuid.UUID,
    order_id: uuid.UUID,
    mentor_id: uuid.UUID,
    detail: str,
    correlation_id: str,
    now: datetime,
) -> bool:
    """A cancelled booking that takes the session's key before any OrderPaid; False if the
    session has a booking already."""
    tombstone = await session.execute(
        insert(calendar_bookings)
        .values(
            session_id=session_id,
            order_id=order_id,
            mentor_id=mentor_id,
            event_id=google_event_id(session_id),
            status=BookingStatus.CANCELLED.value,
            detail=detail,
            attempts=0,
            correlation_id=correlation_id,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=[bookings.session_id])
        .returning(bookings.session_id)
    )
    return tombstone.scalar_one_or_none() is not None


async def lock_booking(session: AsyncSession, session_id: uuid.UUID) -> TrackedBooking | None:
    """The booking under its row lock, until the transaction ends; None if there is none."""
    row = (
        await session.execute(
            select(calendar_bookings).where(bookings.session_id == session_id).with_for_update()
        )
    ).one_or_none()
    if row is None:
        return None
    return TrackedBooking(booking_of(row), row.correlation_id)


async def save_booking(
    session: AsyncSession, booking: CalendarBooking, *, release: bool = False
) -> None:
    """Write what the domain changed of the booking; `release`: its lease too."""
    changes = _stored(booking)
    if release:
        changes["claimed_until"] = None
    await session.execute(
        update(calendar_bookings).where(bookings.session_id == booking.session_id).values(**changes)
    )


async def put_off(session: AsyncSession, booking: CalendarBooking, until: datetime) -> None:
    """A run that found its event without a Meet link: its count, and its lease until then."""
    await session.execute(
        update(calendar_bookings)
        .where(bookings.session_id == booking.session_id)
        .values(attempts=booking.attempts, updated_at=booking.updated_at, claimed_until=until)
    )


async def release(session: AsyncSession, session_id: uuid.UUID, now: datetime) -> None:
    """Give the booking's lease up, leaving it as it is (pending: anyone may claim it)."""
    await session.execute(
        update(calendar_bookings)
        .where(bookings.session_id == session_id)
        .values(claimed_until=None, updated_at=now)
    )


async def record_attempt(
    session: AsyncSession,
    booking: CalendarBooking,
    outcome: str,
    now: datetime,
    *,
    detail: str | None = None,
) -> None:
    """The booking's latest attempt (numbered by its count), as it ended."""
    failed = outcome == "failed"
    await session.execute(
        scheduling_attempts.insert().values(
            session_id=booking.session_id,
            attempt=booking.attempts,
            at=now,
            outcome=outcome,
            reason=booking.reason.value if failed and booking.reason else None,
            detail=booking.detail if failed else detail,
            final=booking.final,
            next_attempt_at=booking.next_attempt_at,
        )
    )


async def reopen_bookings(
    session: AsyncSession, mentor_id: uuid.UUID, now: datetime
) -> list[uuid.UUID]:
    """The mentor's bookings that wait for a working connection: pending again; their sessions.
    Not the final ones: their session has begun, or an admin has them."""
    reopened = await session.execute(
        update(calendar_bookings)
        .where(
            bookings.mentor_id == mentor_id,
            bookings.status == BookingStatus.FAILED.value,
            bookings.final.is_(False),
            bookings.reason.in_([reason.value for reason in RECOVERABLE]),
        )
        .values(
            status=BookingStatus.PENDING.value,
            reason=None,
            detail=None,
            next_attempt_at=None,
            claimed_until=None,
            updated_at=now,
        )
        .returning(bookings.session_id)
    )
    return list(reopened.scalars())


async def lock_waiting(session: AsyncSession, now: datetime, limit: int) -> list[TrackedBooking]:
    """Bookings still waiting for a reconnect when their session began (at most `limit`, by
    start), under their row locks; those another replica holds are skipped."""
    waiting = (
        select(calendar_bookings)
        .where(
            bookings.status == BookingStatus.FAILED.value,
            bookings.final.is_(False),
            bookings.next_attempt_at.is_(None),
            bookings.reason.in_([reason.value for reason in RECOVERABLE]),
            bookings.start_at <= now,
        )
        .order_by(bookings.start_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    rows = (await session.execute(waiting)).all()
    return [TrackedBooking(booking_of(row), row.correlation_id) for row in rows]


# -- leases: the claims --------------------------------------------------------------------------


# A lease may be taken when nobody holds one, or the one held has lapsed.
def _unclaimed(now: datetime) -> Any:
    return bookings.claimed_until.is_(None) | (bookings.claimed_until < now)


async def claim_pending(
    session: AsyncSession, session_id: uuid.UUID, now: datetime, until: datetime
) -> ClaimedBooking | None:
    """A pending booking's lease, unless another run holds it; None if not taken."""
    return await _claim_one(
        session, session_id, now, until, bookings.status == BookingStatus.PENDING.value
    )


async def claim_retried(
    session: AsyncSession, booking: CalendarBooking, until: datetime
) -> ClaimedBooking:
    """The booking an admin retries, as `retry` left it, under a lease until then."""
    claimed = await session.execute(
        update(calendar_bookings)
        .where(bookings.session_id == booking.session_id)
        .values(**_stored(booking), claimed_until=until)
        .returning(*calendar_bookings.c)
    )
    return _claimed(claimed.one())


async def claim_deletion(
    session: AsyncSession, session_id: uuid.UUID, now: datetime, until: datetime
) -> ClaimedBooking | None:
    """A cancelled booking's owed delete, unless a run holds its lease; None if not taken."""
    return await _claim_one(
        session,
        session_id,
        now,
        until,
        bookings.status == BookingStatus.CANCELLED.value,
        bookings.event_delete_pending.is_(True),
    )


async def _claim_one(
    session: AsyncSession,
    session_id: uuid.UUID,
    now: datetime,
    until: datetime,
    *where: ColumnElement[bool],
) -> ClaimedBooking | None:
    """One booking's lease until `until`, if it matches `where` and no run holds it."""
    claim = (
        update(calendar_bookings)
        .where(bookings.session_id == session_id, *where, _unclaimed(now))
        .values(claimed_until=until)
        .returning(*calendar_bookings.c)
    )
    row = (await session.execute(claim)).one_or_none()
    return _claimed(row) if row is not None else None


async def take_over_deletion(
    session: AsyncSession, session_id: uuid.UUID, now: datetime, until: datetime
) -> ClaimedBooking:
    """A run whose booking was cancelled meanwhile owes its event a delete, under a new lease
    (the caller holds the booking's row lock)."""
    owed = await session.execute(
        update(calendar_bookings)
        .where(bookings.session_id == session_id)
        .values(event_delete_pending=True, claimed_until=until, updated_at=now)
        .returning(*calendar_bookings.c)
    )
    return _claimed(owed.one())


async def settle_deletion(session: AsyncSession, claim: ClaimedBooking, now: datetime) -> bool:
    """Nothing more to delete, if `claim`'s lease still holds; whether it did."""
    settled = await session.execute(
        update(calendar_bookings)
        .where(
            bookings.session_id == claim.session_id,
            bookings.claimed_until == claim.claimed_until,
        )
        .values(event_delete_pending=False, claimed_until=None, updated_at=now)
        .returning(bookings.session_id)
    )
    return settled.scalar_one_or_none() is not None


# The sweeper's claims: FOR UPDATE SKIP LOCKED, and the lease stamped in the same statement, so
# replicas never take the same booking.


async def claim_lapsed(
    session: AsyncSession, now: datetime, grace: timedelta, until: datetime, limit: int
) -> list[ClaimedBooking]:
    """Pending bookings whose lease lapsed, or that nobody claimed within `grace`."""
    return await _claim(
        session,
        (
            bookings.status == BookingStatus.PENDING.value,
            (bookings.claimed_until.is_(None) & (bookings.updated_at <= now - grace))
            | (bookings.claimed_until < now),
        ),
        oldest_first=bookings.updated_at,
        limit=limit,
        stamp={"claimed_until": until},
    )


async def claim_due(
    session: AsyncSession, now: datetime, until: datetime, limit: int
) -> list[ClaimedBooking]:
    """Failed bookings whose next attempt on the schedule is due: pending again, under the
    claimer's lease (the run's outcome is then recorded as any other)."""
    return await _claim(
        session,
        (
            bookings.status == BookingStatus.FAILED.value,
            bookings.final.is_(False),
            bookings.next_attempt_at <= now,
        ),
        oldest_first=bookings.next_attempt_at,
        limit=limit,
        stamp={
            "status": BookingStatus.PENDING.value,
            "reason": None,
            "detail": None,
            "next_attempt_at": None,
            "claimed_until": until,
            "updated_at": now,
        },
    )


async def claim_deletions(
    session: AsyncSession, now: datetime, until: datetime, limit: int
) -> list[ClaimedBooking]:
    """Cancelled bookings whose Google event is owed a delete and that no run holds (a run
    still inserting holds the lease: its delete would come before the event)."""
    return await _claim(
        session,
        (
            bookings.event_delete_pending.is_(True),
            bookings.status == BookingStatus.CANCELLED.value,
            _unclaimed(now),
        ),
        oldest_first=bookings.updated_at,
        limit=limit,
        stamp={"claimed_until": until},
    )


async def _claim(
    session: AsyncSession,
    where: tuple[ColumnElement[bool], ...],
    *,
    oldest_first: ColumnElement[Any],
    limit: int,
    stamp: dict[str, Any],
) -> list[ClaimedBooking]:
    """Up to `limit` bookings matching `where`, oldest first, locked past those another replica
    holds, and stamped with `stamp` in the same statement."""
    chosen = (
        select(bookings.session_id)
        .where(*where)
        .order_by(oldest_first)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    claim = (
        update(calendar_bookings)
        .where(bookings.session_id.in_(chosen.scalar_subquery()))
        .values(**stamp)
        .returning(*calendar_bookings.c)
    )
    return [_claimed(row) for row in (await session.execute(claim)).all()]


# -- refresh tokens at rest ----------------------------------------------------------------------


async def stored_tokens(
    session: AsyncSession, after: uuid.UUID | None, limit: int
) -> list[tuple[uuid.UUID, str]]:
    """Up to `limit` connections' (mentor id, stored token), by mentor id, after `after`."""
    query = (
        select(connections.c.mentor_id, connections.c.refresh_token_encrypted)
        .order_by(connections.c.mentor_id)
        .limit(limit)
    )
    if after is not None:
        query = query.where(connections.c.mentor_id > after)
    found = await session.execute(query)
    return [(row.mentor_id, row.refresh_token_encrypted) for row in found]


async def store_rotated(session: AsyncSession, changes: list[tuple[uuid.UUID, str, str]]) -> int:
    """Write the re-encrypted tokens (mentor id, old, new) where the row still holds the old
    one (a mentor who reconnected meanwhile keeps the token just stored); how many were."""
    rotated = values(
        column("mentor_id", Uuid), column("old", Text), column("new", Text), name="rotated"
    ).data(changes)
    written = await session.execute(
        update(connections)
        .where(
            connections.c.mentor_id == rotated.c.mentor_id,
            connections.c.refresh_token_encrypted == rotated.c.old,
        )
        .values(refresh_token_encrypted=rotated.c.new)
        .returning(connections.c.mentor_id)
    )
    return len(written.all())
