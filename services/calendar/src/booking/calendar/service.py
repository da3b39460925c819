"""The calendar service's units of work: connecting a mentor's Google calendar, scheduling a
paid session in it (again, on a schedule, when it fails), taking it out when its order is
cancelled, and an admin's retry.

Google is never called inside an open transaction. Connecting: the state is spent (a
conditional UPDATE) and committed, the code exchanged, then the connection stored in a second
transaction. Scheduling: a booking is claimed with a lease and committed, Google called, then
the outcome and its event recorded under the booking's row lock, so a duplicate or a concurrent
run finds the work done and does nothing. The event id in Google is derived from the session, so
a run repeated after a crash finds its event (409 duplicate) instead of making a second one. An
attempt is counted when its outcome is recorded: a run lost before (a crash, our own database
away) costs none, and its lease lapses for the sweeper to run it again.

A reconnect and a failure "for lack of a connection" both take the mentor's row lock (the
reconnect FOR UPDATE, the failure FOR SHARE, always before any booking's): whichever commits
second sees the other, so no booking stays failed while its mentor is connected.

Cancelling marks the booking cancelled and owes Google a delete of its event, made once no run
holds the booking's lease: a run still inserting comes back, finds the booking cancelled and
deletes the event itself, never confirming it. The lease's value is its holder's token, so a
deletion is marked done only by whoever made it, and a run that brings an event back later
always gets its own delete.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import traceback
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, Text, Uuid, column, delete, select, update, values
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from booking.calendar.domain import (
    CALENDAR_SCOPE,
    RECOVERABLE,
    AlreadyCancelled,
    AlreadyConfirmed,
    BookingStatus,
    CalendarBooking,
    ConsentState,
    InvalidState,
    NothingToRetry,
    SessionEvent,
    google_event_id,
)
from booking.calendar.google import (
    CalendarEvent,
    GoogleClient,
    GoogleClientClosed,
    GoogleError,
    GoogleRefused,
    GoogleUnavailable,
    IntegrationRevoked,
    MeetLinkPending,
    MentorCredentials,
)
from booking.calendar.settings import CalendarSettings
from booking.calendar.tables import (
    calendar_bookings,
    connections,
    mentors,
    messaging,
    oauth_states,
    scheduling_attempts,
)
from booking.calendar.tokens import InvalidToken, TokenCipher
from booking.contracts import (
    AdminAction,
    CalendarBookingConfirmed,
    CalendarBookingFailed,
    CalendarFailureReason,
    Event,
    OrderCancelled,
)
from booking.contracts.http import CalendarConnection, SessionScheduling
from booking.runtime.audit import record_admin_action
from booking.runtime.clock import utcnow
from booking.runtime.context import correlated
from booking.runtime.db import Database
from booking.runtime.domain import EventIds, IllegalTransition
from booking.runtime.outages import OutageLog
from booking.runtime.outbox import Outbox
from booking.runtime.sweeping import run_quietly

log = logging.getLogger(__name__)

# Events about one booking get ids derived from it: recording one twice stores it once.
_EVENTS = uuid.UUID("5d0f6c1a-8e2b-4f47-b1c3-2a9e7d4f6b18")

# Scopes that let us write the mentor's events (calendar.events, or all of calendar).
_WRITE_SCOPES = frozenset({CALENDAR_SCOPE, "https://www.googleapis.com/auth/calendar"})


event_id = EventIds(_EVENTS)


def failure_event_id(session_id: uuid.UUID, attempt: int) -> uuid.UUID:
    """One CalendarBookingFailed per recorded attempt: a booking that fails again (on the
    schedule, after a reconnect or an admin's retry) is news; the same attempt twice is not."""
    return event_id("failed", session_id, attempt)


def given_up_event_id(session_id: uuid.UUID, attempt: int) -> uuid.UUID:
    """The final CalendarBookingFailed of a booking whose session began while it waited for a
    reconnect (after its `attempt`-th attempt): apart from that attempt's own."""
    return event_id("given-up", session_id, attempt)


# An admin reads the trace in the alert; its head says what it is, its tail where it broke.
_TRACE_LIMIT = 8000


def stack_trace() -> str:
    """The exception being handled, as Python prints it, within _TRACE_LIMIT characters."""
    trace = traceback.format_exc()
    if len(trace) <= _TRACE_LIMIT:
        return trace
    head, _, _ = trace.partition("\n")
    return f"{head}\n  ... (cut) ...\n{trace[-(_TRACE_LIMIT - len(head) - 20) :]}"


class UnknownMentor(Exception):
    """No MentorRegistered reached us for this id."""


class UnknownSession(Exception):
    """No booking (nor tombstone) of this session: no OrderPaid or OrderCancelled reached us."""


class RetryRefused(Exception):
    """The booking's state forbids a retry (it was cancelled): 409."""


class ConnectRefused(Exception):
    """The consent round trip cannot be completed: an HTTP status and a detail for the browser."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail
        super().__init__(detail)


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


def _stored(booking: CalendarBooking) -> dict[str, Any]:
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


def scheduling_of(booking: CalendarBooking) -> SessionScheduling:
    """Where the booking stands, as the admin API shows it."""
    return SessionScheduling(
        session_id=booking.session_id,
        order_id=booking.order_id,
        status=booking.status.value,
        reason=booking.reason.value if booking.reason else None,
        final=booking.final,
        attempts=booking.attempts,
        next_attempt_at=booking.next_attempt_at,
    )


def failure_of(booking: CalendarBooking) -> CalendarBookingFailed:
    assert booking.reason is not None and booking.detail is not None
    return CalendarBookingFailed(
        session_id=booking.session_id,
        order_id=booking.order_id,
        mentor_id=booking.mentor_id,
        reason=booking.reason,
        detail=booking.detail,
        attempts=max(1, booking.attempts),
        final=booking.final,
        next_attempt_at=booking.next_attempt_at,
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


async def record_failure(
    session: AsyncSession, outbox: Outbox, booking: CalendarBooking, now: datetime
) -> None:
    """A failed attempt, in the caller's transaction: the booking as `fail` left it (its lease
    released), the attempt's row, and its CalendarBookingFailed."""
    await session.execute(
        update(calendar_bookings)
        .where(calendar_bookings.c.session_id == booking.session_id)
        .values(**_stored(booking), claimed_until=None)
    )
    await record_attempt(session, booking, "failed", now)
    await outbox.record(
        session,
        failure_of(booking),
        message_id=failure_event_id(booking.session_id, booking.attempts),
    )


async def cancel_booking(
    session: AsyncSession, event: OrderCancelled, correlation_id: str, now: datetime
) -> bool:
    """The session's booking cancelled, in the caller's transaction; True if Google may have
    its event, which is then owed a delete.

    With no booking yet (the order ended before it was paid, or OrderCancelled overtook
    OrderPaid), a tombstone takes the session's key, so a later OrderPaid never schedules it.
    A run holding the lease keeps it: it deletes its event itself when it comes back.
    """
    locked = (
        select(calendar_bookings)
        .where(calendar_bookings.c.session_id == event.session_id)
        .with_for_update()
    )
    row = (await session.execute(locked)).one_or_none()
    if row is None:
        tombstone = await session.execute(
            insert(calendar_bookings)
            .values(
                session_id=event.session_id,
                order_id=event.order_id,
                mentor_id=event.mentor_id,
                event_id=google_event_id(event.session_id),
                status=BookingStatus.CANCELLED.value,
                detail=f"the order was cancelled before it was paid: {event.reason}",
                attempts=0,
                correlation_id=correlation_id,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=[calendar_bookings.c.session_id])
            .returning(calendar_bookings.c.session_id)
        )
        if tombstone.scalar_one_or_none() is not None:
            return False
        # OrderPaid's booking committed meanwhile: cancel that one.
        row = (await session.execute(locked)).one()
    booking = booking_of(row)
    try:
        booking.cancel(event.reason, now)
    except AlreadyCancelled:
        return False
    await session.execute(
        update(calendar_bookings)
        .where(calendar_bookings.c.session_id == event.session_id)
        .values(**_stored(booking))
    )
    return booking.event_delete_pending


async def lock_mentor(session: AsyncSession, mentor_id: uuid.UUID, *, share: bool) -> bool:
    """Take the mentor's row lock (see the module's docstring); False if the mentor is unknown."""
    query = select(mentors.c.id).where(mentors.c.id == mentor_id)
    query = query.with_for_update(read=share)
    return (await session.execute(query)).scalar_one_or_none() is not None


def _connection_columns() -> tuple[Any, ...]:
    return (
        connections.c.mentor_id,
        mentors.c.timezone,
        connections.c.calendar_id,
        connections.c.refresh_token_encrypted,
        connections.c.connected_at,
        connections.c.revoked_at,
    )


async def connection_of(
    session: AsyncSession | AsyncConnection, mentor_id: uuid.UUID
) -> Connection | None:
    query = (
        select(*_connection_columns())
        .join(mentors, mentors.c.id == connections.c.mentor_id)
        .where(connections.c.mentor_id == mentor_id)
    )
    row = (await session.execute(query)).one_or_none()
    return Connection(**row._mapping) if row is not None else None


async def mentor_standing(
    session: AsyncSession | AsyncConnection, mentor_id: uuid.UUID
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
    values = dict(row._mapping)
    del values["known"]
    return True, Connection(**values)


def unknown_mentor(mentor_id: uuid.UUID) -> tuple[CalendarFailureReason, str]:
    return (
        CalendarFailureReason.STORE_NOT_FOUND,
        f"the calendar service knows no mentor {mentor_id} (no MentorRegistered); the booking "
        "is tried again on the retry schedule",
    )


def missing_connection(connection: Connection | None) -> tuple[CalendarFailureReason, str] | None:
    """Why a booking cannot be scheduled without asking Google, or None if it can be."""
    if connection is None:
        return (
            CalendarFailureReason.MENTOR_NOT_INTEGRATED,
            "the mentor has not connected a Google calendar; the booking is scheduled as soon "
            "as they connect one",
        )
    if not connection.working:
        return (
            CalendarFailureReason.INTEGRATION_REVOKED,
            f"Google revoked the mentor's connection (invalid_grant) on "
            f"{connection.revoked_at.isoformat() if connection.revoked_at else '?'}; the "
            "booking is scheduled as soon as they connect again",
        )
    return None


class CalendarService:
    def __init__(
        self,
        *,
        db: Database,
        outbox: Outbox,
        google: GoogleClient,
        cipher: TokenCipher,
        settings: CalendarSettings,
    ) -> None:
        self.db = db
        self.outbox = outbox
        self.google = google
        self.cipher = cipher
        self.settings = settings
        self.lease = timedelta(seconds=settings.scheduling_lease_seconds)
        self.retries = settings.retry_schedule
        self.outage = OutageLog(log, "the calendar database (background scheduling)")
        self._background: set[asyncio.Task] = set()

    # -- background work -------------------------------------------------------------------

    def spawn(self, work: Coroutine[Any, Any, Any], name: str) -> None:
        """Run `work` after the answer; the sweeper finishes whatever a crash leaves of it."""

        async def run() -> None:
            # An unreachable database is said once in a while, not a trace per booking.
            await run_quietly(lambda: work, self.outage, name)

        task = asyncio.create_task(run(), name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def settle(self) -> None:
        """Wait for the background work in flight (tests, graceful stops)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # -- connecting ------------------------------------------------------------------------

    async def consent_url(self, mentor_id: uuid.UUID, now: datetime | None = None) -> str:
        """Google's consent URL for the mentor, with a signed state good once, for a while."""
        now = now or utcnow()
        lifetime = timedelta(seconds=self.settings.oauth_state_lifetime_seconds)
        state = ConsentState.issue(mentor_id, secrets.token_urlsafe(24), now, lifetime)
        async with self.db.transaction() as session:
            email = await session.scalar(select(mentors.c.email).where(mentors.c.id == mentor_id))
            if email is None:
                raise UnknownMentor(mentor_id)
            await session.execute(
                oauth_states.insert().values(
                    nonce=state.nonce,
                    mentor_id=mentor_id,
                    expires_at=state.expires_at,
                    created_at=now,
                )
            )
        return self.google.consent_url(
            redirect_uri=self.settings.oauth_redirect_uri,
            state=state.sign(self.settings.oauth_state_key),
            login_hint=email,
        )

    async def connect(
        self,
        *,
        code: str | None,
        state: str | None,
        error: str | None = None,
        now: datetime | None = None,
    ) -> CalendarConnection:
        """Finish the consent round trip: store the connection and retry what lacked it.

        Nothing is stored unless the state is ours, unexpired and unused, and Google exchanged
        the code for a refresh token.
        """
        now = now or utcnow()
        if error:
            detail = (
                "the mentor declined access to their Google calendar; nothing was stored"
                if error == "access_denied"
                else f"Google ended the consent with the error {error!r}; nothing was stored"
            )
            raise ConnectRefused(400, f"{detail}. Start connecting again to retry.")
        if not state:
            raise ConnectRefused(400, "the state parameter is missing: start connecting again")
        try:
            consent = ConsentState.verify(state, self.settings.oauth_state_key, now)
        except InvalidState as invalid:
            raise ConnectRefused(400, f"{invalid}; nothing was stored") from None
        if not code:
            raise ConnectRefused(
                400, "the code parameter is missing: Google sent no authorization code"
            )
        await self._spend(consent, now)
        grant = await self._exchange(code)
        if grant.refresh_token is None:
            raise ConnectRefused(
                502,
                "Google gave no refresh token (offline access was not granted); nothing was "
                "stored: start connecting again",
            )
        if grant.scope is not None and not _WRITE_SCOPES & set(grant.scope.split()):
            raise ConnectRefused(
                400,
                "the mentor did not allow the platform to manage their calendar events; nothing "
                "was stored: start connecting again and tick the calendar permission",
            )
        encrypted = self.cipher.encrypt(grant.refresh_token)
        connected_at = utcnow()
        async with self.db.transaction() as session:
            if not await lock_mentor(session, consent.mentor_id, share=False):
                raise ConnectRefused(404, f"no mentor has the id {consent.mentor_id}")
            stored = await session.execute(
                insert(connections)
                .values(
                    mentor_id=consent.mentor_id,
                    refresh_token_encrypted=encrypted,
                    scope=grant.scope,
                    connected_at=connected_at,
                    revoked_at=None,
                )
                .on_conflict_do_update(
                    index_elements=[connections.c.mentor_id],
                    set_={
                        "refresh_token_encrypted": encrypted,
                        "scope": grant.scope,
                        "connected_at": connected_at,
                        "revoked_at": None,
                    },
                )
                .returning(connections.c.calendar_id)
            )
            calendar_id = stored.scalar_one()
            reopened = await self._reopen_bookings(session, consent.mentor_id, connected_at)
        self.google.forget(consent.mentor_id)
        log.info(
            "mentor %s connected Google calendar %s; %d booking(s) to schedule again",
            consent.mentor_id,
            calendar_id,
            len(reopened),
        )
        for session_id in reopened:
            self.spawn(self.schedule(session_id), name=f"schedule-{session_id}")
        return CalendarConnection(
            connected=True, calendar_id=calendar_id, connected_at=connected_at, revoked=False
        )

    async def _spend(self, consent: ConsentState, now: datetime) -> None:
        """Mark the state used, once: a conditional UPDATE, never a check and then a set."""
        async with self.db.transaction() as session:
            spent = await session.execute(
                update(oauth_states)
                .where(
                    oauth_states.c.nonce == consent.nonce,
                    oauth_states.c.mentor_id == consent.mentor_id,
                    oauth_states.c.used_at.is_(None),
                    oauth_states.c.expires_at > now,
                )
                .values(used_at=now)
                .returning(oauth_states.c.nonce)
            )
            if spent.scalar_one_or_none() is not None:
                return
            used_at = await session.scalar(
                select(oauth_states.c.used_at).where(oauth_states.c.nonce == consent.nonce)
            )
        if used_at is not None:
            raise ConnectRefused(
                400,
                f"this consent link was used already (at {used_at.isoformat()}); each works "
                "once: start connecting again. Nothing was stored",
            )
        raise ConnectRefused(
            400, "the state is not one this service issued or it expired; nothing was stored"
        )

    async def _exchange(self, code: str):
        try:
            return await self.google.exchange_code(code, self.settings.oauth_redirect_uri)
        except GoogleRefused as refused:
            if refused.reason == "invalid_grant":
                raise ConnectRefused(
                    400,
                    "Google refused the authorization code (invalid_grant): it was used already "
                    "or has expired. Nothing was stored: start connecting again",
                ) from None
            log.error("Google refused the code exchange: %s", refused)
            raise ConnectRefused(
                502, f"Google refused to exchange the authorization code: {refused.describe()}"
            ) from None
        except GoogleUnavailable as unavailable:
            log.warning("code exchange: %s", unavailable)
            raise ConnectRefused(
                502,
                "Google's token endpoint could not be reached; nothing was stored: start "
                "connecting again in a moment",
            ) from None

    @staticmethod
    async def _reopen_bookings(
        session: AsyncSession, mentor_id: uuid.UUID, now: datetime
    ) -> list[uuid.UUID]:
        """The mentor's bookings that wait for a working connection: pending again. Not the
        final ones: their session has begun, or an admin has them."""
        reopened = await session.execute(
            update(calendar_bookings)
            .where(
                calendar_bookings.c.mentor_id == mentor_id,
                calendar_bookings.c.status == BookingStatus.FAILED.value,
                calendar_bookings.c.final.is_(False),
                calendar_bookings.c.reason.in_([reason.value for reason in RECOVERABLE]),
            )
            .values(
                status=BookingStatus.PENDING.value,
                reason=None,
                detail=None,
                next_attempt_at=None,
                claimed_until=None,
                updated_at=now,
            )
            .returning(calendar_bookings.c.session_id)
        )
        return list(reopened.scalars())

    async def identity_subject(self, mentor_id: uuid.UUID) -> str | None:
        """The identity-provider subject that acts as the mentor; None if it has none or the
        mentor is unknown (then only an admin or the mentor's own id acts as it)."""
        async with self.db.single_statement() as session:
            return await session.scalar(
                select(mentors.c.identity_subject).where(mentors.c.id == mentor_id)
            )

    async def connection_status(self, mentor_id: uuid.UUID) -> CalendarConnection:
        async with self.db.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(
                        mentors.c.id,
                        connections.c.calendar_id,
                        connections.c.connected_at,
                        connections.c.revoked_at,
                    )
                    .outerjoin(connections, connections.c.mentor_id == mentors.c.id)
                    .where(mentors.c.id == mentor_id)
                )
            ).one_or_none()
        if row is None:
            raise UnknownMentor(mentor_id)
        return CalendarConnection(
            connected=row.connected_at is not None and row.revoked_at is None,
            calendar_id=row.calendar_id,
            connected_at=row.connected_at,
            revoked=row.revoked_at is not None,
        )

    async def disconnect(self, mentor_id: uuid.UUID) -> None:
        """Forget the mentor's tokens; later bookings fail mentor_not_integrated."""
        async with self.db.transaction() as session:
            if not await lock_mentor(session, mentor_id, share=False):
                raise UnknownMentor(mentor_id)
            await session.execute(delete(connections).where(connections.c.mentor_id == mentor_id))
        self.google.forget(mentor_id)
        log.info("mentor %s disconnected their Google calendar", mentor_id)

    # -- scheduling ------------------------------------------------------------------------

    async def schedule(self, session_id: uuid.UUID, now: datetime | None = None) -> None:
        """Schedule a pending booking, unless another run holds it (the fast path)."""
        now = now or utcnow()
        claim = (
            update(calendar_bookings)
            .where(
                calendar_bookings.c.session_id == session_id,
                calendar_bookings.c.status == BookingStatus.PENDING.value,
                calendar_bookings.c.claimed_until.is_(None)
                | (calendar_bookings.c.claimed_until < now),
            )
            .values(claimed_until=now + self.lease)
            .returning(*calendar_bookings.c)
        )
        async with self.db.single_statement() as session:
            row = (await session.execute(claim)).one_or_none()
        if row is not None:
            await self.schedule_claimed(row)

    async def schedule_claimed(self, row: Row[Any]) -> BookingStatus:
        """Put a booking this run holds the lease of into Google; record the outcome.

        Runs outside any transaction. A crash before the outcome is recorded leaves the lease
        to lapse, and the sweeper runs it again: Google answers 409 for the event id and the
        event is read, so there is still exactly one. Nothing is counted for the lost run.
        """
        with correlated(row.correlation_id):
            async with self.db.single_statement() as session:
                known, connection = await mentor_standing(session, row.mentor_id)
            missing = missing_connection(connection) if known else unknown_mentor(row.mentor_id)
            if missing is not None:
                return await self._failed(row, *missing, seen=connection)
            assert connection is not None
            try:
                credentials = MentorCredentials(
                    row.mentor_id, self.cipher.decrypt(connection.refresh_token_encrypted)
                )
                session_event = SessionEvent(
                    session_id=row.session_id,
                    order_id=row.order_id,
                    title=row.title,
                    mentee_email=row.mentee_email,
                    start_at=row.start_at,
                    end_at=row.end_at,
                    timezone=connection.timezone,
                )
                event = await self.google.insert_event(
                    credentials, connection.calendar_id, session_event
                )
                confirmed = self._confirmation(row, event)
            except IntegrationRevoked as revoked:
                detail = (
                    f"Google refused the mentor's refresh token ({revoked.message}); the "
                    "connection is marked revoked and the booking is scheduled as soon as they "
                    "connect again"
                )
                return await self._failed(
                    row,
                    CalendarFailureReason.INTEGRATION_REVOKED,
                    detail,
                    seen=connection,
                    revoke=True,
                )
            except MeetLinkPending as pending:
                return await self._meet_pending(row, pending)
            except GoogleError as error:
                return await self._failed(
                    row, CalendarFailureReason.CALENDAR_API_ERROR, error.describe()
                )
            except GoogleClientClosed:
                raise  # shutting down: the lease lapses and the sweeper runs it again
            except Exception:
                log.exception("scheduling session %s failed unexpectedly", row.session_id)
                return await self._failed(
                    row, CalendarFailureReason.UNEXPECTED_ERROR, stack_trace()
                )
            return await self._confirmed(row, confirmed)

    @staticmethod
    def _confirmation(row: Row[Any], event: CalendarEvent) -> CalendarBookingConfirmed:
        # Built before anything is recorded: an answer we cannot confirm with fails the run.
        return CalendarBookingConfirmed(
            session_id=row.session_id,
            order_id=row.order_id,
            event_id=event.id or row.event_id,
            meet_link=event.meet_link,
            html_link=event.html_link,
        )

    async def _locked(self, session: AsyncSession, session_id: uuid.UUID) -> Row[Any]:
        query = (
            select(calendar_bookings)
            .where(calendar_bookings.c.session_id == session_id)
            .with_for_update()
        )
        return (await session.execute(query)).one()

    async def _record(self, session: AsyncSession, event: Event, message_id: uuid.UUID) -> None:
        await self.outbox.record(session, event, message_id=message_id)

    async def _cancelled_meanwhile(
        self, session: AsyncSession, session_id: uuid.UUID, now: datetime
    ) -> Row[Any]:
        """The booking was cancelled while this run asked Google: whatever event it made is
        owed a delete, which this run takes on (its call is over) under a lease of its own."""
        log.warning(
            "session %s was cancelled while it was being scheduled: its event is deleted",
            session_id,
        )
        owed = (
            update(calendar_bookings)
            .where(calendar_bookings.c.session_id == session_id)
            .values(event_delete_pending=True, claimed_until=now + self.lease, updated_at=now)
            .returning(*calendar_bookings.c)
        )
        return (await session.execute(owed)).one()

    async def _confirmed(self, row: Row[Any], confirmed: CalendarBookingConfirmed) -> BookingStatus:
        now = utcnow()
        async with self.db.transaction() as session:
            booking = booking_of(await self._locked(session, row.session_id))
            if booking.status is BookingStatus.CANCELLED:
                owed = await self._cancelled_meanwhile(session, row.session_id, now)
            else:
                owed = None
                try:
                    booking.confirm(
                        confirmed.event_id, confirmed.meet_link, confirmed.html_link, now
                    )
                except AlreadyConfirmed:
                    return booking.status
                await session.execute(
                    update(calendar_bookings)
                    .where(calendar_bookings.c.session_id == row.session_id)
                    .values(**_stored(booking), claimed_until=None)
                )
                await record_attempt(session, booking, "confirmed", now)
                await self._record(session, confirmed, event_id("confirmed", row.session_id))
        if owed is not None:
            await self.delete_claimed(owed)
            return BookingStatus.CANCELLED
        log.info(
            "session %s of order %s is in the mentor's calendar (event %s, attempt %d)",
            row.session_id,
            row.order_id,
            confirmed.event_id,
            booking.attempts,
        )
        return booking.status

    async def _failed(
        self,
        row: Row[Any],
        reason: CalendarFailureReason,
        detail: str,
        *,
        seen: Connection | None = None,
        revoke: bool = False,
    ) -> BookingStatus:
        """Record that this run failed, once: the retry schedule or a reconnect decides what
        comes next. For lack of a connection, unless the mentor connected (again) since this run
        looked: then the booking is run again with it."""
        now = utcnow()
        again = False
        owed = None
        async with self.db.transaction() as session:
            if reason in RECOVERABLE:
                await lock_mentor(session, row.mentor_id, share=True)
                if revoke and seen is not None:
                    await session.execute(
                        update(connections)
                        .where(
                            connections.c.mentor_id == row.mentor_id,
                            connections.c.connected_at == seen.connected_at,
                            connections.c.revoked_at.is_(None),
                        )
                        .values(revoked_at=now)
                    )
                current = await connection_of(session, row.mentor_id)
                again = (
                    current is not None
                    and current.working
                    and (seen is None or current.connected_at != seen.connected_at)
                )
            booking = booking_of(await self._locked(session, row.session_id))
            if booking.status is BookingStatus.CANCELLED:
                # An insert that failed on our side may still have made the event at Google.
                owed = await self._cancelled_meanwhile(session, row.session_id, now)
            elif booking.status is not BookingStatus.PENDING:
                return booking.status  # settled by another run
            elif again:
                await session.execute(
                    update(calendar_bookings)
                    .where(calendar_bookings.c.session_id == row.session_id)
                    .values(claimed_until=None, updated_at=now)
                )
            else:
                booking.fail(reason, detail, now, self.retries)
                await record_failure(session, self.outbox, booking, now)
        if owed is not None:
            await self.delete_claimed(owed)
            return BookingStatus.CANCELLED
        if again:
            log.info(
                "mentor %s connected again meanwhile: scheduling %s anew",
                row.mentor_id,
                row.session_id,
            )
            await self.schedule(row.session_id)
            return BookingStatus.PENDING
        log.warning(
            "session %s of order %s not scheduled (attempt %d): %s; %s",
            row.session_id,
            row.order_id,
            booking.attempts,
            reason.value,
            _what_next(booking),
        )
        return booking.status

    async def _meet_pending(self, row: Row[Any], pending: MeetLinkPending) -> BookingStatus:
        """The event exists but has no Meet link yet: look again later, a bounded number of runs."""
        attempt = row.attempts + 1
        if attempt >= self.settings.scheduling_max_attempts:
            return await self._failed(
                row,
                CalendarFailureReason.CALENDAR_API_ERROR,
                f"Google made event {pending.event_id} but still had no Meet link for it after "
                f"{attempt} scheduling run(s)",
            )
        now = utcnow()
        retry_at = now + timedelta(seconds=self.settings.meet_pending_retry_seconds)
        owed = None
        async with self.db.transaction() as session:
            booking = booking_of(await self._locked(session, row.session_id))
            if booking.status is BookingStatus.CANCELLED:
                owed = await self._cancelled_meanwhile(session, row.session_id, now)
            elif booking.status is not BookingStatus.PENDING:
                return booking.status
            else:
                booking.put_off(now)
                await session.execute(
                    update(calendar_bookings)
                    .where(calendar_bookings.c.session_id == row.session_id)
                    .values(attempts=booking.attempts, updated_at=now, claimed_until=retry_at)
                )
                await record_attempt(session, booking, "meet_pending", now, detail=str(pending))
        if owed is not None:
            await self.delete_claimed(owed)
            return BookingStatus.CANCELLED
        log.warning("%s; the sweeper looks again from %s", pending, retry_at.isoformat())
        return BookingStatus.PENDING

    async def give_up_unscheduled(self, now: datetime, limit: int) -> int:
        """Bookings still waiting for a reconnect when their session began: final now, each
        with its final CalendarBookingFailed, once. How many (at most `limit`)."""
        bookings = calendar_bookings.c
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
        async with self.db.transaction() as session:
            rows = (await session.execute(waiting)).all()
            for row in rows:
                booking = booking_of(row)
                booking.give_up(now)
                await session.execute(
                    update(calendar_bookings)
                    .where(bookings.session_id == row.session_id)
                    .values(**_stored(booking))
                )
                with correlated(row.correlation_id):
                    await self._record(
                        session,
                        failure_of(booking),
                        given_up_event_id(row.session_id, booking.attempts),
                    )
        for row in rows:
            log.warning(
                "session %s of order %s began unscheduled (%s): scheduling has given up",
                row.session_id,
                row.order_id,
                row.reason,
            )
        return len(rows)

    # -- cancelled sessions ----------------------------------------------------------------

    async def delete_owed(self, session_id: uuid.UUID, now: datetime | None = None) -> None:
        """Delete the Google event a cancelled booking owes, unless a run holds its lease (that
        run deletes it when it comes back; the sweeper, once the lease lapses)."""
        now = now or utcnow()
        bookings = calendar_bookings.c
        claim = (
            update(calendar_bookings)
            .where(
                bookings.session_id == session_id,
                bookings.status == BookingStatus.CANCELLED.value,
                bookings.event_delete_pending.is_(True),
                bookings.claimed_until.is_(None) | (bookings.claimed_until < now),
            )
            .values(claimed_until=now + self.lease)
            .returning(*calendar_bookings.c)
        )
        async with self.db.single_statement() as session:
            row = (await session.execute(claim)).one_or_none()
        if row is not None:
            await self.delete_claimed(row)

    async def delete_claimed(self, row: Row[Any]) -> bool:
        """Delete the event of a cancelled booking this run holds the lease of; True once it is
        settled: Google said it is gone (204, 410, 404), or no working connection can ask.

        Otherwise the delete stays owed, and the sweeper tries again once the lease lapses.
        """
        with correlated(row.correlation_id):
            async with self.db.single_statement() as session:
                _known, connection = await mentor_standing(session, row.mentor_id)
            if connection is None or not connection.working:
                log.warning(
                    "session %s was cancelled, but mentor %s has no working Google connection: "
                    "an event of it in their calendar (%s) cannot be deleted by the platform",
                    row.session_id,
                    row.mentor_id,
                    row.event_id,
                )
                return await self._deletion_settled(row)
            try:
                credentials = MentorCredentials(
                    row.mentor_id, self.cipher.decrypt(connection.refresh_token_encrypted)
                )
                deleted = await self.google.delete_event(
                    credentials, connection.calendar_id, row.event_id
                )
            except IntegrationRevoked as revoked:
                log.warning(
                    "session %s was cancelled, but Google refused mentor %s's refresh token "
                    "(%s): its event cannot be deleted by the platform",
                    row.session_id,
                    row.mentor_id,
                    revoked.message,
                )
                return await self._deletion_settled(row, revoked=connection)
            except GoogleError as error:
                log.warning(
                    "the event of cancelled session %s is not deleted yet: %s; tried again from %s",
                    row.session_id,
                    error.describe(),
                    row.claimed_until.isoformat(),
                )
                return False
            except GoogleClientClosed:
                raise  # shutting down: the lease lapses and the sweeper deletes it
            except Exception:
                log.exception(
                    "deleting the event of cancelled session %s failed unexpectedly; tried "
                    "again from %s",
                    row.session_id,
                    row.claimed_until.isoformat(),
                )
                return False
            settled = await self._deletion_settled(row)
            log.info(
                "session %s was cancelled: its event %s %s",
                row.session_id,
                row.event_id,
                "is deleted" if deleted else "was gone already",
            )
            return settled

    async def _deletion_settled(self, row: Row[Any], revoked: Connection | None = None) -> bool:
        """Nothing more to delete, if this run's lease still holds: a run that has taken the
        delete over since (it brought an event back) keeps it owed and deletes it itself."""
        now = utcnow()
        async with self.db.transaction() as session:
            if revoked is not None:
                await session.execute(
                    update(connections)
                    .where(
                        connections.c.mentor_id == row.mentor_id,
                        connections.c.connected_at == revoked.connected_at,
                        connections.c.revoked_at.is_(None),
                    )
                    .values(revoked_at=now)
                )
            settled = await session.execute(
                update(calendar_bookings)
                .where(
                    calendar_bookings.c.session_id == row.session_id,
                    calendar_bookings.c.claimed_until == row.claimed_until,
                )
                .values(event_delete_pending=False, claimed_until=None, updated_at=now)
                .returning(calendar_bookings.c.session_id)
            )
            return settled.scalar_one_or_none() is not None

    # -- an admin's retry ------------------------------------------------------------------

    async def retry_scheduling(
        self, session_id: uuid.UUID, *, by: str, reason: str, now: datetime | None = None
    ) -> SessionScheduling:
        """Try a failed booking (final or not) again now, its schedule anew; audited.

        A pending booking (a run is on it) or a confirmed one is answered as it is, with no
        audit: nothing to retry. A cancelled one is refused.
        """
        now = now or utcnow()
        async with self.db.transaction() as session:
            row = (
                await session.execute(
                    select(calendar_bookings)
                    .where(calendar_bookings.c.session_id == session_id)
                    .with_for_update()
                )
            ).one_or_none()
            if row is None:
                raise UnknownSession(session_id)
            booking = booking_of(row)
            try:
                booking.retry(now)
            except NothingToRetry:
                return scheduling_of(booking)
            except IllegalTransition:
                raise RetryRefused(
                    f"session {session_id} was cancelled (its order ended): there is no "
                    "scheduling to retry"
                ) from None
            claimed = (
                await session.execute(
                    update(calendar_bookings)
                    .where(calendar_bookings.c.session_id == session_id)
                    .values(**_stored(booking), claimed_until=now + self.lease)
                    .returning(*calendar_bookings.c)
                )
            ).one()
            with correlated(row.correlation_id):
                await record_admin_action(
                    session,
                    messaging,
                    self.outbox,
                    action=AdminAction.RETRY_SCHEDULING,
                    by=by,
                    reason=reason,
                    at=now,
                    order_id=row.order_id,
                    session_id=session_id,
                    detail=(
                        f"scheduling had {'finally ' if row.final else ''}failed "
                        f"({row.reason}) after {row.attempts} attempt(s); tried again now, on a "
                        "new retry schedule"
                    ),
                )
        log.warning(
            "admin %s retries the scheduling of session %s (%s): %s",
            by,
            session_id,
            row.reason,
            reason,
        )
        self.spawn(self.schedule_claimed(claimed), name=f"retry-scheduling-{session_id}")
        return scheduling_of(booking_of(claimed))


def _what_next(booking: CalendarBooking) -> str:
    if booking.final:
        return "scheduling has given up"
    if booking.next_attempt_at is not None:
        return f"tried again from {booking.next_attempt_at.isoformat()}"
    return "scheduled as soon as the mentor connects Google again"


# -- the encryption key's rotation ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyRotation:
    """What `rotate_token_key` did, and what is left for the newest key."""

    rotated: int
    """Refresh tokens re-encrypted with the newest key by this run."""
    remaining: int
    """Stored tokens the newest key still cannot open after it (0: the older keys may go)."""
    unreadable: int
    """Of those, the ones no configured key opens: their mentors must connect again."""


async def rotate_token_key(db: Database, cipher: TokenCipher, *, batch_size: int) -> KeyRotation:
    """Re-encrypt every stored refresh token with the cipher's newest key, a batch at a time.

    Idempotent: a token the newest key already opens is left as it is, so a second run
    rotates nothing. Safe while the service serves: no lock is held while encrypting, and each
    batch is one UPDATE that writes a row only if it still holds what was read (a mentor who
    reconnected meanwhile keeps the token just stored). A last pass counts what the newest key
    still cannot open: rows written meanwhile by a replica still on the old keys, and tokens
    no key opens.
    """
    rotated = 0
    async for batch in _stored_tokens(db, batch_size):
        changes: list[tuple[uuid.UUID, str, str]] = []
        for mentor_id, stored in batch:
            if cipher.is_current(stored):
                continue
            try:
                changes.append((mentor_id, stored, cipher.rotate(stored)))
            except InvalidToken:
                continue  # counted by the last pass
        if changes:
            rotated += await _store_rotated(db, changes)
    remaining = unreadable = 0
    async for batch in _stored_tokens(db, batch_size):
        for mentor_id, stored in batch:
            if cipher.is_current(stored):
                continue
            remaining += 1
            try:
                cipher.decrypt(stored)
            except InvalidToken:
                unreadable += 1
                log.warning(
                    "the refresh token of mentor %s opens with none of the configured keys: "
                    "the mentor must connect their Google calendar again",
                    mentor_id,
                )
    return KeyRotation(rotated=rotated, remaining=remaining, unreadable=unreadable)


async def _stored_tokens(
    db: Database, batch_size: int
) -> AsyncIterator[list[tuple[uuid.UUID, str]]]:
    """Every connection's (mentor id, stored token), `batch_size` at a time, by mentor id."""
    after: uuid.UUID | None = None
    while True:
        query = (
            select(connections.c.mentor_id, connections.c.refresh_token_encrypted)
            .order_by(connections.c.mentor_id)
            .limit(batch_size)
        )
        if after is not None:
            query = query.where(connections.c.mentor_id > after)
        async with db.single_statement() as session:
            found = await session.execute(query)
            rows = [(row.mentor_id, row.refresh_token_encrypted) for row in found]
        if not rows:
            return
        yield rows
        after = rows[-1][0]


async def _store_rotated(db: Database, changes: list[tuple[uuid.UUID, str, str]]) -> int:
    """Write the re-encrypted tokens where the row still holds what was read; how many were."""
    rotated = values(
        column("mentor_id", Uuid), column("old", Text), column("new", Text), name="rotated"
    ).data(changes)
    async with db.single_statement() as session:
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
