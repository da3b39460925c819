"""The calendar schema as the use cases see it: mentors, their Google connections, consent
states, bookings and their attempts. All of calendar's SQL is here, and the mapping between
rows and the domain's objects or the small records below.

Nothing here commits: every function works in the session of its caller's unit of work (a
transaction the service opened, or the one a handler's message runs in). The statements run on
that session's asyncpg connection (`driver_connection`, same transaction), as SQL text written
once below with asyncpg's `$n` placeholders: through SQLAlchemy's compiling, caching and result
processing they cost the service about half of its CPU per booking. Statuses and reasons are
written into the text, not passed: the partial indexes on `status` are then used by every plan.
The sweeper's own statements stay on SQLAlchemy (the end says why).

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

import asyncpg
from sqlalchemy import ColumnElement, RowMapping, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from booking.calendar.domain import RECOVERABLE, BookingStatus, CalendarBooking, google_event_id
from booking.calendar.tables import SCHEMA, calendar_bookings, oauth_states
from booking.contracts import CalendarFailureReason, OrderPaid
from booking.runtime.db import driver_connection


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


# Whether we know a mentor, and their connection if they have one.
Standing = tuple[bool, Connection | None]


# -- the tables, and the columns read back -------------------------------------------------------

_MENTORS = f'"{SCHEMA}".mentors'
_CONNECTIONS = f'"{SCHEMA}".connections'
_STATES = f'"{SCHEMA}".oauth_states'
_BOOKINGS = f'"{SCHEMA}".calendar_bookings'
_ATTEMPTS = f'"{SCHEMA}".scheduling_attempts'

_PENDING = f"'{BookingStatus.PENDING.value}'"
_FAILED = f"'{BookingStatus.FAILED.value}'"
_CANCELLED = f"'{BookingStatus.CANCELLED.value}'"
_RECOVERABLE = ", ".join(f"'{reason.value}'" for reason in sorted(RECOVERABLE))

# What `booking_of` maps, and the booking's correlation id.
_BOOKING = (
    "session_id, order_id, mentor_id, status, attempts, updated_at, reason, detail, event_id, "
    "meet_link, html_link, start_at, schedule_failures, final, next_attempt_at, "
    "event_delete_pending, correlation_id"
)
# What `_claimed` maps.
_CLAIM = (
    "session_id, order_id, mentor_id, event_id, attempts, correlation_id, claimed_until, title, "
    "mentee_email, start_at, end_at"
)
# What `_standing` maps, from the mentor `m` and their connection `c` (outer-joined).
_STANDING = (
    "m.id IS NOT NULL AS known, c.mentor_id IS NOT NULL AS connected, m.timezone, "
    "c.calendar_id, c.refresh_token_encrypted, c.connected_at, c.revoked_at"
)
# The columns of a booking the domain may change, as `_stored` gives them: $2 onwards ($1 is
# the session id).
_STORED = (
    "status",
    "reason",
    "detail",
    "event_id",
    "meet_link",
    "html_link",
    "attempts",
    "schedule_failures",
    "final",
    "next_attempt_at",
    "event_delete_pending",
    "updated_at",
)
_SET_STORED = ", ".join(f"{name} = ${n}" for n, name in enumerate(_STORED, start=2))
_AFTER_STORED = len(_STORED) + 2  # the first placeholder after them
# A scheduling attempt's row, as `_attempt` gives it.
_ATTEMPT = "session_id, attempt, at, outcome, reason, detail, final, next_attempt_at"


def _placeholders(first: int, count: int) -> str:
    return ", ".join(f"${n}" for n in range(first, first + count))


# -- rows <-> the domain -------------------------------------------------------------------------

# A row by column name: the driver's, or SQLAlchemy's (the sweeper's statements).
Columns = asyncpg.Record | RowMapping


def booking_of(row: Columns) -> CalendarBooking:
    """The domain's view of a `calendar_bookings` row (its `_BOOKING` columns)."""
    reason = row["reason"]
    return CalendarBooking(
        session_id=row["session_id"],
        order_id=row["order_id"],
        mentor_id=row["mentor_id"],
        status=BookingStatus(row["status"]),
        attempts=row["attempts"],
        updated_at=row["updated_at"],
        reason=CalendarFailureReason(reason) if reason else None,
        detail=row["detail"],
        event_id=row["event_id"],
        meet_link=row["meet_link"],
        html_link=row["html_link"],
        start_at=row["start_at"],
        schedule_failures=row["schedule_failures"],
        final=row["final"],
        next_attempt_at=row["next_attempt_at"],
        event_delete_pending=row["event_delete_pending"],
    )


def _tracked(row: Columns) -> TrackedBooking:
    return TrackedBooking(booking_of(row), row["correlation_id"])


def _claimed(row: Columns) -> ClaimedBooking:
    return ClaimedBooking(
        session_id=row["session_id"],
        order_id=row["order_id"],
        mentor_id=row["mentor_id"],
        event_id=row["event_id"],
        attempts=row["attempts"],
        correlation_id=row["correlation_id"],
        claimed_until=row["claimed_until"],
        title=row["title"],
        mentee_email=row["mentee_email"],
        start_at=row["start_at"],
        end_at=row["end_at"],
    )


def _connection(row: asyncpg.Record, mentor_id: uuid.UUID) -> Connection:
    return Connection(
        mentor_id=mentor_id,
        timezone=row["timezone"],
        calendar_id=row["calendar_id"],
        refresh_token_encrypted=row["refresh_token_encrypted"],
        connected_at=row["connected_at"],
        revoked_at=row["revoked_at"],
    )


def _standing(row: asyncpg.Record | None, mentor_id: uuid.UUID) -> Standing:
    if row is None or not row["known"]:
        return False, None
    return True, _connection(row, mentor_id) if row["connected"] else None


def _stored(booking: CalendarBooking) -> tuple[Any, ...]:
    """The values of `_STORED` for the booking, in that order."""
    return (
        booking.status.value,
        booking.reason.value if booking.reason else None,
        booking.detail,
        booking.event_id,
        booking.meet_link,
        booking.html_link,
        booking.attempts,
        booking.schedule_failures,
        booking.final,
        booking.next_attempt_at,
        booking.event_delete_pending,
        booking.updated_at,
    )


def _attempt(
    booking: CalendarBooking, outcome: str, now: datetime, detail: str | None
) -> tuple[Any, ...]:
    """The values of `_ATTEMPT` for the booking's latest attempt (numbered by its count)."""
    failed = outcome == "failed"
    return (
        booking.session_id,
        booking.attempts,
        now,
        outcome,
        booking.reason.value if failed and booking.reason else None,
        booking.detail if failed else detail,
        booking.final,
        booking.next_attempt_at,
    )


# -- mentors -------------------------------------------------------------------------------------

_ADD_MENTOR = f"""
    INSERT INTO {_MENTORS} (id, name, email, timezone, identity_subject)
    VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING
    """
_LINK_IDENTITY = f"""
    UPDATE {_MENTORS} SET identity_subject = $2, identity_sequence = $3
    WHERE id = $1 AND identity_sequence < $3 RETURNING id
    """
_MENTOR_ID = f"SELECT id FROM {_MENTORS} WHERE id = $1"
_LOCK_MENTOR_SHARE = f"{_MENTOR_ID} FOR SHARE"
_LOCK_MENTOR_UPDATE = f"{_MENTOR_ID} FOR UPDATE"
_MENTOR_EMAIL = f"SELECT email FROM {_MENTORS} WHERE id = $1"
_IDENTITY_SUBJECT = f"SELECT identity_subject FROM {_MENTORS} WHERE id = $1"


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
    await (await driver_connection(session)).execute(
        _ADD_MENTOR, mentor_id, name, email, timezone, identity_subject
    )


async def link_identity(
    session: AsyncSession, mentor_id: uuid.UUID, subject: str, sequence: int
) -> bool:
    """Set the mentor's identity subject if `sequence` is above the one it came with; whether
    it was set (False: an older link, or an unknown mentor)."""
    linked = await (await driver_connection(session)).fetchval(
        _LINK_IDENTITY, mentor_id, subject, sequence
    )
    return linked is not None


async def mentor_known(session: AsyncSession, mentor_id: uuid.UUID) -> bool:
    return await (await driver_connection(session)).fetchval(_MENTOR_ID, mentor_id) is not None


async def lock_mentor(session: AsyncSession, mentor_id: uuid.UUID, *, share: bool) -> bool:
    """Take the mentor's row lock (FOR SHARE or FOR UPDATE); False if the mentor is unknown."""
    query = _LOCK_MENTOR_SHARE if share else _LOCK_MENTOR_UPDATE
    return await (await driver_connection(session)).fetchval(query, mentor_id) is not None


async def mentor_email(session: AsyncSession, mentor_id: uuid.UUID) -> str | None:
    """The mentor's email; None if the mentor is unknown."""
    email: str | None = await (await driver_connection(session)).fetchval(_MENTOR_EMAIL, mentor_id)
    return email


async def identity_subject(session: AsyncSession, mentor_id: uuid.UUID) -> str | None:
    """The identity-provider subject of the mentor; None if none or the mentor is unknown."""
    subject: str | None = await (await driver_connection(session)).fetchval(
        _IDENTITY_SUBJECT, mentor_id
    )
    return subject


# -- connections ---------------------------------------------------------------------------------

_CONNECTION_OF = f"""
    SELECT m.timezone, c.calendar_id, c.refresh_token_encrypted, c.connected_at, c.revoked_at
    FROM {_CONNECTIONS} AS c JOIN {_MENTORS} AS m ON m.id = c.mentor_id
    WHERE c.mentor_id = $1
    """
_MENTOR_STANDING = f"""
    SELECT {_STANDING}
    FROM {_MENTORS} AS m LEFT JOIN {_CONNECTIONS} AS c ON c.mentor_id = m.id
    WHERE m.id = $1
    """
_STORE_CONNECTION = f"""
    INSERT INTO {_CONNECTIONS} (mentor_id, refresh_token_encrypted, scope, connected_at,
                                revoked_at)
    VALUES ($1, $2, $3, $4, NULL)
    ON CONFLICT (mentor_id) DO UPDATE SET
        refresh_token_encrypted = excluded.refresh_token_encrypted, scope = excluded.scope,
        connected_at = excluded.connected_at, revoked_at = NULL
    RETURNING calendar_id
    """
_DELETE_CONNECTION = f"DELETE FROM {_CONNECTIONS} WHERE mentor_id = $1"
_MARK_REVOKED = f"""
    UPDATE {_CONNECTIONS} SET revoked_at = $3
    WHERE mentor_id = $1 AND connected_at = $2 AND revoked_at IS NULL
    """


async def connection_of(session: AsyncSession, mentor_id: uuid.UUID) -> Connection | None:
    row = await (await driver_connection(session)).fetchrow(_CONNECTION_OF, mentor_id)
    return _connection(row, mentor_id) if row is not None else None


async def mentor_standing(session: AsyncSession, mentor_id: uuid.UUID) -> Standing:
    """Whether we know the mentor, and their connection if they have one (one query)."""
    row = await (await driver_connection(session)).fetchrow(_MENTOR_STANDING, mentor_id)
    return _standing(row, mentor_id)


async def store_connection(
    session: AsyncSession,
    mentor_id: uuid.UUID,
    *,
    refresh_token_encrypted: str,
    scope: str | None,
    connected_at: datetime,
) -> str:
    """The mentor's connection, new or replacing theirs (working again); its calendar id."""
    calendar_id: str = await (await driver_connection(session)).fetchval(
        _STORE_CONNECTION, mentor_id, refresh_token_encrypted, scope, connected_at
    )
    return calendar_id


async def delete_connection(session: AsyncSession, mentor_id: uuid.UUID) -> None:
    await (await driver_connection(session)).execute(_DELETE_CONNECTION, mentor_id)


async def mark_revoked(
    session: AsyncSession, mentor_id: uuid.UUID, connected_at: datetime, now: datetime
) -> None:
    """Google refused the connection made at `connected_at`: revoked, unless the mentor has
    connected again since (a newer connection is not the one refused)."""
    await (await driver_connection(session)).execute(_MARK_REVOKED, mentor_id, connected_at, now)


# -- consent states ------------------------------------------------------------------------------

_ADD_STATE = f"""
    INSERT INTO {_STATES} (nonce, mentor_id, expires_at, created_at) VALUES ($1, $2, $3, $4)
    """
_SPEND_STATE = f"""
    UPDATE {_STATES} SET used_at = $3
    WHERE nonce = $1 AND mentor_id = $2 AND used_at IS NULL AND expires_at > $3
    RETURNING nonce
    """
_STATE_USED_AT = f"SELECT used_at FROM {_STATES} WHERE nonce = $1"


async def add_state(
    session: AsyncSession,
    *,
    nonce: str,
    mentor_id: uuid.UUID,
    expires_at: datetime,
    created_at: datetime,
) -> None:
    await (await driver_connection(session)).execute(
        _ADD_STATE, nonce, mentor_id, expires_at, created_at
    )


async def spend_state(
    session: AsyncSession, nonce: str, mentor_id: uuid.UUID, now: datetime
) -> bool:
    """Mark the state used, if it is unused and unexpired: a conditional UPDATE, never a check
    and then a set. Whether this call spent it."""
    spent = await (await driver_connection(session)).fetchval(_SPEND_STATE, nonce, mentor_id, now)
    return spent is not None


async def state_used_at(session: AsyncSession, nonce: str) -> datetime | None:
    """When the state was spent; None if it was not, or is not ours."""
    used_at: datetime | None = await (await driver_connection(session)).fetchval(
        _STATE_USED_AT, nonce
    )
    return used_at


# -- bookings ------------------------------------------------------------------------------------

_OPEN_BOOKING = f"""
    INSERT INTO {_BOOKINGS} (session_id, order_id, mentor_id, mentee_email, title, start_at,
                             end_at, event_id, status, attempts, correlation_id, created_at,
                             updated_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, {_PENDING}, 0, $9, $10, $10)
    ON CONFLICT (session_id) DO NOTHING
    RETURNING {_BOOKING}
    """
_ADD_TOMBSTONE = f"""
    INSERT INTO {_BOOKINGS} (session_id, order_id, mentor_id, event_id, status, detail, attempts,
                             correlation_id, created_at, updated_at)
    VALUES ($1, $2, $3, $4, {_CANCELLED}, $5, 0, $6, $7, $7)
    ON CONFLICT (session_id) DO NOTHING
    RETURNING session_id
    """
_LOCK_BOOKING = f"SELECT {_BOOKING} FROM {_BOOKINGS} WHERE session_id = $1 FOR UPDATE"
_SAVE_BOOKING = f"UPDATE {_BOOKINGS} SET {_SET_STORED} WHERE session_id = $1"
_SAVE_RELEASED = f"UPDATE {_BOOKINGS} SET {_SET_STORED}, claimed_until = NULL WHERE session_id = $1"
_PUT_OFF = f"""
    UPDATE {_BOOKINGS} SET attempts = $2, updated_at = $3, claimed_until = $4
    WHERE session_id = $1
    """
_RELEASE = f"UPDATE {_BOOKINGS} SET claimed_until = NULL, updated_at = $2 WHERE session_id = $1"
_RECORD_ATTEMPT = f"INSERT INTO {_ATTEMPTS} ({_ATTEMPT}) VALUES ({_placeholders(1, 8)})"
# The booking saved (its lease released) and its attempt's row added, in one statement: the
# attempt's session id is the booking's ($1), its other values the parameters after the booking's.
_RECORD_OUTCOME = f"""
    WITH saved AS ({_SAVE_RELEASED})
    INSERT INTO {_ATTEMPTS} ({_ATTEMPT}) VALUES ($1, {_placeholders(_AFTER_STORED, 7)})
    """
_REOPEN_BOOKINGS = f"""
    UPDATE {_BOOKINGS}
    SET status = {_PENDING}, reason = NULL, detail = NULL, next_attempt_at = NULL,
        claimed_until = NULL, updated_at = $2
    WHERE mentor_id = $1 AND status = {_FAILED} AND NOT final AND reason IN ({_RECOVERABLE})
    RETURNING session_id
    """


async def open_booking(
    session: AsyncSession, event: OrderPaid, correlation_id: str, now: datetime
) -> CalendarBooking | None:
    """The paid session's booking, pending; None if the session has one already (a repeat, or
    its tombstone): the primary key decides, not a check."""
    row = await (await driver_connection(session)).fetchrow(
        _OPEN_BOOKING,
        event.session_id,
        event.order_id,
        event.mentor_id,
        event.mentee_email,
        event.title,
        event.start_at,
        event.end_at,
        google_event_id(event.session_id),
        correlation_id,
        now,
    )
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
    added = await (await driver_connection(session)).fetchval(
        _ADD_TOMBSTONE,
        session_id,
        order_id,
        mentor_id,
        google_event_id(session_id),
        detail,
        correlation_id,
        now,
    )
    return added is not None


async def lock_booking(session: AsyncSession, session_id: uuid.UUID) -> TrackedBooking | None:
    """The booking under its row lock, until the transaction ends; None if there is none."""
    row = await (await driver_connection(session)).fetchrow(_LOCK_BOOKING, session_id)
    return _tracked(row) if row is not None else None


async def save_booking(
    session: AsyncSession, booking: CalendarBooking, *, release: bool = False
) -> None:
    """Write what the domain changed of the booking; `release`: its lease too."""
    query = _SAVE_RELEASED if release else _SAVE_BOOKING
    await (await driver_connection(session)).execute(query, booking.session_id, *_stored(booking))


async def put_off(session: AsyncSession, booking: CalendarBooking, until: datetime) -> None:
    """A run that found its event without a Meet link: its count, and its lease until then."""
    await (await driver_connection(session)).execute(
        _PUT_OFF, booking.session_id, booking.attempts, booking.updated_at, until
    )


async def release(session: AsyncSession, session_id: uuid.UUID, now: datetime) -> None:
    """Give the booking's lease up, leaving it as it is (pending: anyone may claim it)."""
    await (await driver_connection(session)).execute(_RELEASE, session_id, now)


async def record_attempt(
    session: AsyncSession,
    booking: CalendarBooking,
    outcome: str,
    now: datetime,
    *,
    detail: str | None = None,
) -> None:
    """The booking's latest attempt (numbered by its count), as it ended."""
    await (await driver_connection(session)).execute(
        _RECORD_ATTEMPT, *_attempt(booking, outcome, now, detail)
    )


async def record_outcome(
    session: AsyncSession, booking: CalendarBooking, outcome: str, now: datetime
) -> None:
    """A run's outcome, in one statement: the booking as the domain left it, its lease
    released (`save_booking(release=True)`), and its attempt's row (`record_attempt`)."""
    attempt = _attempt(booking, outcome, now, None)
    await (await driver_connection(session)).execute(
        _RECORD_OUTCOME, booking.session_id, *_stored(booking), *attempt[1:]
    )


async def reopen_bookings(
    session: AsyncSession, mentor_id: uuid.UUID, now: datetime
) -> list[uuid.UUID]:
    """The mentor's bookings that wait for a working connection: pending again; their sessions.
    Not the final ones: their session has begun, or an admin has them."""
    rows = await (await driver_connection(session)).fetch(_REOPEN_BOOKINGS, mentor_id, now)
    return [row["session_id"] for row in rows]


# -- leases: the claims --------------------------------------------------------------------------


def _unclaimed(now: str) -> str:
    """A lease may be taken when nobody holds one, or the one held has lapsed (`now`: its
    placeholder)."""
    return f"(claimed_until IS NULL OR claimed_until < {now})"


def _claim_one(where: str) -> str:
    """One booking's ($1) lease until $3, if it matches `where` and no run holds it ($2: now)."""
    return f"""
        UPDATE {_BOOKINGS} SET claimed_until = $3
        WHERE session_id = $1 AND {where} AND {_unclaimed("$2")}
        RETURNING {_CLAIM}
        """


# The run's next question, the mentor's standing, answered in the claim's own statement.
_CLAIM_PENDING = f"""
    WITH claimed AS ({_claim_one(f"status = {_PENDING}")})
    SELECT claimed.*, {_STANDING}
    FROM claimed
    LEFT JOIN {_MENTORS} AS m ON m.id = claimed.mentor_id
    LEFT JOIN {_CONNECTIONS} AS c ON c.mentor_id = m.id
    """
_CLAIM_DELETION = _claim_one(f"status = {_CANCELLED} AND event_delete_pending")
_CLAIM_RETRIED = f"""
    UPDATE {_BOOKINGS} SET {_SET_STORED}, claimed_until = ${_AFTER_STORED}
    WHERE session_id = $1
    RETURNING {_CLAIM}
    """
_TAKE_OVER_DELETION = f"""
    UPDATE {_BOOKINGS} SET event_delete_pending = true, claimed_until = $3, updated_at = $2
    WHERE session_id = $1
    RETURNING {_CLAIM}
    """
_SETTLE_DELETION = f"""
    UPDATE {_BOOKINGS} SET event_delete_pending = false, claimed_until = NULL, updated_at = $3
    WHERE session_id = $1 AND claimed_until = $2
    RETURNING session_id
    """


async def claim_pending(
    session: AsyncSession, session_id: uuid.UUID, now: datetime, until: datetime
) -> tuple[ClaimedBooking, Standing] | None:
    """A pending booking's lease, unless another run holds it, with its mentor's standing as
    `mentor_standing` tells it (read as the claim is taken); None if not taken."""
    row = await (await driver_connection(session)).fetchrow(_CLAIM_PENDING, session_id, now, until)
    if row is None:
        return None
    claim = _claimed(row)
    return claim, _standing(row, claim.mentor_id)


async def claim_retried(
    session: AsyncSession, booking: CalendarBooking, until: datetime
) -> ClaimedBooking:
    """The booking an admin retries, as `retry` left it, under a lease until then."""
    row = await (await driver_connection(session)).fetchrow(
        _CLAIM_RETRIED, booking.session_id, *_stored(booking), until
    )
    assert row is not None, f"no booking of session {booking.session_id}"
    return _claimed(row)


async def claim_deletion(
    session: AsyncSession, session_id: uuid.UUID, now: datetime, until: datetime
) -> ClaimedBooking | None:
    """A cancelled booking's owed delete, unless a run holds its lease; None if not taken."""
    row = await (await driver_connection(session)).fetchrow(_CLAIM_DELETION, session_id, now, until)
    return _claimed(row) if row is not None else None


async def take_over_deletion(
    session: AsyncSession, session_id: uuid.UUID, now: datetime, until: datetime
) -> ClaimedBooking:
    """A run whose booking was cancelled meanwhile owes its event a delete, under a new lease
    (the caller holds the booking's row lock)."""
    row = await (await driver_connection(session)).fetchrow(
        _TAKE_OVER_DELETION, session_id, now, until
    )
    assert row is not None, f"no booking of session {session_id}"
    return _claimed(row)


async def settle_deletion(session: AsyncSession, claim: ClaimedBooking, now: datetime) -> bool:
    """Nothing more to delete, if `claim`'s lease still holds; whether it did."""
    settled = await (await driver_connection(session)).fetchval(
        _SETTLE_DELETION, claim.session_id, claim.claimed_until, now
    )
    return settled is not None


# -- refresh tokens at rest ----------------------------------------------------------------------

_STORED_TOKENS = f"""
    SELECT mentor_id, refresh_token_encrypted FROM {_CONNECTIONS} ORDER BY mentor_id LIMIT $1
    """
_STORED_TOKENS_AFTER = f"""
    SELECT mentor_id, refresh_token_encrypted FROM {_CONNECTIONS}
    WHERE mentor_id > $2 ORDER BY mentor_id LIMIT $1
    """
_STORE_ROTATED = f"""
    WITH written AS (
        UPDATE {_CONNECTIONS} AS c SET refresh_token_encrypted = rotated.new
        FROM unnest($1::uuid[], $2::text[], $3::text[]) AS rotated (mentor_id, old, new)
        WHERE c.mentor_id = rotated.mentor_id AND c.refresh_token_encrypted = rotated.old
        RETURNING 1
    )
    SELECT count(*) FROM written
    """


async def stored_tokens(
    session: AsyncSession, after: uuid.UUID | None, limit: int
) -> list[tuple[uuid.UUID, str]]:
    """Up to `limit` connections' (mentor id, stored token), by mentor id, after `after`."""
    driver = await driver_connection(session)
    if after is None:
        rows = await driver.fetch(_STORED_TOKENS, limit)
    else:
        rows = await driver.fetch(_STORED_TOKENS_AFTER, limit, after)
    return [(row["mentor_id"], row["refresh_token_encrypted"]) for row in rows]


async def store_rotated(session: AsyncSession, changes: list[tuple[uuid.UUID, str, str]]) -> int:
    """Write the re-encrypted tokens (mentor id, old, new) where the row still holds the old
    one (a mentor who reconnected meanwhile keeps the token just stored); how many were."""
    written: int = await (await driver_connection(session)).fetchval(
        _STORE_ROTATED,
        [mentor_id for mentor_id, _, _ in changes],
        [old for _, old, _ in changes],
        [new for _, _, new in changes],
    )
    return written


# -- the sweeper's statements, on SQLAlchemy ------------------------------------------------------
#
# They run once a sweep, not once a booking: the driver would save nothing that counts. And
# every sweep begins with one of them: when the database went away, SQLAlchemy sees the lost
# connection and discards the pool's connections with it, which a statement on the driver
# does not (the next units of work would get the dead ones).

bookings = calendar_bookings.c


async def prune_states(session: AsyncSession, expired_before: datetime) -> int:
    """Delete the states that expired before then; how many."""
    pruned = await session.execute(
        delete(oauth_states)
        .where(oauth_states.c.expires_at < expired_before)
        .returning(oauth_states.c.nonce)
    )
    return len(pruned.all())


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
    return [_tracked(row) for row in (await session.execute(waiting)).mappings()]


# The claims: FOR UPDATE SKIP LOCKED, and the lease stamped in the same statement, so replicas
# never take the same booking.


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
            bookings.claimed_until.is_(None) | (bookings.claimed_until < now),
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
    return [_claimed(row) for row in (await session.execute(claim)).mappings()]
