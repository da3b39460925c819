"""The public HTTP contract's bodies (the gateway's OpenAPI): what callers send and get back.

Defined once, here: the gateway checks requests against these models and the services answer
with them, so the two cannot drift apart.

Request bodies forbid unknown fields (422). Responses tolerate extra fields, so a service can add
one without breaking the contract. Money is {amount: minor units, currency}; times are RFC 3339
and timezone-aware; ids are the UUIDs the services give, notifications' increasing integers.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    StrictInt,
)
from pydantic import StringConstraints as Text

from booking.contracts.events import Currency
from booking.contracts.money import PRICE_CEILING_MINOR_UNITS, KonnectCurrency

# No NUL characters: Postgres cannot store them, so they are the caller's error (422), not a 500.
Name = Annotated[
    str, Text(strip_whitespace=True, min_length=1, max_length=200, pattern=r"^[^\x00]*$")
]
TimeZone = Annotated[str, Text(pattern=r"^[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+)*$")]
Phone = Annotated[str, Text(pattern=r"^\+?[0-9][0-9 ().\-]{4,24}$")]
# OpenID Connect: a `sub` is at most 255 ASCII characters; providers use visible ones only
# (Keycloak a UUID, Auth0 `auth0|...`), so spaces and control characters are the caller's error.
IdentitySubject = Annotated[
    str, Text(strip_whitespace=True, min_length=1, max_length=255, pattern=r"^[!-~]+$")
]


def _in_utc(value: datetime) -> datetime:
    """An instant whose UTC reading exists: 0001-01-01T00:00:00+01:00 is before year 1 in UTC,
    which Python cannot represent and Postgres cannot store (a 500 otherwise)."""
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ValueError("the instant is outside the years 1 to 9999 in UTC") from None
    return value  # as given: forwarded and echoed with the caller's offset


# An RFC 3339 time with its offset, that exists in UTC.
Instant = Annotated[AwareDatetime, AfterValidator(_in_utc)]

OrderStatus = Literal[
    "pending", "awaiting_payment", "paid", "confirmed", "payment_failed", "cancelled"
]
SessionStatus = Literal[
    "pending_payment", "awaiting_calendar", "scheduled", "scheduling_failed", "cancelled"
]
NotificationType = Literal[
    "IntegrationFailure", "PaymentAnomaly", "SessionIssue", "SystemError", "HealthCheckFailure"
]
Severity = Literal["Info", "Warning", "Error", "Critical"]
EscrowStatus = Literal["held", "released", "frozen", "refund_due", "refunded"]
DeadLetterStatus = Literal["kept", "replayed", "discarded"]
ServiceName = Literal["orders", "payments", "calendar", "notifications"]


MAX_MINOR_UNITS = 2**63 - 1
"""The most money a column can hold (Postgres BIGINT): a larger amount is refused, not stored."""


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Money(RequestBody):
    amount: StrictInt = Field(
        ge=0,
        le=MAX_MINOR_UNITS,
        description="in the currency's minor unit (millimes for TND)",
    )
    currency: Currency = Field(description="ISO 4217 code in upper case", examples=["TND"])


class Price(RequestBody):
    """What an offering costs: money Konnect can take (booking.contracts.money)."""

    amount: StrictInt = Field(
        gt=0,
        le=PRICE_CEILING_MINOR_UNITS,
        description="in the currency's minor unit: millimes for TND (1 TND = 1000), cents for "
        "EUR and USD (100); positive and at most this ceiling. The platform's own maximum is "
        "lower (by default 10,000 TND, EUR or USD): a price above it is answered 422",
        examples=[120000],
    )
    currency: KonnectCurrency = Field(description="a currency Konnect takes", examples=["TND"])


SESSION_MINUTES_MIN = 15
SESSION_MINUTES_MAX = 8 * 60


# --- requests ---------------------------------------------------------------------------------


class MentorCreate(RequestBody):
    name: Name
    email: EmailStr
    timezone: TimeZone = Field(description="IANA name", examples=["Africa/Tunis"])
    identity_subject: IdentitySubject | None = Field(
        None,
        description="the mentor's `sub` at the identity provider: a token with it (and the "
        "mentor role) acts as this mentor; one mentor per subject",
        examples=["f81d4fae-7dec-41d0-a765-00a0c91e6bf6"],
    )


class OfferingCreate(RequestBody):
    title: Name
    duration_minutes: StrictInt = Field(
        ge=SESSION_MINUTES_MIN,
        le=SESSION_MINUTES_MAX,
        description="how long a session lasts: 15 minutes to 8 hours",
    )
    price: Price


class MenteeContact(RequestBody):
    first_name: Name
    last_name: Name
    email: EmailStr
    phone: Phone | None = None


class BookingCreate(RequestBody):
    offering_id: UUID
    start_at: Instant
    mentee: MenteeContact


Reason = Annotated[
    str, Text(strip_whitespace=True, min_length=1, max_length=1000, pattern=r"^[^\x00]*$")
]


class AdminReason(RequestBody):
    """Why an admin acts: kept in the audit trail with who and when."""

    reason: Reason


class MentorIdentityLink(RequestBody):
    """An admin links a mentor to its identity-provider subject (or changes it), saying why."""

    identity_subject: IdentitySubject = Field(
        description="the mentor's `sub` at the identity provider; one mentor per subject"
    )
    reason: Reason


class OptionalReason(RequestBody):
    reason: Reason | None = None


class DeadLetterFilter(RequestBody):
    """Which kept dead letters a bulk replay takes (all of them when nothing is given)."""

    service: ServiceName | None = None
    type: Annotated[str, Text(min_length=1, max_length=100, pattern=r"^[^\x00]*$")] | None = None


class EscrowSettlement(RequestBody):
    """An admin's decision on an order's escrow: `release` it to the mentor (from frozen),
    `refund` it (frozen -> refund_due), or record the refund as `refunded` (with `reference`)."""

    action: Literal["release", "refund", "refunded"]
    reason: Reason
    reference: (
        Annotated[
            str, Text(strip_whitespace=True, min_length=1, max_length=200, pattern=r"^[^\x00]*$")
        ]
        | None
    ) = Field(None, description="the refund's payment reference; required for refunded")


# --- responses --------------------------------------------------------------------------------


class Mentor(BaseModel):
    id: UUID
    name: str
    email: str
    timezone: str
    identity_subject: str | None = Field(
        description="the identity-provider subject that acts as this mentor; null if none"
    )


class Offering(BaseModel):
    id: UUID
    mentor_id: UUID
    title: str
    duration_minutes: int
    price: Money


class BookingAccepted(BaseModel):
    order_id: UUID
    session_id: UUID
    status: OrderStatus


class PaymentView(BaseModel):
    ref: str | None
    pay_url: str | None
    status: str


class SessionView(BaseModel):
    id: UUID
    status: SessionStatus
    start_at: datetime
    end_at: datetime
    meet_link: str | None
    calendar_event_id: str | None


class EscrowView(BaseModel):
    platform_fee: Money
    escrow_amount: Money
    status: EscrowStatus | None = None


class Order(BaseModel):
    id: UUID
    status: OrderStatus
    amount: Money
    amount_paid: Money
    payment: PaymentView | None
    session: SessionView
    escrow: EscrowView | None
    version: int = Field(
        ge=1,
        description="grows with every change of what this shows; the `id` of the order's "
        "Server-Sent Events (GET /api/orders/{order_id}/events)",
    )


class WebhookResult(BaseModel):
    payment_ref: str
    status: str


class CalendarConnection(BaseModel):
    connected: bool
    calendar_id: str | None
    connected_at: datetime | None
    revoked: bool


# The HTTP shape of the notifications service's stored Notification (its domain.py), field by
# field: the wire model and the entity stay separate on purpose (the contracts import no service).
# pylint: disable=duplicate-code
class Notification(BaseModel):
    id: int
    type: NotificationType
    severity: Severity
    title: str
    message: str
    metadata: dict[str, Any]
    is_read: bool
    read_at: datetime | None
    created_at: datetime
    fingerprint: str
    occurrences: int
    last_occurred_at: datetime


# pylint: enable=duplicate-code


class NotificationPage(BaseModel):
    items: list[Notification]
    next_cursor: str | None


class FeedFilter(BaseModel):
    """The feed's filters as the query string carries them, declared once for the gateway and
    the notifications service; what a name or number means, the service decides."""

    unread_only: bool | None = Field(None, alias="unreadOnly")
    severity: str | None = Field(
        None, max_length=20, description="exactly this severity: a name (Error) or 0..3"
    )
    min_severity: str | None = Field(
        None,
        alias="minSeverity",
        max_length=20,
        description="this severity or a graver one: a name (Error) or 0..3",
    )
    type: str | None = Field(
        None, max_length=40, description="a name (PaymentAnomaly) or its number (0..4)"
    )
    since: Instant | None = Field(
        None, description="only those that occurred (first or again) at or after this instant"
    )


class MarkedRead(BaseModel):
    updated: int = Field(description="how many notifications were marked read")


class DayCount(BaseModel):
    day: date
    severity: Severity
    count: int


class NotificationSummary(BaseModel):
    days: int
    counts: list[DayCount]


class Escrow(BaseModel):
    """An order's escrow as payments holds it."""

    order_id: UUID
    status: EscrowStatus
    escrow_amount: Money
    refund_amount: Money | None
    reason: str | None
    reference: str | None
    release_due_at: datetime | None
    updated_at: datetime


class SessionScheduling(BaseModel):
    """Where the scheduling of a paid session in its mentor's calendar stands."""

    session_id: UUID
    order_id: UUID
    status: Literal["pending", "confirmed", "failed", "cancelled"]
    reason: str | None
    final: bool
    attempts: int
    next_attempt_at: datetime | None


class DeadLetter(BaseModel):
    """A message a service could not handle, kept for an admin to replay or discard."""

    id: str = Field(description="`<service>:<n>`", examples=["payments:42"])
    service: str = Field(examples=["payments"])
    message_id: str | None
    type: str | None
    error: str
    attempts: int
    dead_lettered_at: datetime
    status: DeadLetterStatus


class DeadLetterDetail(DeadLetter):
    consumer: str
    reason: str
    routing_key: str | None
    envelope: dict[str, Any] | None = Field(description="the message as it came, when readable")
    body: str | None = Field(description="the raw body, when it is not a readable envelope")
    replayed_at: datetime | None
    discarded_at: datetime | None
    decided_by: str | None
    decision_reason: str | None


class DeadLetterPage(BaseModel):
    items: list[DeadLetter]
    next_cursor: str | None


def cursor_token(text: str) -> str:
    """A listing's position as the opaque token callers pass back (URL-safe, unpadded)."""
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def cursor_text(token: str) -> str:
    """What `cursor_token` made `token` from; ValueError for anything it did not make."""
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
    except ValueError as exc:  # bad base64 (binascii.Error), not ASCII, not text
        raise ValueError("not a cursor") from exc


@dataclass(frozen=True)
class DeadLetterCursor:
    """Where a page of dead letters ended: they come newest first, by (dead_lettered_at, id).

    The next page holds those strictly before (at, id) in that order.
    """

    at: datetime
    id: int

    def encode(self) -> str:
        return cursor_token(f"{self.at.isoformat()}|{self.id}")

    @classmethod
    def decode(cls, token: str) -> DeadLetterCursor:
        """Raises ValueError for a token this listing did not give."""
        invalid = "cursor is not one this listing gave; start again without it"
        try:
            at, _, number = cursor_text(token).partition("|")
            cursor = cls(datetime.fromisoformat(at), int(number))
        except ValueError:
            raise ValueError(invalid) from None
        if cursor.at.tzinfo is None or not 0 <= cursor.id <= MAX_MINOR_UNITS:
            raise ValueError(invalid)
        try:
            cursor.at.astimezone(UTC)  # a time Postgres can compare with
        except OverflowError:
            raise ValueError(invalid) from None
        return cursor


class Replayed(BaseModel):
    replayed: int = Field(description="how many dead letters were sent back to their consumer")


class Problem(BaseModel):
    """RFC 9457 problem details, as every error is answered."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[dict[str, str]] | None = None
