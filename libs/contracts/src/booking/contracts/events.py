"""The payload of every event, one model per event (docs/asyncapi.json is generated from them).

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

UNKNOWN_REF_SAMPLE = 20
"""Unknown payment refs listed at each end of a tally (the first and the last ones)."""

SampledRef = Annotated[str, StringConstraints(min_length=1, max_length=100)]

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
    UNDERPAID_ORDER_EXPIRED = "underpaid_order_expired"


class SessionIssueKind(StrEnum):
    """What the orders service found wrong when a payment arrived for an order."""

    PAYMENT_FOR_UNKNOWN_ORDER = "payment_for_unknown_order"
    PAYMENT_FOR_CANCELLED_ORDER = "payment_for_cancelled_order"
    PAYMENT_FOR_PAID_ORDER = "payment_for_paid_order"
    CURRENCY_MISMATCH = "currency_mismatch"
    UNDERPAYMENT = "underpayment"
    PAYMENT_NEVER_OPENED = "payment_never_opened"


class SystemErrorKind(StrEnum):
    """What a SystemErrorReported is about."""

    DEAD_LETTERED = "dead_lettered"
    """A message could not be handled and was kept as a dead letter."""
    UNROUTABLE = "unroutable"
    """Events of a type reach no queue: they wait in the outbox until one is bound."""


class AdminAction(StrEnum):
    """What an admin did (AdminActionRecorded)."""

    REPLAY_DEAD_LETTER = "replay_dead_letter"
    DISCARD_DEAD_LETTER = "discard_dead_letter"
    CANCEL_ORDER = "cancel_order"
    RETRY_SCHEDULING = "retry_scheduling"
    RELEASE_ESCROW = "release_escrow"
    REFUND_ESCROW = "refund_escrow"
    RECORD_REFUND = "record_refund"
    LINK_MENTOR_IDENTITY = "link_mentor_identity"


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
    identity_subject: NonEmptyStr | None = None
    """The mentor's `sub` at the identity provider, when it was given at registration."""


@register
class MentorIdentityLinked(Event):
    """An admin linked a mentor to its identity-provider subject, or changed it."""

    # A token with this `sub` (and the mentor role) acts as the mentor from now on; the
    # previous subject no longer does.

    producer = "orders"

    mentor_id: UUID
    identity_subject: NonEmptyStr
    by: NonEmptyStr
    reason: NonEmptyStr
    linked_at: UtcDatetime
    sequence: int = Field(ge=1)
    """The mentor's link count: a consumer keeps the subject of the highest one seen."""
    previous_subject: NonEmptyStr | None = None


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

    # By the sweeper once the scheduled session ended plus the delay, or by an admin (`by`).

    producer = "payments"

    order_id: UUID
    mentor_id: UUID
    escrow_amount: MinorUnits
    currency: Currency
    released_at: UtcDatetime
    by: str | None = None
    reason: str | None = None
    sequence: int = Field(default=1, ge=1)
    """The escrow's transition count: a consumer keeps the status of the highest one seen."""


@register
class EscrowFrozen(Event):
    """An order's escrow is frozen: its session will not take place as paid; an admin decides."""

    # Scheduling abandoned, the order cancelled, or an anomaly: release or refund, by an admin.

    producer = "payments"

    order_id: UUID
    mentor_id: UUID
    escrow_amount: MinorUnits
    currency: Currency
    reason: NonEmptyStr
    by: str | None = None
    sequence: int = Field(ge=1)


@register
class EscrowUnfrozen(Event):
    """A frozen escrow is held again: its session was scheduled after all (an admin's retry)."""

    producer = "payments"

    order_id: UUID
    mentor_id: UUID
    escrow_amount: MinorUnits
    currency: Currency
    release_due_at: UtcDatetime
    reason: NonEmptyStr
    sequence: int = Field(ge=1)


@register
class EscrowRefundDue(Event):
    """The money paid for an order is owed back to the mentee; an admin pays it and records it."""

    # An admin chose a refund, money arrived for an order that had ended, or an underpaid order
    # expired. Konnect has no refund API: the refund is paid by hand, then EscrowRefunded.

    producer = "payments"

    order_id: UUID
    mentor_id: UUID
    escrow_amount: MinorUnits
    refund_amount: MinorUnits
    """What goes back to the mentee: everything they paid, the platform's fee included."""
    currency: Currency
    reason: NonEmptyStr
    by: str | None = None
    sequence: int = Field(ge=1)


@register
class EscrowRefunded(Event):
    """An admin recorded that the refund owed to the mentee was paid back (`reference`)."""

    producer = "payments"

    order_id: UUID
    mentor_id: UUID
    escrow_amount: MinorUnits
    refund_amount: MinorUnits
    currency: Currency
    reason: NonEmptyStr
    by: NonEmptyStr
    reference: NonEmptyStr
    sequence: int = Field(ge=1)


@register
class PaymentAnomalyDetected(Event):
    """A payment notification did not match what the payments service expected."""

    # Webhooks naming refs none of our payments has (unknown_payment_ref) are tallied and
    # reported together, one event per few seconds however many come: `occurrences` says how
    # many webhooks this event reports, `payment_refs` a sample of their refs, oldest first (the
    # first and the last UNKNOWN_REF_SAMPLE), `payment_ref` the first of them.

    producer = "payments"

    payment_ref: NonEmptyStr
    order_id: UUID | None
    kind: PaymentAnomalyKind
    detail: str
    occurrences: int = Field(default=1, ge=1, le=10**9)
    payment_refs: list[SampledRef] = Field(default_factory=list, max_length=2 * UNKNOWN_REF_SAMPLE)


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
class OrderConfirmed(Event):
    """An order's session is in the mentor's calendar: the escrow may be released after it."""

    producer = "orders"

    order_id: UUID
    session_id: UUID
    mentor_id: UUID
    end_at: UtcDatetime


@register
class OrderCancelled(Event):
    """An order ended before its session took place; its slot is free again."""

    # Cancelled by an admin (`by`), or failed by orders itself (`by` None) because its payment
    # never opened. A paid order's escrow is frozen, its session's calendar event deleted.

    producer = "orders"

    order_id: UUID
    session_id: UUID
    mentor_id: UUID
    reason: NonEmptyStr
    by: str | None = None


@register
class SchedulingAbandoned(Event):
    """The calendar gave up on a paid session for good, so its escrow is frozen for an admin."""

    # Sent when orders takes a final CalendarBookingFailed.

    producer = "orders"

    order_id: UUID
    session_id: UUID
    mentor_id: UUID
    reason: CalendarFailureReason
    detail: str


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
    """The calendar service could not book a session in the mentor's calendar (this time)."""

    # `final` says whether it has given up: until then the session waits for the next attempt
    # (`next_attempt_at`, on the retry schedule) or for the mentor to connect Google again.

    producer = "calendar"

    session_id: UUID
    order_id: UUID
    mentor_id: UUID
    reason: CalendarFailureReason
    detail: str
    attempts: int = Field(ge=1)
    final: bool = False
    next_attempt_at: UtcDatetime | None = None


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
    """A service kept a message it could not handle, or its events of one type reach no queue."""

    # kind `dead_lettered`: a dead letter an admin can replay or discard; `unroutable`: the
    # events wait in the outbox until a queue is bound to them.

    # Any service may report this: its envelope names the reporting service, as does `service`.
    producer = ANY_PRODUCER

    service: NonEmptyStr
    consumer: NonEmptyStr  # the queue the message was consumed from (or the outbox's schema)
    message_type: str | None
    error: str
    dead_lettered_message_id: str | None
    attempts: int = Field(ge=1)
    kind: SystemErrorKind = SystemErrorKind.DEAD_LETTERED
    dead_letter_id: str | None = None
    """Where an admin finds it: `<service>:<n>`, for the dead-letter routes."""


@register
class AdminActionRecorded(Event):
    """An admin acted on the system: who, when, why and on what (every admin action is audited)."""

    producer = ANY_PRODUCER

    action: AdminAction
    service: NonEmptyStr
    by: NonEmptyStr
    reason: str
    at: UtcDatetime
    order_id: UUID | None = None
    session_id: UUID | None = None
    dead_letter_id: str | None = None
    detail: str = ""


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
