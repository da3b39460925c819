"""The calendar service's rules: bookings, their retry schedule, the Google event of a session,
the consent `state`.

Pure: no I/O, no framework, no clock. Every method that stamps or checks a time takes `now`.

Calendar booking (each outcome of a run, and each failure decided without Google, counts one
attempt; a run lost before its outcome, to a crash or to our own database, counts none)::

    pending --confirm--> confirmed
    failed --confirm--> confirmed      (Google has the event after all: a late success wins)
    pending --fail--> failed           (RETRIED_ON_SCHEDULE reasons: waits for the schedule's
                                        next delay, then final; RECOVERABLE ones: waits for a
                                        reconnect; final at once when the session has begun)
    failed, not final, RECOVERABLE --> pending    (the mentor connected again: one UPDATE for
                                                   all of that mentor's bookings, the callback)
    failed, not final, next attempt due --> pending         (the sweeper runs it again)
    failed, not final, RECOVERABLE, start passed --give_up--> failed, final
    failed (final or not) --retry--> pending     (an admin: the schedule starts again)
    pending | confirmed | failed --cancel--> cancelled     (the order ended: any event Google
                                                            may have is owed a delete)
    (none) --> cancelled               (a tombstone: an OrderPaid after it never schedules)
    confirmed --confirm--> AlreadyConfirmed
    cancelled --cancel--> AlreadyCancelled; cancelled --confirm, fail, retry--> refused
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from booking.contracts import CalendarFailureReason
from booking.runtime.domain import DomainError, IllegalTransition

# The failures a working Google connection would have avoided: retried when the mentor connects.
RECOVERABLE = frozenset(
    {CalendarFailureReason.MENTOR_NOT_INTEGRATED, CalendarFailureReason.INTEGRATION_REVOKED}
)
# The failures tried again on the retry schedule, then final.
RETRIED_ON_SCHEDULE = frozenset(
    {
        CalendarFailureReason.CALENDAR_API_ERROR,
        CalendarFailureReason.UNEXPECTED_ERROR,
        CalendarFailureReason.STORE_NOT_FOUND,
    }
)

CALENDAR_SCOPE = "https://www.googleapis.com/auth/calendar.events"
PRIMARY_CALENDAR = "primary"


class BookingStatus(StrEnum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class AlreadyConfirmed(DomainError):
    """The booking has its event already (a repeated success): nothing to do."""


class AlreadyCancelled(DomainError):
    """The booking was cancelled already (a repeated OrderCancelled): nothing to do."""


class NothingToRetry(DomainError):
    """The booking is pending (a run is on it) or confirmed (done): a retry would change nothing."""


# -- the Google event of a session -------------------------------------------------------------


def google_event_id(session_id: UUID) -> str:
    """The event's id in the mentor's calendar, the same on every attempt.

    Google lets the client choose it (characters a-v and 0-9, 5 to 1024 of them, unique per
    calendar): a UUID's 32 hex digits fit, and a second insert under it answers 409 duplicate,
    so a retry can never make a second event.
    """
    return session_id.hex


def meet_request_id(session_id: UUID) -> str:
    """The Meet createRequest's id: one conference per session, whatever the attempt."""
    return f"meet-{session_id.hex}"


def local_time(moment: datetime, timezone: str) -> tuple[str, str]:
    """`moment` as RFC 3339 in the mentor's zone, and that zone (UTC when it is unknown)."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return moment.isoformat(), "UTC"
    return moment.astimezone(zone).isoformat(), timezone


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """What goes into the mentor's calendar for one booked session."""

    session_id: UUID
    order_id: UUID
    title: str
    mentee_email: str
    start_at: datetime
    end_at: datetime
    timezone: str

    @property
    def event_id(self) -> str:
        return google_event_id(self.session_id)

    def body(self) -> dict[str, Any]:
        """The Calendar v3 Event to insert (with conferenceDataVersion=1)."""
        start, zone = local_time(self.start_at, self.timezone)
        end, _ = local_time(self.end_at, self.timezone)
        return {
            "id": self.event_id,
            "summary": self.title,
            "description": (
                f"Mentoring session booked and paid on the platform (order {self.order_id}). "
                "Join with the Google Meet link of this event."
            ),
            "start": {"dateTime": start, "timeZone": zone},
            "end": {"dateTime": end, "timeZone": zone},
            "attendees": [{"email": self.mentee_email}],
            "conferenceData": {
                "createRequest": {
                    "requestId": meet_request_id(self.session_id),
                    "conferenceSolutionKey": {"type": "hangoutsMeet"},
                }
            },
        }


# -- the retry schedule ------------------------------------------------------------------------


class InvalidSchedule(DomainError, ValueError):
    """Retry delays that are not a comma-separated list of positive minutes."""


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """How long a booking that failed on the schedule waits before each next attempt.

    After its n-th such failure it waits `delays[n-1]`; the failure after the last delay is
    final. `1,5,15,60` is five attempts in all over some 81 minutes.
    """

    delays: tuple[timedelta, ...]

    @classmethod
    def from_minutes(cls, text: str) -> RetrySchedule:
        """`"1,5,15,60"`: minutes, fractions allowed, each above zero, at least one."""
        try:
            minutes = [float(part) for part in text.split(",")]
        except ValueError:
            raise InvalidSchedule(
                f"retry delays must be minutes separated by commas, got {text!r}"
            ) from None
        if not all(0 < value < float("inf") for value in minutes):
            raise InvalidSchedule(f"every retry delay must be a positive number, got {text!r}")
        return cls(tuple(timedelta(minutes=value) for value in minutes))

    def next_attempt_at(self, failures: int, now: datetime) -> datetime | None:
        """When to try again after the `failures`-th failure on the schedule; None: give up."""
        if failures < 1 or failures > len(self.delays):
            return None
        return now + self.delays[failures - 1]


# -- bookings ----------------------------------------------------------------------------------


@dataclass
class CalendarBooking:
    """The calendar's side of one paid session: pending until Google has its event."""

    session_id: UUID
    order_id: UUID
    mentor_id: UUID
    status: BookingStatus
    # Attempts recorded so far: outcomes of runs, and failures decided without Google.
    attempts: int
    updated_at: datetime
    reason: CalendarFailureReason | None = None
    detail: str | None = None
    event_id: str | None = None
    meet_link: str | None = None
    html_link: str | None = None
    # None for a tombstone (cancelled before any OrderPaid told us the session).
    start_at: datetime | None = None
    # Failures on the retry schedule since it (re)started.
    schedule_failures: int = 0
    # Scheduling has given up (status failed): it waits for an admin.
    final: bool = False
    # When the sweeper runs a failed booking again (failed, on the schedule, not final).
    next_attempt_at: datetime | None = None
    # Cancelled, and Google may still have its event: to delete.
    event_delete_pending: bool = False

    @property
    def waits_for_reconnect(self) -> bool:
        return self.status is BookingStatus.FAILED and not self.final and self.reason in RECOVERABLE

    def confirm(self, event_id: str, meet_link: str, html_link: str, now: datetime) -> None:
        """Google has the session's event. A late success after a failure wins over it."""
        if self.status is BookingStatus.CONFIRMED:
            raise AlreadyConfirmed(f"booking of session {self.session_id} is confirmed already")
        if self.status is BookingStatus.CANCELLED:
            raise self._refused(BookingStatus.CONFIRMED)
        self.status = BookingStatus.CONFIRMED
        self.event_id = event_id
        self.meet_link = meet_link
        self.html_link = html_link
        self.reason = None
        self.detail = None
        self.final = False
        self.next_attempt_at = None
        self.attempts += 1
        self.updated_at = now

    def put_off(self, now: datetime) -> None:
        """A run found the event without its Meet link yet: counted, and still pending."""
        if self.status is not BookingStatus.PENDING:
            raise self._refused(BookingStatus.PENDING)
        self.attempts += 1
        self.updated_at = now

    def fail(
        self,
        reason: CalendarFailureReason,
        detail: str,
        now: datetime,
        schedule: RetrySchedule,
    ) -> None:
        """An attempt failed: wait for the schedule's next delay, or for a reconnect, or give up.

        A failure on the schedule after its last delay is final. So is any failure once the
        session has begun: no later attempt could put it in the calendar in time.
        """
        if self.status is not BookingStatus.PENDING:
            raise self._refused(BookingStatus.FAILED)
        self.status = BookingStatus.FAILED
        self.reason = reason
        self.detail = detail
        self.attempts += 1
        self.updated_at = now
        self.next_attempt_at = None
        if reason in RECOVERABLE:
            self.final = self._begun(now)
            return
        self.schedule_failures += 1
        if not self._begun(now):
            self.next_attempt_at = schedule.next_attempt_at(self.schedule_failures, now)
        self.final = self.next_attempt_at is None

    def give_up(self, now: datetime) -> None:
        """No reconnect came before the session's start: scheduling is final."""
        if not self.waits_for_reconnect:
            raise self._refused(BookingStatus.FAILED)
        if not self._begun(now):
            raise DomainError(
                f"booking of session {self.session_id} still has until its start "
                f"({self.start_at}) for the mentor to connect again"
            )
        # Both hold here: a booking waiting for a reconnect failed for a reason, and one whose
        # session began has a start.
        assert self.reason is not None and self.start_at is not None
        self.final = True
        self.detail = (
            f"{self.detail or self.reason.value} The session began at "
            f"{self.start_at.isoformat()} and the mentor had not connected again: scheduling "
            "has given up."
        )
        self.updated_at = now

    def retry(self, now: datetime) -> None:
        """An admin tries a failed booking (final or not) again: pending, the schedule anew."""
        if self.status in (BookingStatus.PENDING, BookingStatus.CONFIRMED):
            raise NothingToRetry(
                f"booking of session {self.session_id} is {self.status.value}: "
                "there is nothing to retry"
            )
        if self.status is not BookingStatus.FAILED:
            raise self._refused(BookingStatus.PENDING)
        self.status = BookingStatus.PENDING
        self.reason = None
        self.detail = None
        self.final = False
        self.next_attempt_at = None
        self.schedule_failures = 0
        self.updated_at = now

    def cancel(self, why: str, now: datetime) -> None:
        """The order ended: never schedule it, and delete whatever event Google may have.

        Any booking may have one, whatever its status says: a run in flight or lost after its
        insert, or an insert that timed out on our side but went through at Google.
        """
        if self.status is BookingStatus.CANCELLED:
            raise AlreadyCancelled(f"booking of session {self.session_id} is cancelled already")
        self.status = BookingStatus.CANCELLED
        self.reason = None
        self.detail = f"the order was cancelled: {why}"
        self.final = False
        self.next_attempt_at = None
        self.event_delete_pending = True
        self.updated_at = now

    def _begun(self, now: datetime) -> bool:
        return self.start_at is not None and self.start_at <= now

    def _refused(self, to: BookingStatus) -> IllegalTransition:
        return IllegalTransition("calendar booking", self.session_id, self.status, to)


# -- the consent `state` -----------------------------------------------------------------------


class InvalidState(DomainError):
    """The `state` that came back from Google cannot be trusted."""


class TamperedState(InvalidState):
    """Not a state we signed (altered, forged or truncated)."""


class ExpiredState(InvalidState):
    """A state we signed, but its lifetime is over."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class ConsentState:
    """What the signed `state` of a consent round trip carries: who, which round trip, until when.

    Signed with HMAC-SHA256: `<payload>.<signature>`, both base64url. The nonce is the single-use
    record's key; the signature alone cannot stop a replay.
    """

    mentor_id: UUID
    nonce: str
    expires_at: datetime

    @classmethod
    def issue(cls, mentor_id: UUID, nonce: str, now: datetime, lifetime: timedelta) -> ConsentState:
        return cls(mentor_id=mentor_id, nonce=nonce, expires_at=now + lifetime)

    def sign(self, key: bytes) -> str:
        payload = json.dumps(
            {"m": str(self.mentor_id), "n": self.nonce, "e": self.expires_at.isoformat()},
            separators=(",", ":"),
        ).encode()
        signature = hmac.new(key, payload, hashlib.sha256).digest()
        return f"{_b64(payload)}.{_b64(signature)}"

    @classmethod
    def verify(cls, token: str, key: bytes, now: datetime) -> ConsentState:
        """The state `token` carries, if we signed it and it has not expired."""
        payload_part, dot, signature_part = token.partition(".")
        if not dot:
            raise TamperedState("the state is not one this service issued")
        try:
            payload = _unb64(payload_part)
            signature = _unb64(signature_part)
        except (binascii.Error, ValueError):
            raise TamperedState("the state is not one this service issued") from None
        expected = hmac.new(key, payload, hashlib.sha256).digest()
        if not hmac.compare_digest(signature, expected):
            raise TamperedState("the state's signature does not match: it was altered or forged")
        try:
            claims = json.loads(payload)
            state = cls(
                mentor_id=UUID(claims["m"]),
                nonce=str(claims["n"]),
                expires_at=datetime.fromisoformat(claims["e"]),
            )
        except (ValueError, KeyError, TypeError):
            raise TamperedState("the state is not one this service issued") from None
        if state.expires_at <= now:
            raise ExpiredState(
                f"the consent link expired at {state.expires_at.isoformat()}; start connecting "
                "again"
            )
        return state
