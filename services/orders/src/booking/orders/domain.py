"""The orders service's rules: mentors and their offerings, orders, their booked sessions and
the moves between their states.

Pure: no I/O, no framework, no clock. Every method that stamps a time takes `now`. A move that the
status machine does not allow raises `IllegalTransition` and changes nothing (the recovery
rules are docs/recovery.md's).

Order::

    pending --awaiting_payment--> awaiting_payment --set_amount_paid (paid in full)--> paid
    pending --set_amount_paid (paid in full)--> paid  (payment seen before PaymentInitiated)
    paid --confirm--> confirmed
    pending | awaiting_payment --fail_payment--> payment_failed
    pending | awaiting_payment | paid | confirmed --cancel--> cancelled

Session::

    pending_payment --await_calendar--> awaiting_calendar
    awaiting_calendar | scheduling_failed --schedule--> scheduled
    awaiting_calendar | scheduling_failed --fail_scheduling (final failure)--> scheduling_failed
    any but cancelled --cancel--> cancelled

payment_failed and cancelled (order) and cancelled (session) are final.

The escrow is payments' to move; orders only keeps the status of the highest `sequence` it has
heard of, so that the order view shows where the money stands (`Escrow.observe`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from uuid import UUID

from booking.contracts.money import format_money, major_to_minor
from booking.runtime.domain import (
    DomainError,
    IllegalTransition,
    InvalidMoney,
    currency_code,
    minor_units,
)


class CurrencyMismatch(DomainError):
    """Money in one currency was offered for an order priced in another."""

    def __init__(self, order_id: Any, expected: str, got: str) -> None:
        self.order_id = order_id
        self.expected = expected
        self.got = got
        super().__init__(f"order {order_id} is priced in {expected}, the payment is in {got}")


class InvalidBooking(DomainError, ValueError):
    """A booking whose times cannot be accepted (a start in the past or too far ahead, a bad
    duration). `field` names the part of the request at fault."""

    def __init__(self, message: str, field: str = "start_at") -> None:
        self.field = field
        super().__init__(message)


class InvalidOffering(DomainError, ValueError):
    """An offering the platform does not sell (a price above its maximum). `field` names the
    part of the request at fault."""

    def __init__(self, message: str, field: str) -> None:
        self.field = field
        super().__init__(message)


class SlotTaken(DomainError):
    """The mentor already has a live session overlapping the requested one (the slot is the
    database's exclusion constraint to guard, so this is found on storing the session)."""


class SubjectTaken(DomainError):
    """The identity-provider subject acts as another mentor already (or is another's id)."""


@dataclass(frozen=True, slots=True)
class Money:
    """An amount in the currency's minor unit (millimes for TND) and its ISO 4217 code.

    Never a float: `Money(1.5, "TND")` and `Money(True, "TND")` are refused.
    """

    amount: int
    currency: str

    def __post_init__(self) -> None:
        minor_units(self.amount, "amount")
        currency_code(self.currency)


@dataclass(kw_only=True, slots=True)
class Mentor:
    """Someone mentees book; linked to at most one identity-provider subject, whose tokens act
    as this mentor."""

    id: UUID
    name: str
    email: str
    timezone: str
    created_at: datetime
    identity_subject: str | None = None
    identity_sequence: int = 0
    """How many times an admin linked a subject (MentorIdentityLinked's sequence)."""

    def link_identity(self, subject: str) -> str | None:
        """Act as `subject` from now on, replacing any other; the subject it replaced."""
        previous = self.identity_subject
        self.identity_subject = subject
        self.identity_sequence += 1
        return previous


@dataclass(frozen=True, kw_only=True, slots=True)
class Offering:
    """What a mentor sells: a session of a fixed length at a fixed price."""

    id: UUID
    mentor_id: UUID
    title: str
    duration_minutes: int
    price: Money
    created_at: datetime


class OrderStatus(StrEnum):
    PENDING = "pending"
    AWAITING_PAYMENT = "awaiting_payment"
    PAID = "paid"
    CONFIRMED = "confirmed"
    PAYMENT_FAILED = "payment_failed"
    CANCELLED = "cancelled"


class PaymentStatus(StrEnum):
    """Where the order's payment stands, as payments reported it (`payment.status` in the view).

    None until payments answers; `failed` and `expired` are PaymentFailed's reasons.
    """

    PENDING = "pending"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    INITIATION_FAILED = "initiation_failed"
    NOT_OPENED = "not_opened"
    """No payment was opened within the opening timeout: orders failed the order itself."""


class SessionStatus(StrEnum):
    PENDING_PAYMENT = "pending_payment"
    AWAITING_CALENDAR = "awaiting_calendar"
    SCHEDULED = "scheduled"
    SCHEDULING_FAILED = "scheduling_failed"
    CANCELLED = "cancelled"


LIVE_SESSION_STATUSES: frozenset[SessionStatus] = frozenset(
    {
        SessionStatus.PENDING_PAYMENT,
        SessionStatus.AWAITING_CALENDAR,
        SessionStatus.SCHEDULED,
        SessionStatus.SCHEDULING_FAILED,
    }
)
"""Sessions that hold their mentor's slot (the exclusion constraint's WHERE clause).

A session awaiting payment holds the slot, or two mentees could pay for it; a paid session whose
calendar booking failed still holds it (it is paid for and will be retried). Only cancellation
frees it; a failed or expired payment cancels the session.
"""


@dataclass(frozen=True, slots=True)
class Underpayment:
    """What `Order.set_amount_paid` returns when less arrived than the order costs.

    The order stays unpaid; the caller raises SessionIssueDetected (kind `underpayment`) with
    `detail` so the admins hear of it.
    """

    order_id: Any
    expected: int
    paid: int
    currency: str

    @property
    def shortfall(self) -> int:
        return self.expected - self.paid

    @property
    def detail(self) -> str:
        return (
            f"order {self.order_id} costs {self.expected} {self.currency} in minor units; "
            f"{self.paid} arrived, {self.shortfall} short"
        )


@dataclass(kw_only=True, slots=True)
class Order:
    """What a mentee owes for one booked session, and how far the payment has gone."""

    id: UUID
    mentee_id: str
    mentor_id: UUID
    offering_id: UUID
    amount: Money
    created_at: datetime
    updated_at: datetime
    status: OrderStatus = OrderStatus.PENDING
    amount_paid: int = 0
    payment_ref: str | None = None
    pay_url: str | None = None

    def _refuse(self, to_state: OrderStatus) -> IllegalTransition:
        return IllegalTransition("order", self.id, self.status, to_state)

    def _move(
        self, allowed_from: frozenset[OrderStatus], to_state: OrderStatus, now: datetime
    ) -> None:
        if self.status not in allowed_from:
            raise self._refuse(to_state)
        self.status = to_state
        self.updated_at = now

    def awaiting_payment(self, payment_ref: str, pay_url: str, now: datetime) -> None:
        """Payments opened a Konnect payment: store where the mentee pays.

        Repeating it with the same ref while awaiting payment changes nothing; another ref, or any
        other state, is refused.
        """
        if self.status is OrderStatus.AWAITING_PAYMENT and self.payment_ref == payment_ref:
            return
        self._move(
            _BEFORE_PAYMENT - {OrderStatus.AWAITING_PAYMENT}, OrderStatus.AWAITING_PAYMENT, now
        )
        self.payment_ref = payment_ref
        self.pay_url = pay_url

    def set_amount_paid(
        self, amount_paid: int, currency: str, now: datetime
    ) -> Underpayment | None:
        """Record what the payment reached (a total, not an increment).

        The order becomes paid only when `amount_paid >= amount` and then returns None. Less than
        that is recorded, leaves the status as it is (pending or awaiting_payment) and returns an
        `Underpayment` for the caller to report. A currency other than the order's raises
        `CurrencyMismatch`; an order that is not waiting for money (already paid, ended) raises
        `IllegalTransition`; an amount below the one already recorded raises `InvalidMoney`.
        Nothing is changed when it raises.
        """
        minor_units(amount_paid, "amount_paid")
        currency_code(currency)
        if self.status not in _BEFORE_PAYMENT:
            raise self._refuse(OrderStatus.PAID)
        if currency != self.amount.currency:
            raise CurrencyMismatch(self.id, self.amount.currency, currency)
        if amount_paid < self.amount_paid:
            raise InvalidMoney(
                f"order {self.id} already recorded {self.amount_paid} paid; "
                f"a payment total cannot fall to {amount_paid}"
            )
        self.amount_paid = amount_paid
        self.updated_at = now
        if amount_paid < self.amount.amount:
            return Underpayment(self.id, self.amount.amount, amount_paid, currency)
        self.status = OrderStatus.PAID
        return None

    def confirm(self, now: datetime) -> None:
        """The session is in the mentor's calendar."""
        self._move(frozenset({OrderStatus.PAID}), OrderStatus.CONFIRMED, now)

    def fail_payment(self, now: datetime) -> None:
        """The payment expired or could not be made; the caller cancels the session too."""
        self._move(_BEFORE_PAYMENT, OrderStatus.PAYMENT_FAILED, now)

    def cancel(self, now: datetime) -> None:
        """Cancel an order that has not ended yet; the caller cancels the session too.

        A paid or confirmed order can be cancelled: its escrow is then never released.
        """
        self._move(_CANCELLABLE, OrderStatus.CANCELLED, now)

    def payment_never_opened(self, now: datetime, opening_timeout: timedelta) -> bool:
        """Whether no payment was opened for this order within `opening_timeout` of its booking.

        Pending means payments never said PaymentInitiated; no ref and nothing paid means no
        payment of any kind reached us either (money seen before the initiation leaves the
        order pending, but the payment evidently opened).
        """
        return (
            self.status is OrderStatus.PENDING
            and self.payment_ref is None
            and self.amount_paid == 0
            and self.created_at + opening_timeout <= now
        )

    @property
    def is_paid(self) -> bool:
        return self.status in (OrderStatus.PAID, OrderStatus.CONFIRMED)


_BEFORE_PAYMENT = frozenset({OrderStatus.PENDING, OrderStatus.AWAITING_PAYMENT})
_CANCELLABLE = _BEFORE_PAYMENT | {OrderStatus.PAID, OrderStatus.CONFIRMED}


@dataclass(kw_only=True, slots=True)
class BookedSession:
    """The mentor's time that an order pays for."""

    id: UUID
    order_id: UUID
    mentor_id: UUID
    start_at: datetime
    end_at: datetime
    status: SessionStatus = SessionStatus.PENDING_PAYMENT
    meet_link: str | None = None
    calendar_event_id: str | None = None

    def __post_init__(self) -> None:
        if self.end_at <= self.start_at:
            raise InvalidBooking(f"session {self.id} must end after it starts")

    def _move(self, allowed_from: frozenset[SessionStatus], to_state: SessionStatus) -> None:
        if self.status not in allowed_from:
            raise IllegalTransition("session", self.id, self.status, to_state)
        self.status = to_state

    @property
    def is_live(self) -> bool:
        """Whether the session holds its mentor's slot (see LIVE_SESSION_STATUSES)."""
        return self.status in LIVE_SESSION_STATUSES

    def await_calendar(self) -> None:
        """The order is paid: the session waits for its calendar event."""
        self._move(frozenset({SessionStatus.PENDING_PAYMENT}), SessionStatus.AWAITING_CALENDAR)

    def schedule(self, event_id: str, meet_link: str | None) -> None:
        """The calendar event exists. A failed booking retried later may still succeed.

        Repeating it with the same event id changes nothing (the meet link is filled in if it
        arrives late); a different event id for a scheduled session is refused.
        """
        if self.status is SessionStatus.SCHEDULED and self.calendar_event_id == event_id:
            if meet_link is not None:
                self.meet_link = meet_link
            return
        self._move(_AWAITING_EVENT, SessionStatus.SCHEDULED)
        self.calendar_event_id = event_id
        self.meet_link = meet_link

    def fail_scheduling(self) -> None:
        """The calendar service gave up on the event for good (a final CalendarBookingFailed).

        A failure it will try again leaves the session awaiting the calendar: this is only for
        the final one. The session keeps its slot: it is paid for, and an admin may retry it.
        """
        self._move(_AWAITING_EVENT, SessionStatus.SCHEDULING_FAILED)

    def cancel(self) -> None:
        """Free the slot: the booking is cancelled or its payment failed."""
        self._move(frozenset(LIVE_SESSION_STATUSES), SessionStatus.CANCELLED)


_AWAITING_EVENT = frozenset({SessionStatus.AWAITING_CALENDAR, SessionStatus.SCHEDULING_FAILED})


def cancel_booking(order: Order, booked: BookedSession, now: datetime) -> bool:
    """An admin's cancel: the order cancelled and its slot freed; False when it already was.

    A repeat changes nothing (False). An order whose payment failed has ended another way: it
    raises `IllegalTransition` and nothing is changed.
    """
    if order.status is OrderStatus.CANCELLED:
        return False
    order.cancel(now)
    if booked.is_live:
        booked.cancel()
    return True


def fail_unopened_payment(
    order: Order, booked: BookedSession, now: datetime, opening_timeout: timedelta
) -> bool:
    """Fail an order whose payment never opened (docs/recovery.md section 5) and free its slot.

    False, and nothing changed, when the order does not qualify (any more): a payment opened,
    money arrived, the order ended, or the timeout has not passed yet.
    """
    if not order.payment_never_opened(now, opening_timeout):
        return False
    order.fail_payment(now)
    if booked.is_live:
        booked.cancel()
    return True


class EscrowStatus(StrEnum):
    """Where the money held for an order stands (payments moves it; orders shows it)."""

    HELD = "held"
    FROZEN = "frozen"
    RELEASED = "released"
    REFUND_DUE = "refund_due"
    REFUNDED = "refunded"


@dataclass(kw_only=True, slots=True)
class Escrow:
    """What orders knows of an order's escrow: the status of the highest sequence heard of.

    Payments numbers every transition of an escrow (`sequence`, from 1); its events may arrive
    in any order, so an event whose sequence is not above the one kept is older news and
    changes nothing. The `held` that a payment in full implies has sequence 0: any escrow event
    is newer than it.
    """

    status: EscrowStatus | None = None
    sequence: int = 0

    def observe(self, status: EscrowStatus, sequence: int) -> bool:
        """Keep `status` if `sequence` is newer than what is kept; whether it was."""
        if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 1:
            raise ValueError(f"an escrow sequence is a positive integer, got {sequence!r}")
        if sequence <= self.sequence:
            return False
        self.status = status
        self.sequence = sequence
        return True

    def hold_for_payment(self) -> bool:
        """The order was paid in full: its escrow is held, unless an escrow event came first."""
        if self.sequence > 0 or self.status is not None:
            return False
        self.status = EscrowStatus.HELD
        return True


def check_price(price: Money, max_major_units: int) -> None:
    """Refuse (`InvalidOffering`) a price above `max_major_units` whole units of its currency.

    The price's shape (positive, a currency Konnect takes, the hard ceiling) is the contract's
    to check; this is the platform's own, configurable, maximum.
    """
    limit = major_to_minor(max_major_units, price.currency)
    if price.amount > limit:
        raise InvalidOffering(
            f"the price {format_money(price.amount, price.currency)} ({price.amount} minor "
            f"units) is above the most an offering may cost, {format_money(limit, price.currency)}"
            f" ({limit} minor units)",
            field="price.amount",
        )


CLOCK_SKEW = timedelta(minutes=1)
"""How far in the past a requested start may be and still be taken: the caller's clock may run
a little behind ours, and "now" on their side must not be refused as past on ours."""


def plan_session(
    offering_duration_minutes: int, start_at: datetime, now: datetime, *, horizon: timedelta
) -> datetime:
    """Check a requested start and return the session's end (start + the offering's duration).

    Raises `InvalidBooking` for a naive datetime, a start in the past (beyond `CLOCK_SKEW`), a
    start more than `horizon` ahead of `now`, a session that would end past the end of time, or
    a duration that is not a positive whole number of minutes.
    """
    duration = offering_duration_minutes
    if isinstance(duration, bool) or not isinstance(duration, int) or duration <= 0:
        raise InvalidBooking(
            f"the offering's duration must be a positive number of minutes, got {duration!r}",
            field="offering_id",
        )
    if start_at.tzinfo is None or start_at.utcoffset() is None:
        raise InvalidBooking("start_at must carry a time zone (RFC 3339, e.g. ...Z)")
    if now.tzinfo is None or now.utcoffset() is None:
        raise InvalidBooking("now must carry a time zone")
    if start_at < now - CLOCK_SKEW:
        raise InvalidBooking(
            f"start_at {start_at.isoformat()} is in the past (now is "
            f"{now.isoformat(timespec='seconds')}); choose a later start"
        )
    if start_at - now > horizon:
        raise InvalidBooking(
            f"start_at {start_at.isoformat()} is more than {_days(horizon)} ahead; sessions "
            f"are booked at most that far in advance: choose an earlier start"
        )
    try:
        return start_at + timedelta(minutes=duration)
    except OverflowError:
        raise InvalidBooking(
            f"start_at {start_at.isoformat()} is so late that the session would end after the "
            f"last representable time; choose an earlier start"
        ) from None


def _days(span: timedelta) -> str:
    return f"{span.days} day{'' if span.days == 1 else 's'}" if not span.seconds else str(span)
