"""The calendar service's units of work: keeping the mentors orders tells of, connecting a
mentor's Google calendar, scheduling a paid session in it (again, on a schedule, when it fails),
taking it out when its order is cancelled, an admin's retry, and the token key's rotation. What
an event asks runs in its message's transaction (the session the handler passes); the rest
opens its own. The SQL is repository.py's.

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

from sqlalchemy.ext.asyncio import AsyncSession

from booking.calendar import repository
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
    TokenGrant,
)
from booking.calendar.repository import ClaimedBooking, Connection
from booking.calendar.settings import CalendarSettings
from booking.calendar.tables import messaging
from booking.calendar.tokens import InvalidToken, TokenCipher
from booking.contracts import (
    AdminAction,
    CalendarBookingConfirmed,
    CalendarBookingFailed,
    CalendarFailureReason,
    Event,
    MentorIdentityLinked,
    MentorRegistered,
    OrderCancelled,
    OrderPaid,
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


class UnknownMentorLinked(Exception):
    """A link for a mentor whose MentorRegistered has not reached us (yet)."""


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
        self._background: set[asyncio.Task[None]] = set()

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

    # -- mentors, as orders tells of them (in the message's transaction) --------------------

    async def register_mentor(self, session: AsyncSession, event: MentorRegistered) -> None:
        """Keep our own record of the mentor (the first registration stands; repeats change
        nothing)."""
        await repository.add_mentor(
            session,
            mentor_id=event.mentor_id,
            name=event.name,
            email=event.email,
            timezone=event.timezone,
            identity_subject=event.identity_subject,
        )

    async def link_identity(self, session: AsyncSession, event: MentorIdentityLinked) -> None:
        """Keep the mentor's identity-provider subject: the link of the highest sequence stands,
        so a late or replayed older link changes nothing.

        A link for a mentor we do not know raises UnknownMentorLinked: the consumer tries again
        (MentorRegistered is usually just behind), then keeps it as a dead letter to replay
        once the mentor is known.
        """
        if await repository.link_identity(
            session, event.mentor_id, event.identity_subject, event.sequence
        ):
            log.info("mentor %s is linked to a new identity subject", event.mentor_id)
            return
        if not await repository.mentor_known(session, event.mentor_id):
            raise UnknownMentorLinked(
                f"no mentor {event.mentor_id} to link (no MentorRegistered yet); tried again"
            )

    # -- connecting ------------------------------------------------------------------------

    async def consent_url(self, mentor_id: uuid.UUID, now: datetime | None = None) -> str:
        """Google's consent URL for the mentor, with a signed state good once, for a while."""
        now = now or utcnow()
        lifetime = timedelta(seconds=self.settings.oauth_state_lifetime_seconds)
        state = ConsentState.issue(mentor_id, secrets.token_urlsafe(24), now, lifetime)
        async with self.db.transaction() as session:
            email = await repository.mentor_email(session, mentor_id)
            if email is None:
                raise UnknownMentor(mentor_id)
            await repository.add_state(
                session,
                nonce=state.nonce,
                mentor_id=mentor_id,
                expires_at=state.expires_at,
                created_at=now,
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
            if not await repository.lock_mentor(session, consent.mentor_id, share=False):
                raise ConnectRefused(404, f"no mentor has the id {consent.mentor_id}")
            calendar_id = await repository.store_connection(
                session,
                consent.mentor_id,
                refresh_token_encrypted=encrypted,
                scope=grant.scope,
                connected_at=connected_at,
            )
            # The bookings that wait for a working connection: pending again. Not the final
            # ones: their session has begun, or an admin has them.
            reopened = await repository.reopen_bookings(session, consent.mentor_id, connected_at)
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
            if await repository.spend_state(session, consent.nonce, consent.mentor_id, now):
                return
            used_at = await repository.state_used_at(session, consent.nonce)
        if used_at is not None:
            raise ConnectRefused(
                400,
                f"this consent link was used already (at {used_at.isoformat()}); each works "
                "once: start connecting again. Nothing was stored",
            )
        raise ConnectRefused(
            400, "the state is not one this service issued or it expired; nothing was stored"
        )

    async def _exchange(self, code: str) -> TokenGrant:
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

    async def identity_subject(self, mentor_id: uuid.UUID) -> str | None:
        """The identity-provider subject that acts as the mentor; None if it has none or the
        mentor is unknown (then only an admin or the mentor's own id acts as it)."""
        async with self.db.single_statement() as session:
            return await repository.identity_subject(session, mentor_id)

    async def connection_status(self, mentor_id: uuid.UUID) -> CalendarConnection:
        async with self.db.single_statement() as session:
            known, connection = await repository.mentor_standing(session, mentor_id)
        if not known:
            raise UnknownMentor(mentor_id)
        if connection is None:
            return CalendarConnection(
                connected=False, calendar_id=None, connected_at=None, revoked=False
            )
        return CalendarConnection(
            connected=connection.working,
            calendar_id=connection.calendar_id,
            connected_at=connection.connected_at,
            revoked=not connection.working,
        )

    async def disconnect(self, mentor_id: uuid.UUID) -> None:
        """Forget the mentor's tokens; later bookings fail mentor_not_integrated."""
        async with self.db.transaction() as session:
            if not await repository.lock_mentor(session, mentor_id, share=False):
                raise UnknownMentor(mentor_id)
            await repository.delete_connection(session, mentor_id)
        self.google.forget(mentor_id)
        log.info("mentor %s disconnected their Google calendar", mentor_id)

    # -- scheduling ------------------------------------------------------------------------

    async def open_booking(
        self, session: AsyncSession, event: OrderPaid, correlation_id: str
    ) -> bool:
        """Open the paid session's calendar booking, in the message's transaction; True if it
        is then to be scheduled in Google (`schedule`, once committed, never inside it).

        One booking per session, however often OrderPaid arrives: the session id's primary key
        decides, not a check (a session cancelled first has its tombstone there, and is never
        scheduled). What needs no Google is decided here (an unknown mentor, no connection, a
        revoked one): the first attempt, failed. If the step after the commit is lost, the
        sweeper schedules the booking.
        """
        now = utcnow()
        booking = await repository.open_booking(session, event, correlation_id, now)
        if booking is None:
            return False  # a repeat (the first OrderPaid opened it), or the session was cancelled
        # FOR SHARE: a reconnect in flight (FOR UPDATE) commits first, and then we see it.
        if await repository.lock_mentor(session, event.mentor_id, share=True):
            missing = missing_connection(await repository.connection_of(session, event.mentor_id))
        else:
            missing = unknown_mentor(event.mentor_id)
        if missing is None:
            return True
        booking.fail(*missing, now, self.retries)
        await self._record_failure(session, booking, now)
        return False

    async def schedule(self, session_id: uuid.UUID, now: datetime | None = None) -> None:
        """Schedule a pending booking, unless another run holds it (the fast path)."""
        now = now or utcnow()
        async with self.db.single_statement() as session:
            claimed = await repository.claim_pending(session, session_id, now, now + self.lease)
        if claimed is not None:
            await self.schedule_claimed(*claimed)

    async def schedule_claimed(
        self, claim: ClaimedBooking, standing: repository.Standing | None = None
    ) -> BookingStatus:
        """Put a booking this run holds the lease of into Google; record the outcome.

        Runs outside any transaction. A crash before the outcome is recorded leaves the lease
        to lapse, and the sweeper runs it again: Google answers 409 for the event id and the
        event is read, so there is still exactly one. Nothing is counted for the lost run.
        `standing`: the mentor's, if the claim read it (else it is read here); a reconnect
        since is seen when the failure is recorded (`_failed`).
        """
        with correlated(claim.correlation_id):
            if standing is None:
                async with self.db.single_statement() as session:
                    standing = await repository.mentor_standing(session, claim.mentor_id)
            known, connection = standing
            missing = missing_connection(connection) if known else unknown_mentor(claim.mentor_id)
            if missing is not None:
                return await self._failed(claim, *missing, seen=connection)
            assert connection is not None
            try:
                credentials = MentorCredentials(
                    claim.mentor_id, self.cipher.decrypt(connection.refresh_token_encrypted)
                )
                session_event = _session_event(claim, connection.timezone)
                event = await self.google.insert_event(
                    credentials, connection.calendar_id, session_event
                )
                confirmed = self._confirmation(claim, event)
            except IntegrationRevoked as revoked:
                detail = (
                    f"Google refused the mentor's refresh token ({revoked.message}); the "
                    "connection is marked revoked and the booking is scheduled as soon as they "
                    "connect again"
                )
                return await self._failed(
                    claim,
                    CalendarFailureReason.INTEGRATION_REVOKED,
                    detail,
                    seen=connection,
                    revoke=True,
                )
            except MeetLinkPending as pending:
                return await self._meet_pending(claim, pending)
            except GoogleError as error:
                return await self._failed(
                    claim, CalendarFailureReason.CALENDAR_API_ERROR, error.describe()
                )
            except GoogleClientClosed:
                raise  # shutting down: the lease lapses and the sweeper runs it again
            except Exception:
                log.exception("scheduling session %s failed unexpectedly", claim.session_id)
                return await self._failed(
                    claim, CalendarFailureReason.UNEXPECTED_ERROR, stack_trace()
                )
            return await self._confirmed(claim, confirmed)

    @staticmethod
    def _confirmation(claim: ClaimedBooking, event: CalendarEvent) -> CalendarBookingConfirmed:
        # Built before anything is recorded: an answer we cannot confirm with fails the run.
        return CalendarBookingConfirmed(
            session_id=claim.session_id,
            order_id=claim.order_id,
            event_id=event.id or claim.event_id,
            meet_link=event.meet_link,  # type: ignore[arg-type]  # pydantic refuses a None
            html_link=event.html_link,  # type: ignore[arg-type]
        )

    @staticmethod
    async def _locked(session: AsyncSession, session_id: uuid.UUID) -> CalendarBooking:
        tracked = await repository.lock_booking(session, session_id)
        assert tracked is not None, f"no booking of session {session_id}"
        return tracked.booking

    async def _record(self, session: AsyncSession, event: Event, message_id: uuid.UUID) -> None:
        await self.outbox.record(session, event, message_id=message_id)

    async def _record_failure(
        self, session: AsyncSession, booking: CalendarBooking, now: datetime
    ) -> None:
        """A failed attempt, in the caller's transaction: the booking as `fail` left it (its
        lease released), the attempt's row, and its CalendarBookingFailed."""
        await repository.record_outcome(session, booking, "failed", now)
        await self._record(
            session, failure_of(booking), failure_event_id(booking.session_id, booking.attempts)
        )

    async def _cancelled_meanwhile(
        self, session: AsyncSession, session_id: uuid.UUID, now: datetime
    ) -> ClaimedBooking:
        """The booking was cancelled while this run asked Google: whatever event it made is
        owed a delete, which this run takes on (its call is over) under a lease of its own."""
        log.warning(
            "session %s was cancelled while it was being scheduled: its event is deleted",
            session_id,
        )
        return await repository.take_over_deletion(session, session_id, now, now + self.lease)

    async def _confirmed(
        self, claim: ClaimedBooking, confirmed: CalendarBookingConfirmed
    ) -> BookingStatus:
        now = utcnow()
        async with self.db.transaction() as session:
            booking = await self._locked(session, claim.session_id)
            if booking.status is BookingStatus.CANCELLED:
                owed = await self._cancelled_meanwhile(session, claim.session_id, now)
            else:
                owed = None
                try:
                    booking.confirm(
                        confirmed.event_id, confirmed.meet_link, confirmed.html_link, now
                    )
                except AlreadyConfirmed:
                    return booking.status
                await repository.record_outcome(session, booking, "confirmed", now)
                await self._record(session, confirmed, event_id("confirmed", claim.session_id))
        if owed is not None:
            await self.delete_claimed(owed)
            return BookingStatus.CANCELLED
        log.info(
            "session %s of order %s is in the mentor's calendar (event %s, attempt %d)",
            claim.session_id,
            claim.order_id,
            confirmed.event_id,
            booking.attempts,
        )
        return booking.status

    async def _failed(
        self,
        claim: ClaimedBooking,
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
                await repository.lock_mentor(session, claim.mentor_id, share=True)
                if revoke and seen is not None:
                    await repository.mark_revoked(session, claim.mentor_id, seen.connected_at, now)
                current = await repository.connection_of(session, claim.mentor_id)
                again = (
                    current is not None
                    and current.working
                    and (seen is None or current.connected_at != seen.connected_at)
                )
            booking = await self._locked(session, claim.session_id)
            if booking.status is BookingStatus.CANCELLED:
                # An insert that failed on our side may still have made the event at Google.
                owed = await self._cancelled_meanwhile(session, claim.session_id, now)
            elif booking.status is not BookingStatus.PENDING:
                return booking.status  # settled by another run
            elif again:
                await repository.release(session, claim.session_id, now)
            else:
                booking.fail(reason, detail, now, self.retries)
                await self._record_failure(session, booking, now)
        if owed is not None:
            await self.delete_claimed(owed)
            return BookingStatus.CANCELLED
        if again:
            log.info(
                "mentor %s connected again meanwhile: scheduling %s anew",
                claim.mentor_id,
                claim.session_id,
            )
            await self.schedule(claim.session_id)
            return BookingStatus.PENDING
        log.warning(
            "session %s of order %s not scheduled (attempt %d): %s; %s",
            claim.session_id,
            claim.order_id,
            booking.attempts,
            reason.value,
            _what_next(booking),
        )
        return booking.status

    async def _meet_pending(self, claim: ClaimedBooking, pending: MeetLinkPending) -> BookingStatus:
        """The event exists but has no Meet link yet: look again later, a bounded number of runs."""
        attempt = claim.attempts + 1
        if attempt >= self.settings.scheduling_max_attempts:
            return await self._failed(
                claim,
                CalendarFailureReason.CALENDAR_API_ERROR,
                f"Google made event {pending.event_id} but still had no Meet link for it after "
                f"{attempt} scheduling run(s)",
            )
        now = utcnow()
        retry_at = now + timedelta(seconds=self.settings.meet_pending_retry_seconds)
        owed = None
        async with self.db.transaction() as session:
            booking = await self._locked(session, claim.session_id)
            if booking.status is BookingStatus.CANCELLED:
                owed = await self._cancelled_meanwhile(session, claim.session_id, now)
            elif booking.status is not BookingStatus.PENDING:
                return booking.status
            else:
                booking.put_off(now)
                await repository.put_off(session, booking, until=retry_at)
                await repository.record_attempt(
                    session, booking, "meet_pending", now, detail=str(pending)
                )
        if owed is not None:
            await self.delete_claimed(owed)
            return BookingStatus.CANCELLED
        log.warning("%s; the sweeper looks again from %s", pending, retry_at.isoformat())
        return BookingStatus.PENDING

    async def give_up_unscheduled(self, now: datetime, limit: int) -> int:
        """Bookings still waiting for a reconnect when their session began: final now, each
        with its final CalendarBookingFailed, once. How many (at most `limit`)."""
        async with self.db.transaction() as session:
            waiting = await repository.lock_waiting(session, now, limit)
            for tracked in waiting:
                booking = tracked.booking
                booking.give_up(now)
                await repository.save_booking(session, booking)
                with correlated(tracked.correlation_id):
                    await self._record(
                        session,
                        failure_of(booking),
                        given_up_event_id(booking.session_id, booking.attempts),
                    )
        for tracked in waiting:
            log.warning(
                "session %s of order %s began unscheduled (%s): scheduling has given up",
                tracked.booking.session_id,
                tracked.booking.order_id,
                tracked.booking.reason,
            )
        return len(waiting)

    # -- cancelled sessions ----------------------------------------------------------------

    async def cancel_booking(
        self, session: AsyncSession, event: OrderCancelled, correlation_id: str
    ) -> bool:
        """The order ended: its session's booking cancelled, in the message's transaction. True
        if Google may have its event, which is then owed a delete (`delete_owed`, once
        committed: by the run in flight, if one holds the booking; by the sweeper, if that step
        is lost).

        With no booking yet (the order ended before it was paid, or OrderCancelled overtook
        OrderPaid), a tombstone takes the session's key, so a later OrderPaid never schedules it.
        A run holding the lease keeps it: it deletes its event itself when it comes back.
        """
        now = utcnow()
        tracked = await repository.lock_booking(session, event.session_id)
        if tracked is None:
            if await repository.add_tombstone(
                session,
                session_id=event.session_id,
                order_id=event.order_id,
                mentor_id=event.mentor_id,
                detail=f"the order was cancelled before it was paid: {event.reason}",
                correlation_id=correlation_id,
                now=now,
            ):
                return False
            # OrderPaid's booking committed meanwhile: cancel that one.
            booking = await self._locked(session, event.session_id)
        else:
            booking = tracked.booking
        try:
            booking.cancel(event.reason, now)
        except AlreadyCancelled:
            return False
        await repository.save_booking(session, booking)
        if booking.event_delete_pending:
            log.info(
                "session %s was cancelled (%s): its event is deleted",
                event.session_id,
                event.reason,
            )
        return booking.event_delete_pending

    async def delete_owed(self, session_id: uuid.UUID, now: datetime | None = None) -> None:
        """Delete the Google event a cancelled booking owes, unless a run holds its lease (that
        run deletes it when it comes back; the sweeper, once the lease lapses)."""
        now = now or utcnow()
        async with self.db.single_statement() as session:
            claim = await repository.claim_deletion(session, session_id, now, now + self.lease)
        if claim is not None:
            await self.delete_claimed(claim)

    async def delete_claimed(self, claim: ClaimedBooking) -> bool:
        """Delete the event of a cancelled booking this run holds the lease of; True once it is
        settled: Google said it is gone (204, 410, 404), or no working connection can ask.

        Otherwise the delete stays owed, and the sweeper tries again once the lease lapses.
        """
        with correlated(claim.correlation_id):
            async with self.db.single_statement() as session:
                _known, connection = await repository.mentor_standing(session, claim.mentor_id)
            if connection is None or not connection.working:
                log.warning(
                    "session %s was cancelled, but mentor %s has no working Google connection: "
                    "an event of it in their calendar (%s) cannot be deleted by the platform",
                    claim.session_id,
                    claim.mentor_id,
                    claim.event_id,
                )
                return await self._deletion_settled(claim)
            try:
                credentials = MentorCredentials(
                    claim.mentor_id, self.cipher.decrypt(connection.refresh_token_encrypted)
                )
                deleted = await self.google.delete_event(
                    credentials, connection.calendar_id, claim.event_id
                )
            except IntegrationRevoked as revoked:
                log.warning(
                    "session %s was cancelled, but Google refused mentor %s's refresh token "
                    "(%s): its event cannot be deleted by the platform",
                    claim.session_id,
                    claim.mentor_id,
                    revoked.message,
                )
                return await self._deletion_settled(claim, revoked=connection)
            except GoogleError as error:
                log.warning(
                    "the event of cancelled session %s is not deleted yet: %s; tried again from %s",
                    claim.session_id,
                    error.describe(),
                    claim.claimed_until.isoformat(),
                )
                return False
            except GoogleClientClosed:
                raise  # shutting down: the lease lapses and the sweeper deletes it
            except Exception:
                log.exception(
                    "deleting the event of cancelled session %s failed unexpectedly; tried "
                    "again from %s",
                    claim.session_id,
                    claim.claimed_until.isoformat(),
                )
                return False
            settled = await self._deletion_settled(claim)
            log.info(
                "session %s was cancelled: its event %s %s",
                claim.session_id,
                claim.event_id,
                "is deleted" if deleted else "was gone already",
            )
            return settled

    async def _deletion_settled(
        self, claim: ClaimedBooking, revoked: Connection | None = None
    ) -> bool:
        """Nothing more to delete, if this run's lease still holds: a run that has taken the
        delete over since (it brought an event back) keeps it owed and deletes it itself."""
        now = utcnow()
        async with self.db.transaction() as session:
            if revoked is not None:
                await repository.mark_revoked(session, claim.mentor_id, revoked.connected_at, now)
            return await repository.settle_deletion(session, claim, now)

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
            tracked = await repository.lock_booking(session, session_id)
            if tracked is None:
                raise UnknownSession(session_id)
            booking = tracked.booking
            # As it failed: `retry` forgets it.
            failed = (booking.final, booking.reason, booking.attempts)
            try:
                booking.retry(now)
            except NothingToRetry:
                return scheduling_of(booking)
            except IllegalTransition:
                raise RetryRefused(
                    f"session {session_id} was cancelled (its order ended): there is no "
                    "scheduling to retry"
                ) from None
            claim = await repository.claim_retried(session, booking, now + self.lease)
            was_final, was_reason, attempts = failed
            with correlated(tracked.correlation_id):
                await record_admin_action(
                    session,
                    messaging,
                    self.outbox,
                    action=AdminAction.RETRY_SCHEDULING,
                    by=by,
                    reason=reason,
                    at=now,
                    order_id=booking.order_id,
                    session_id=session_id,
                    detail=(
                        f"scheduling had {'finally ' if was_final else ''}failed "
                        f"({was_reason}) after {attempts} attempt(s); tried again now, on a "
                        "new retry schedule"
                    ),
                )
        log.warning(
            "admin %s retries the scheduling of session %s (%s): %s",
            by,
            session_id,
            was_reason,
            reason,
        )
        self.spawn(self.schedule_claimed(claim), name=f"retry-scheduling-{session_id}")
        return scheduling_of(booking)


def _session_event(claim: ClaimedBooking, timezone: str) -> SessionEvent:
    """What goes into the calendar for a claimed booking (one OrderPaid opened: never a
    tombstone, which is never scheduled)."""
    assert claim.title is not None and claim.mentee_email is not None
    assert claim.start_at is not None and claim.end_at is not None
    return SessionEvent(
        session_id=claim.session_id,
        order_id=claim.order_id,
        title=claim.title,
        mentee_email=claim.mentee_email,
        start_at=claim.start_at,
        end_at=claim.end_at,
        timezone=timezone,
    )


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
        async with db.single_statement() as session:
            rows = await repository.stored_tokens(session, after, batch_size)
        if not rows:
            return
        yield rows
        after = rows[-1][0]


async def _store_rotated(db: Database, changes: list[tuple[uuid.UUID, str, str]]) -> int:
    """Write the re-encrypted tokens where the row still holds what was read; how many were."""
    async with db.single_statement() as session:
        return await repository.store_rotated(session, changes)
