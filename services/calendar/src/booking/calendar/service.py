"""The calendar service's units of work: connecting a mentor's Google calendar, and scheduling a
paid session in it.

Google is never called inside an open transaction. Connecting: the state is spent (a
conditional UPDATE) and committed, the code exchanged, then the connection stored in a second
transaction. Scheduling: a booking is claimed with a lease and committed, Google called, then
the outcome and its event recorded under the booking's row lock, so a duplicate or a concurrent
run finds the work done and does nothing. The event id in Google is derived from the session, so
a run repeated after a crash finds its event (409 duplicate) instead of making a second one.

A reconnect and a failure "for lack of a connection" both take the mentor's row lock (the
reconnect FOR UPDATE, the failure FOR SHARE, always before any booking's): whichever commits
second sees the other, so no booking stays failed while its mentor is connected.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import traceback
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Row, delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from booking.calendar.domain import (
    CALENDAR_SCOPE,
    RECOVERABLE,
    AlreadyConfirmed,
    BookingStatus,
    CalendarBooking,
    ConsentState,
    InvalidState,
    SessionEvent,
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
from booking.calendar.tables import calendar_bookings, connections, mentors, oauth_states
from booking.calendar.tokens import TokenCipher
from booking.contracts import (
    CalendarBookingConfirmed,
    CalendarBookingFailed,
    CalendarFailureReason,
    Event,
)
from booking.contracts.http import CalendarConnection
from booking.runtime.context import correlated
from booking.runtime.db import Database
from booking.runtime.outbox import Outbox

log = logging.getLogger(__name__)

# Events about one booking get ids derived from it: recording one twice stores it once.
_EVENTS = uuid.UUID("5d0f6c1a-8e2b-4f47-b1c3-2a9e7d4f6b18")

# Scopes that let us write the mentor's events (calendar.events, or all of calendar).
_WRITE_SCOPES = frozenset({CALENDAR_SCOPE, "https://www.googleapis.com/auth/calendar"})


def event_id(*parts: object) -> uuid.UUID:
    return uuid.uuid5(_EVENTS, ":".join(str(part) for part in parts))


def failure_event_id(session_id: uuid.UUID, run: int) -> uuid.UUID:
    """One CalendarBookingFailed per scheduling run: a booking retried after a reconnect that
    fails again is news; the same run recorded twice is not."""
    return event_id("failed", session_id, run)


def utcnow() -> datetime:
    return datetime.now(UTC)


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
    )


def _stored(booking: CalendarBooking) -> dict[str, Any]:
    return {
        "status": booking.status.value,
        "reason": booking.reason.value if booking.reason else None,
        "detail": booking.detail,
        "event_id": booking.event_id,
        "meet_link": booking.meet_link,
        "html_link": booking.html_link,
        "updated_at": booking.updated_at,
    }


async def lock_mentor(session: AsyncSession, mentor_id: uuid.UUID, *, share: bool) -> bool:
    """Take the mentor's row lock (see the module's docstring); False if the mentor is unknown."""
    query = select(mentors.c.id).where(mentors.c.id == mentor_id)
    query = query.with_for_update(read=share)
    return (await session.execute(query)).scalar_one_or_none() is not None


async def connection_of(
    session: AsyncSession | AsyncConnection, mentor_id: uuid.UUID
) -> Connection | None:
    query = (
        select(
            connections.c.mentor_id,
            mentors.c.timezone,
            connections.c.calendar_id,
            connections.c.refresh_token_encrypted,
            connections.c.connected_at,
            connections.c.revoked_at,
        )
        .join(mentors, mentors.c.id == connections.c.mentor_id)
        .where(connections.c.mentor_id == mentor_id)
    )
    row = (await session.execute(query)).one_or_none()
    return Connection(**row._mapping) if row is not None else None


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
        self._background: set[asyncio.Task] = set()

    # -- background work -------------------------------------------------------------------

    def spawn(self, work: Coroutine[Any, Any, Any], name: str) -> None:
        """Run `work` after the answer; the sweeper finishes whatever a crash leaves of it."""

        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("%s failed; the sweeper will finish it", name)

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
        """The mentor's bookings that failed for lack of a working connection: pending again."""
        reopened = await session.execute(
            update(calendar_bookings)
            .where(
                calendar_bookings.c.mentor_id == mentor_id,
                calendar_bookings.c.status == BookingStatus.FAILED.value,
                calendar_bookings.c.reason.in_([reason.value for reason in RECOVERABLE]),
            )
            .values(
                status=BookingStatus.PENDING.value,
                reason=None,
                detail=None,
                claimed_until=None,
                updated_at=now,
            )
            .returning(calendar_bookings.c.session_id)
        )
        return list(reopened.scalars())

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
            .values(claimed_until=now + self.lease, attempts=calendar_bookings.c.attempts + 1)
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
        event is read, so there is still exactly one.
        """
        with correlated(row.correlation_id):
            async with self.db.single_statement() as session:
                connection = await connection_of(session, row.mentor_id)
            missing = missing_connection(connection)
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
                    row,
                    CalendarFailureReason.CALENDAR_API_ERROR,
                    error.describe(),
                    attempts=error.attempts,
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

    async def _confirmed(self, row: Row[Any], confirmed: CalendarBookingConfirmed) -> BookingStatus:
        async with self.db.transaction() as session:
            booking = booking_of(await self._locked(session, row.session_id))
            try:
                booking.confirm(
                    confirmed.event_id, confirmed.meet_link, confirmed.html_link, utcnow()
                )
            except AlreadyConfirmed:
                return booking.status
            await session.execute(
                update(calendar_bookings)
                .where(calendar_bookings.c.session_id == row.session_id)
                .values(**_stored(booking), claimed_until=None)
            )
            await self._record(session, confirmed, event_id("confirmed", row.session_id))
        log.info(
            "session %s of order %s is in the mentor's calendar (event %s)",
            row.session_id,
            row.order_id,
            confirmed.event_id,
        )
        return booking.status

    async def _failed(
        self,
        row: Row[Any],
        reason: CalendarFailureReason,
        detail: str,
        *,
        attempts: int | None = None,
        seen: Connection | None = None,
        revoke: bool = False,
    ) -> BookingStatus:
        """Record that this run failed, once. For lack of a connection, unless the mentor
        connected (again) since this run looked: then the booking is run again with it."""
        now = utcnow()
        again = False
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
            if booking.status is not BookingStatus.PENDING:
                return booking.status  # settled by another run
            if again:
                await session.execute(
                    update(calendar_bookings)
                    .where(calendar_bookings.c.session_id == row.session_id)
                    .values(claimed_until=None, updated_at=now)
                )
            else:
                booking.fail(reason, detail, now)
                await session.execute(
                    update(calendar_bookings)
                    .where(calendar_bookings.c.session_id == row.session_id)
                    .values(**_stored(booking), claimed_until=None)
                )
                await self._record(
                    session,
                    CalendarBookingFailed(
                        session_id=row.session_id,
                        order_id=row.order_id,
                        mentor_id=row.mentor_id,
                        reason=reason,
                        detail=detail,
                        attempts=max(1, attempts or booking.attempts),
                    ),
                    failure_event_id(row.session_id, booking.attempts),
                )
        if again:
            log.info(
                "mentor %s connected again meanwhile: scheduling %s anew",
                row.mentor_id,
                row.session_id,
            )
            await self.schedule(row.session_id)
            return BookingStatus.PENDING
        log.warning(
            "session %s of order %s not scheduled: %s", row.session_id, row.order_id, reason.value
        )
        return booking.status

    async def _meet_pending(self, row: Row[Any], pending: MeetLinkPending) -> BookingStatus:
        """The event exists but has no Meet link yet: look again later, a bounded number of runs."""
        if row.attempts >= self.settings.scheduling_max_attempts:
            return await self._failed(
                row,
                CalendarFailureReason.CALENDAR_API_ERROR,
                f"Google made event {pending.event_id} but still had no Meet link for it after "
                f"{row.attempts} scheduling run(s)",
                attempts=row.attempts,
            )
        retry_at = utcnow() + timedelta(seconds=self.settings.meet_pending_retry_seconds)
        async with self.db.transaction() as session:
            await session.execute(
                update(calendar_bookings)
                .where(
                    calendar_bookings.c.session_id == row.session_id,
                    calendar_bookings.c.status == BookingStatus.PENDING.value,
                )
                .values(claimed_until=retry_at)
            )
        log.warning("%s; the sweeper looks again from %s", pending, retry_at.isoformat())
        return BookingStatus.PENDING
