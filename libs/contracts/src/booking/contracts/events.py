"""The payload of every event of DESIGN section 2, one model per event.

Money is an integer amount in minor units (millimes for TND) plus a currency code, never a float.
Times are timezone-aware and normalised to UTC.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints

from booking.contracts.envelope import ANY_PRODUCER, Event, UtcDatetime, register

Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
"""ISO 4217 code in upper case, e.g. TND."""

MinorUnits = Annotated[StrictInt, Field(ge=0)]
"""An amount of money in the currency's minor unit (millimes for TND); ints only, no floats."""

EmailAddress = Annotated[
    str, StringConstraints(pattern=r"^[^@\s]{1,64}@[^@\s]{1,190}\.[^@\s.]{2,63}$")
]
"""An email's shape. Emails are validated in full (pydantic's EmailStr) where they enter the
system, at the API; full validation on every decode cost a tenth of a consumer's CPU."""

NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]

HttpLink = Annotated[str, StringConstraints(pattern=r"^https?://\S+$")]
"""An absolute http(s) URL, kept as a plain string."""


class _Part(BaseModel):
    """Base of the models nested inside a payload: as strict as the events themselves."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class CalendarFailureReason(StrEnum):
    """Why the calendar service could not book a session."""

    STORE_NOT_FOUND = "store_not_found"
    """The mentor is unknown to the calendar service."""
    MENTOR_NOT_INTEGRATED = "mentor_not_integrated"
    """The mentor has no Google connection."""
    INTEGRATION_REVOKED = "integration_revoked"
    """Google answered invalid_grant."""
    CALENDAR_API_ERROR = "calendar_api_error"
    """Google kept failing after retries."""
    UNEXPECTED_ERROR = "unexpected_error"
    """Anything else; detail holds the stack trace."""


class PaymentFailureReason(StrEnum):
    """Why a payment did not go through."""

    FAILED = "failed"
    EXPIRED = "expired"


class PaymentAnomalyKind(StrEnum):
    """What the payments service found wrong with a payment notification."""

    UNKNOWN_PAYMENT_REF = "unknown_payment_ref"
    AMOUNT_MISMATCH = "amount_mismatch"
    CURRENCY_MISMATCH = "currency_mismatch"
    PAYMENT_FOR_CANCELLED_ORDER = "payment_for_cancelled_order"
    PAYMENT_FOR_ENDED_ORDER = "payment_for_ended_order"
    UNDERPAYMENT = "underpayment"


class SessionIssueKind(StrEnum):
    """What the orders service found wrong when a payment arrived for an order."""

    PAYMENT_FOR_UNKNOWN_ORDER = "payment_for_unknown_order"
    PAYMENT_FOR_CANCELLED_ORDER = "payment_for_cancelled_order"
    PAYMENT_FOR_PAID_ORDER = "payment_for_paid_order"
    CURRENCY_MISMATCH = "currency_mismatch"
    UNDERPAYMENT = "underpayment"


class Offering(_Part):
    """The offering a mentee booked, as it was when the booking was made."""

    offering_id: UUID
    title: NonEmptyStr
    duration_minutes: int = Field(gt=0)


class MenteeContact(_Part):
    """How to reach the mentee who booked."""

    first_name: NonEmptyStr
    last_name: NonEmptyStr
    email: EmailAddress
    phone: str | None


@register
class MentorRegistered(Event):
    """A mentor joined the platform."""

    producer = "orders"

    mentor_id: UUID
    name: NonEmptyStr
    email: EmailAddress
    timezone: NonEmptyStr  # IANA name, e.g. Africa/Tunis


@register
class BookingRequested(Event):
    """A mentee booked a session and the order now awaits payment."""

    producer = "orders"

    order_id: UUID
    session_id: UUID
    mentor_id: UUID
    offering: Offering
    amount: MinorUnits
    currency: Currency
    mentee: MenteeContact
    start_at: UtcDatetime
    end_at: UtcDatetime


@register
class PaymentInitiated(Event):
    """A payment was opened with the provider and the mentee can pay at pay_url."""

    producer = "payments"

    order_id: UUID
    payment_ref: NonEmptyStr
    pay_url: HttpLink
    expires_at: UtcDatetime


@register
class PaymentInitiationFailed(Event):
    """The payment provider refused or failed to open a payment for an order."""

    producer = "payments"

    order_id: UUID
    reason: NonEmptyStr
    detail: str


@register
class PaymentCompleted(Event):
    """The mentee paid an order; the platform fee is kept and the rest held in escrow."""

    producer = "payments"

    order_id: UUID
    payment_ref: NonEmptyStr
    amount: MinorUnits
    amount_paid: MinorUnits
    platform_fee: MinorUnits
    escrow_amount: MinorUnits
    currency: Currency
    paid_at: UtcDatetime


@register
class PaymentFailed(Event):
    """A payment ended without money: it failed or it expired."""

    producer = "payments"

    order_id: UUID
    payment_ref: NonEmptyStr
    reason: PaymentFailureReason


@register
class EscrowReleased(Event):
    """The money held in escrow for an order was released to the mentor."""

    producer = "payments"

    order_id: UUID
    mentor_id: UUID
    escrow_amount: MinorUnits
    currency: Currency
    released_at: UtcDatetime


@register
class PaymentAnomalyDetected(Event):
    """A payment notification did not match what the payments service expected."""

    producer = "payments"

    payment_ref: NonEmptyStr
    order_id: UUID | None
    kind: PaymentAnomalyKind
    detail: str


@register
class OrderPaid(Event):
    """An order is paid, so its session should be put in the mentor's calendar."""

    producer = "orders"

    order_id: UUID
    session_id: UUID
    mentor_id: UUID
    mentee_email: EmailAddress
    title: NonEmptyStr
    start_at: UtcDatetime
    end_at: UtcDatetime


@register
class SessionIssueDetected(Event):
    """The orders service found a payment it could not apply cleanly to an order."""

    producer = "orders"

    order_id: UUID
    session_id: UUID | None
    kind: SessionIssueKind
    detail: str


@register
class CalendarBookingConfirmed(Event):
    """The session was added to the mentor's Google calendar with a Meet link."""

    producer = "calendar"

    session_id: UUID
    order_id: UUID
    event_id: NonEmptyStr
    meet_link: HttpLink
    html_link: HttpLink


@register
class CalendarBookingFailed(Event):
    """The calendar service gave up booking a session in the mentor's calendar."""

    producer = "calendar"

    session_id: UUID
    order_id: UUID
    mentor_id: UUID
    reason: CalendarFailureReason
    detail: str
    attempts: int = Field(ge=1)


@register
class HealthCheckFailed(Event):
    """A component the gateway watches started failing its health check."""

    producer = "gateway"

    component: NonEmptyStr
    status: NonEmptyStr
    output: str


@register
class HealthCheckRecovered(Event):
    """A component that was failing its health check passes it again."""

    producer = "gateway"

    component: NonEmptyStr
    status: NonEmptyStr
    output: str


@register
class SystemErrorReported(Event):
    """A service failed to handle a message and dead-lettered it."""

    # Any service may report this: its envelope names the reporting service, as does `service`.
    producer = ANY_PRODUCER

    service: NonEmptyStr
    consumer: NonEmptyStr  # the queue the message was consumed from
    message_type: str | None
    error: str
    dead_lettered_message_id: str | None
    attempts: int = Field(ge=1)


@register
class AdminNotificationRaised(Event):
    """The notifications service stored (or repeated) a notification for the admins."""

    producer = "notifications"

    id: int = Field(ge=1)
    type: NonEmptyStr
    severity: NonEmptyStr
    title: NonEmptyStr
    message: str
    metadata: dict[str, Any]
    is_read: bool
    read_at: UtcDatetime | None
    created_at: UtcDatetime
    fingerprint: NonEmptyStr
    occurrences: int = Field(ge=1)
    last_occurred_at: UtcDatetime


__all__ = [
    "AdminNotificationRaised",
    "BookingRequested",
    "CalendarBookingConfirmed",
    "CalendarBookingFailed",
    "CalendarFailureReason",
    "Currency",
    "EscrowReleased",
    "HealthCheckFailed",
    "HealthCheckRecovered",
    "MenteeContact",
    "MentorRegistered",
    "MinorUnits",
    "Offering",
    "OrderPaid",
    "PaymentAnomalyDetected",
    "PaymentAnomalyKind",
    "PaymentCompleted",
    "PaymentFailed",
    "PaymentFailureReason",
    "PaymentInitiated",
    "PaymentInitiationFailed",
    "SessionIssueDetected",
    "SessionIssueKind",
    "SystemErrorReported",
]
