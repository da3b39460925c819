"""The calendar service's rules: bookings, the Google event of a session, the consent `state`.

Pure: no I/O, no framework, no clock. Every method that stamps or checks a time takes `now`.

Calendar booking::

    pending --confirm--> confirmed
    failed --confirm--> confirmed      (Google has the event after all: a late success wins)
    pending --fail--> failed
    failed (RECOVERABLE reasons) --> pending  (the mentor connected again: one UPDATE for all
                                              of that mentor's bookings, in the callback)
    confirmed --confirm--> AlreadyConfirmed
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

CALENDAR_SCOPE = "https://www.googleapis.com/auth/calendar.events"
PRIMARY_CALENDAR = "primary"


class BookingStatus(StrEnum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    FAILED = "failed"


class AlreadyConfirmed(DomainError):
    """The booking has its event already (a repeated success): nothing to do."""


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


# -- bookings ----------------------------------------------------------------------------------


@dataclass
class CalendarBooking:
    """The calendar's side of one paid session: pending until Google has its event."""

    session_id: UUID
    order_id: UUID
    mentor_id: UUID
    status: BookingStatus
    attempts: int
    updated_at: datetime
    reason: CalendarFailureReason | None = None
    detail: str | None = None
    event_id: str | None = None
    meet_link: str | None = None
    html_link: str | None = None

    def confirm(self, event_id: str, meet_link: str, html_link: str, now: datetime) -> None:
        """Google has the session's event. A late success after a failure wins over it."""
        if self.status is BookingStatus.CONFIRMED:
            raise AlreadyConfirmed(f"booking of session {self.session_id} is confirmed already")
        self.status = BookingStatus.CONFIRMED
        self.event_id = event_id
        self.meet_link = meet_link
        self.html_link = html_link
        self.reason = None
        self.detail = None
        self.updated_at = now

    def fail(self, reason: CalendarFailureReason, detail: str, now: datetime) -> None:
        if self.status is not BookingStatus.PENDING:
            raise IllegalTransition(
                "calendar booking", self.session_id, self.status, BookingStatus.FAILED
            )
        self.status = BookingStatus.FAILED
        self.reason = reason
        self.detail = detail
        self.updated_at = now


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
