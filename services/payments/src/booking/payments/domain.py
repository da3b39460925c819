"""The payments service's rules: the fee split, Konnect's verdict, payments and escrow holds,
and what webhooks may cost (the budget of Konnect lookups, the tally of unknown refs).

Pure: no I/O, no framework, no clock. Every method that stamps a time takes `now`. A move the
status machine does not allow raises `IllegalTransition` and changes nothing; repeating a move
that took effect raises `AlreadyApplied` (or says "no change"), never a second transition. The
recovery rules are docs/recovery.md's (sections 4 and 5).

Payment::

    (none) --opened (BookingRequested)--> initiating
    initiating --initiated--> pending
    initiating --initiation_failed (Konnect refused, or the order ended first)--> initiation_failed
    pending | underpaid --money short of the amount, still open--> underpaid
    pending | underpaid --money in full (or more)--> completed
    pending --expiry, nothing paid--> expired
    underpaid --expiry--> expired  (what was paid becomes refund_due)
    pending --fail--> failed
    expired | failed --late money--> completed, or stays ended with the money recorded
                                     (Konnect still says expired); the money is refund_due
    completed --any verdict--> nothing (all its money is recorded)

What becomes of money a verdict records (`MoneyFate`): in full, on time, for a live order, it
is held; more than the amount is held, then frozen (`overpaid`); short while the payment is
open, it waits for the rest; after the payment or the order ended, or at the expiry of an
underpaid payment, it is owed back to the mentee (refund_due).

Escrow hold (the table of docs/recovery.md section 4; `sequence` counts the transitions)::

    (none) --a payment in full, on time, for a live order--> held          (`held_for`)
    held --schedule_release (OrderConfirmed)--> held, release due          (no transition)
    held --release_when_due (release due has passed)--> released
    held --freeze (scheduling abandoned, order cancelled, overpaid)--> frozen
    frozen (for the scheduling only) --schedule_release (OrderConfirmed)--> held, release due
    frozen --release_by_admin--> released
    frozen --choose_refund--> refund_due
    (none) --money for an ended order, an underpaid order expired--> refund_due  (`owed_back`)
    refund_due --owe_more (late money on top of what is owed)--> refund_due
    refund_due --record_refund (with its reference)--> refunded

    released --release_when_due | release_by_admin--> AlreadyApplied
    frozen --freeze (same reason)--> AlreadyApplied
    frozen for the scheduling --freeze (another reason)--> frozen for that reason
    refund_due --choose_refund--> AlreadyApplied
    refunded --record_refund (same reference)--> AlreadyApplied; another reference: refused

Every other move is refused. A hold is never released on its own unless its session was
scheduled (`release_due_at` is set only by OrderConfirmed); money owed back never is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction
from typing import Any, NamedTuple
from uuid import UUID

from booking.runtime.domain import (
    DomainError,
    IllegalTransition,
    currency_code,
    keep_ends,
    minor_units,
)


class AlreadyApplied(DomainError):
    """The change was made before (a duplicate webhook, a second release): nothing to do."""


class InvalidFeeRate(DomainError, ValueError):
    """A fee rate that is not a Decimal fraction in [0, 1)."""


class CurrencyMismatch(DomainError):
    """Konnect reports money in a currency other than the payment's."""

    def __init__(self, payment_ref: str, expected: str, got: str) -> None:
        self.payment_ref = payment_ref
        self.expected = expected
        self.got = got
        super().__init__(f"payment {payment_ref} was opened in {expected}, Konnect reports {got}")


class MalformedKonnectPayment(DomainError, ValueError):
    """Konnect's payment object lacks a field we decide on, or holds it in a shape we refuse."""


class ReleaseTooEarly(DomainError):
    """An escrow hold asked to be released before its session ended plus the delay."""

    def __init__(self, hold_id: Any, due_at: datetime) -> None:
        self.hold_id = hold_id
        self.due_at = due_at
        super().__init__(f"escrow {hold_id} may be released from {due_at.isoformat()} on")


# -- the fee split -------------------------------------------------------------------------------


class Split(NamedTuple):
    """How money that arrived is shared: the platform's fee and the mentor's escrow."""

    platform_fee: int
    escrow: int


def split_payment(amount_paid: int, fee_rate: Decimal) -> Split:
    """Split `amount_paid` (minor units) into the platform fee and the escrow.

    fee = amount_paid x fee_rate rounded half-up to the minor unit (exactly: the product is
    computed as a fraction, so no Decimal context precision can round it first); escrow is the
    rest, so `fee + escrow == amount_paid` always and `0 <= fee <= amount_paid`. The rate must be
    a Decimal in [0, 1): a float is refused.
    """
    minor_units(amount_paid, "amount_paid")
    if not isinstance(fee_rate, Decimal) or not fee_rate.is_finite():
        raise InvalidFeeRate(f"the fee rate must be a finite Decimal, got {fee_rate!r}")
    if not Decimal(0) <= fee_rate < Decimal(1):
        raise InvalidFeeRate(f"the fee rate must be at least 0 and below 1, got {fee_rate}")
    exact = Fraction(amount_paid) * Fraction(fee_rate)
    fee = math.floor(exact + Fraction(1, 2))  # half-up; the product is never negative
    return Split(platform_fee=fee, escrow=amount_paid - fee)


# -- what Konnect says ---------------------------------------------------------------------------


class PaymentState(StrEnum):
    INITIATING = "initiating"
    """Opened on our side; Konnect has not (yet) given it a ref."""
    INITIATION_FAILED = "initiation_failed"
    """Konnect refused to open it, or could not be reached: the order cannot be paid."""
    PENDING = "pending"
    UNDERPAID = "underpaid"
    """Money arrived, less than the amount: the payer may pay the rest until it expires."""
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"


def _konnect_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as error:
        raise MalformedKonnectPayment(f"expirationDate is not a time: {value!r}") from error
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def konnect_expiration(payment: dict[str, Any]) -> datetime | None:
    """The payment's `expirationDate` as an aware datetime (UTC when Konnect gives no offset)."""
    return _konnect_time(payment.get("expirationDate"))


def konnect_outcome(payment: dict[str, Any], now: datetime) -> PaymentState:
    """Decide a Konnect payment's state from `payment.status` (never from its transactions).

    - `completed`: COMPLETED, even past `expirationDate`: money that arrived is never dropped
      (a late one is owed back, see `Payment.apply_verdict`).
    - `expired`, or any other status once `now` has reached `expirationDate`: EXPIRED.
    - `pending`, with or without failed transactions: PENDING. A failed attempt leaves the
      payment open: Konnect lets the payer retry on its page until the payment expires.
    - any status we do not know: PENDING (the sweeper asks again, expiry ends it).

    `payment` is the object under Konnect's `{"payment": ...}`. FAILED is never Konnect's
    verdict: it is for a payment we end ourselves (`Payment.fail`).
    """
    if now.tzinfo is None:
        raise ValueError("now must carry a time zone")
    status = payment.get("status")
    if status == "completed":
        return PaymentState.COMPLETED
    if status == "expired":
        return PaymentState.EXPIRED
    expires_at = konnect_expiration(payment)
    if expires_at is not None and now >= expires_at:
        return PaymentState.EXPIRED
    return PaymentState.PENDING


def _konnect_amount(payment: dict[str, Any], field: str) -> int | None:
    value = payment.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedKonnectPayment(
            f"{field} must be a whole number of minor units (millimes, cents), got {value!r}"
        )
    return value


def konnect_amount_paid(payment: dict[str, Any]) -> int:
    """How much a Konnect payment has reached, in minor units.

    A partial payment (`type: partial`) reached `reachedAmount`. A completed payment of another
    type reached `amount`, unless it reports a positive `reachedAmount` below `amount`: then the
    lower figure, so we never credit money Konnect does not say arrived (the payment is then
    underpaid). A payment that is not completed reached `reachedAmount` (0 if absent).
    """
    reached = _konnect_amount(payment, "reachedAmount")
    if payment.get("type") == "partial" or payment.get("status") != "completed":
        return reached or 0
    amount = _konnect_amount(payment, "amount")
    if amount is None:
        raise MalformedKonnectPayment("a completed Konnect payment carries no amount")
    if reached is not None and 0 < reached < amount:
        return reached
    return amount


def konnect_currency(payment: dict[str, Any]) -> str:
    """The currency Konnect holds the payment in: its `token` (TND when absent, as Konnect)."""
    token = payment.get("token")
    if token is None or token == "":
        return "TND"
    if not isinstance(token, str) or not token.isascii() or len(token) != 3 or not token.isalpha():
        raise MalformedKonnectPayment(f"token must be a currency code, got {token!r}")
    return token.upper()


@dataclass(frozen=True, slots=True)
class KonnectVerdict:
    """What Konnect says of a payment, read once: its state, what it reached, in which currency."""

    state: PaymentState
    amount_paid: int
    currency: str

    @classmethod
    def read(cls, payment: dict[str, Any], now: datetime) -> KonnectVerdict:
        """Konnect's payment object decided at `now`; raises `MalformedKonnectPayment`."""
        return cls(
            state=konnect_outcome(payment, now),
            amount_paid=konnect_amount_paid(payment),
            currency=konnect_currency(payment),
        )

    @classmethod
    def unknown(cls, currency: str) -> KonnectVerdict:
        """Konnect knows no such payment: no money arrived; only our own expiry can end it."""
        return cls(state=PaymentState.PENDING, amount_paid=0, currency=currency)


# -- payments ------------------------------------------------------------------------------------


class MoneyFate(StrEnum):
    """What becomes of the money a payment has recorded, once a verdict was applied."""

    HELD = "held"
    """In full, on time, for a live order: the mentor's share is held in escrow."""
    OVERPAID = "overpaid"
    """More than the amount: held, then frozen at once for an admin to settle."""
    UNDERPAID = "underpaid"
    """Short, the payment still open: the payer may pay the rest until it expires."""
    UNDERPAID_FOR_ENDED_ORDER = "underpaid_for_ended_order"
    """Short, the payment still open, for an order that ended: owed back once the payment ends."""
    REFUND_DUE = "refund_due"
    """Owed back to the mentee, everything paid, the fee included (`RefundCause` says why)."""


class RefundCause(StrEnum):
    """Why money is owed back; each value is the kind of the Critical anomaly it raises."""

    PAYMENT_ENDED = "payment_for_ended_order"
    """The money arrived after the payment had expired or failed (so had its order)."""
    ORDER_ENDED = "payment_for_cancelled_order"
    """The money arrived for an order that had ended without its payment (cancelled)."""
    UNDERPAID_EXPIRED = "underpaid_order_expired"
    """The payment expired short: what was paid goes back, the order fails."""


@dataclass(frozen=True, slots=True)
class MoneyReceived:
    """Money a verdict recorded: the payment's new total, its fee and escrow, and from where."""

    amount: int
    amount_paid: int
    platform_fee: int
    escrow_amount: int
    currency: str
    paid_at: datetime
    previous_state: PaymentState

    @property
    def short(self) -> bool:
        return self.amount_paid < self.amount

    @property
    def over(self) -> bool:
        return self.amount_paid > self.amount


@dataclass(frozen=True, slots=True)
class Settlement:
    """What applying Konnect's verdict changed, and what becomes of the payment's money.

    `money` is set when new money was recorded, `expired` when the payment ended now; `fate`
    says what to do with the money the payment holds (None: nothing to do), and `refund_cause`
    why, when it is owed back.
    """

    money: MoneyReceived | None = None
    expired: bool = False
    fate: MoneyFate | None = None
    refund_cause: RefundCause | None = None
    currency_mismatch: CurrencyMismatch | None = None

    @property
    def changed(self) -> bool:
        return self.money is not None or self.expired


_OPEN = frozenset({PaymentState.PENDING, PaymentState.UNDERPAID})
_ENDED = frozenset({PaymentState.EXPIRED, PaymentState.FAILED})


@dataclass(kw_only=True, slots=True)
class Payment:
    """One Konnect payment for one order."""

    id: UUID
    order_id: UUID
    amount: int
    currency: str
    created_at: datetime
    updated_at: datetime
    payment_ref: str | None = None
    pay_url: str | None = None
    expires_at: datetime | None = None
    status: PaymentState = PaymentState.PENDING
    amount_paid: int | None = None
    platform_fee: int | None = None
    escrow_amount: int | None = None
    paid_at: datetime | None = None

    def __post_init__(self) -> None:
        minor_units(self.amount, "amount")
        currency_code(self.currency)

    @classmethod
    def opened(
        cls, *, id: UUID, order_id: UUID, amount: int, currency: str, now: datetime
    ) -> Payment:
        """(none) -> initiating: an order's payment, opened on our side before Konnect is asked.

        The amount and the currency are checked here (`InvalidMoney`), before anything is
        stored."""
        return cls(
            id=id,
            order_id=order_id,
            amount=amount,
            currency=currency,
            created_at=now,
            updated_at=now,
            status=PaymentState.INITIATING,
        )

    @property
    def is_open(self) -> bool:
        """Konnect may still take money for it (pending, or underpaid until it expires)."""
        return self.status in _OPEN

    def initiated(
        self, payment_ref: str, pay_url: str, expires_at: datetime, now: datetime
    ) -> None:
        """Konnect opened the payment: the payer can pay at `pay_url` until `expires_at`."""
        if self.status is not PaymentState.INITIATING:
            raise IllegalTransition("payment", self.id, self.status, PaymentState.PENDING)
        if not payment_ref or not pay_url:
            raise ValueError("an initiated payment has a ref and a pay URL")
        self.status = PaymentState.PENDING
        self.payment_ref = payment_ref
        self.pay_url = pay_url
        self.expires_at = expires_at
        self.updated_at = now

    def initiation_failed(self, now: datetime) -> None:
        """Konnect refused the payment or stayed out of reach, or the order ended before it
        opened: it will never be opened (a Konnect payment opened meanwhile is an orphan)."""
        if self.status is not PaymentState.INITIATING:
            raise IllegalTransition("payment", self.id, self.status, PaymentState.INITIATION_FAILED)
        self.status = PaymentState.INITIATION_FAILED
        self.updated_at = now

    def apply_verdict(
        self,
        verdict: KonnectVerdict,
        fee_rate: Decimal,
        now: datetime,
        *,
        order_ended: bool = False,
    ) -> Settlement:
        """Apply what Konnect says, once: the one rule the webhook and the sweeper share.

        Only money Konnect reports beyond what is recorded changes anything (a duplicate, or an
        older report, changes nothing); money is never dropped, and never counted twice.

        - An open payment that reaches its amount (or more) is completed: held, or overpaid
          (held then frozen); owed back if its order had ended (`order_ended`).
        - An open payment with less is underpaid and stays open: the payer may pay the rest.
        - An open payment that ends (Konnect says expired, or our own expiry passed) expires;
          what it had received, if anything, is owed back.
        - An ended payment (expired, failed) that receives money records it, and the money is
          owed back: it never confirms an order. It is completed if Konnect says so.
        - A currency other than the payment's changes nothing and is reported.
        """
        if self.status is PaymentState.COMPLETED or not (self.is_open or self.status in _ENDED):
            return Settlement()
        more = verdict.amount_paid > (self.amount_paid or 0)
        if more and verdict.currency != self.currency:
            mismatch = CurrencyMismatch(
                self.payment_ref or str(self.id), self.currency, verdict.currency
            )
            return Settlement(currency_mismatch=mismatch)
        if self.status in _ENDED:
            if not more:
                return Settlement()
            money = self._record(verdict.amount_paid, fee_rate, now)
            if verdict.state is PaymentState.COMPLETED:
                self.status = PaymentState.COMPLETED
            cause = RefundCause.ORDER_ENDED if order_ended else RefundCause.PAYMENT_ENDED
            return Settlement(money=money, fate=MoneyFate.REFUND_DUE, refund_cause=cause)
        ending = verdict.state is PaymentState.EXPIRED or self.is_overdue(now)
        expiry_cause = RefundCause.ORDER_ENDED if order_ended else RefundCause.UNDERPAID_EXPIRED
        if not more:
            if not ending:
                return Settlement()
            had_money = bool(self.amount_paid)
            self.expire(now)
            if not had_money:
                return Settlement(expired=True)
            return Settlement(expired=True, fate=MoneyFate.REFUND_DUE, refund_cause=expiry_cause)
        money = self._record(verdict.amount_paid, fee_rate, now)
        if not money.short:
            # In full: completed, even past our own expiry (Konnect took it; never dropped).
            self.status = PaymentState.COMPLETED
            if order_ended:
                return Settlement(
                    money=money, fate=MoneyFate.REFUND_DUE, refund_cause=RefundCause.ORDER_ENDED
                )
            fate = MoneyFate.OVERPAID if money.over else MoneyFate.HELD
            return Settlement(money=money, fate=fate)
        if ending:
            self.status = PaymentState.EXPIRED
            return Settlement(
                money=money, expired=True, fate=MoneyFate.REFUND_DUE, refund_cause=expiry_cause
            )
        self.status = PaymentState.UNDERPAID
        fate = MoneyFate.UNDERPAID_FOR_ENDED_ORDER if order_ended else MoneyFate.UNDERPAID
        return Settlement(money=money, fate=fate)

    def _record(self, amount_paid: int, fee_rate: Decimal, now: datetime) -> MoneyReceived:
        """Record the payment's new total: what arrived, the fee and the escrow (exact)."""
        minor_units(amount_paid, "amount_paid")
        split = split_payment(amount_paid, fee_rate)
        previous = self.status
        self.amount_paid = amount_paid
        self.platform_fee = split.platform_fee
        self.escrow_amount = split.escrow
        self.paid_at = now
        self.updated_at = now
        return MoneyReceived(
            amount=self.amount,
            amount_paid=amount_paid,
            platform_fee=split.platform_fee,
            escrow_amount=split.escrow,
            currency=self.currency,
            paid_at=now,
            previous_state=previous,
        )

    def is_overdue(self, now: datetime) -> bool:
        """Open past its expiry: the sweeper asks Konnect once more, then expires it."""
        return self.is_open and self.expires_at is not None and now >= self.expires_at

    def expire(self, now: datetime) -> None:
        """The payment was not completed within its lifespan (PaymentFailed, expired)."""
        if not self.is_open:
            raise IllegalTransition(
                "payment", self.payment_ref or self.id, self.status, PaymentState.EXPIRED
            )
        self.status = PaymentState.EXPIRED
        self.updated_at = now

    def fail(self, now: datetime) -> None:
        """We end a pending payment for good for another reason (PaymentFailed, failed)."""
        if self.status is not PaymentState.PENDING:
            raise IllegalTransition(
                "payment", self.payment_ref or self.id, self.status, PaymentState.FAILED
            )
        self.status = PaymentState.FAILED
        self.updated_at = now


# -- escrow --------------------------------------------------------------------------------------


class EscrowStatus(StrEnum):
    HELD = "held"
    """Paid; the session not yet over (released only once scheduled and over, plus the delay)."""
    RELEASED = "released"
    FROZEN = "frozen"
    """The session will not take place as paid: kept, never released on its own; an admin
    decides (`FreezeKind` says why)."""
    REFUND_DUE = "refund_due"
    """Owed back to the mentee: an admin pays it by other means (Konnect has no refund API)."""
    REFUNDED = "refunded"


class FreezeKind(StrEnum):
    """Why a hold was frozen. Only one frozen for the scheduling may be held again."""

    SCHEDULING_ABANDONED = "scheduling_abandoned"
    ORDER_CANCELLED = "order_cancelled"
    OVERPAID = "overpaid"
    PAYMENT_ANOMALY = "payment_anomaly"
    """Money that came late or short before these rules (kept by the migration)."""


class ReleaseScheduling(StrEnum):
    """What OrderConfirmed (the session is in the calendar) did to a hold."""

    SCHEDULED = "scheduled"
    """Held: its release is due at the session's end plus the delay."""
    UNFROZEN = "unfrozen"
    """It was frozen for the scheduling only: held again, its release due (EscrowUnfrozen)."""
    UNCHANGED = "unchanged"
    """Already due at that time (a repeat)."""
    IGNORED = "ignored"
    """It no longer follows the session (released, frozen for another reason, owed back)."""


class RefundAlreadyRecorded(IllegalTransition):
    """A refund is recorded under another reference: a second one would pay the mentee twice."""

    def __init__(self, hold_id: Any, recorded: str, offered: str) -> None:
        super().__init__("escrow", hold_id, EscrowStatus.REFUNDED, EscrowStatus.REFUNDED)
        self.recorded = recorded
        self.args = (
            f"escrow {hold_id} was refunded under reference {recorded!r}; "
            f"it cannot be recorded again under {offered!r}",
        )


@dataclass(kw_only=True, slots=True)
class EscrowHold:
    """The mentor's share of an order's payment, held until the session is over, or owed back.

    `amount` is the escrow (the mentor's share); `amount_paid` all the mentee paid, the fee
    included, which is what a refund gives back (`refund_amount`). `sequence` counts the
    transitions from 1 (made): every Escrow* event carries it, so a consumer keeps the latest.
    `reason` and `decided_by` are those of the last transition (`decided_by` None: by the
    system).
    """

    id: UUID
    order_id: UUID
    mentor_id: UUID
    amount: int
    amount_paid: int
    currency: str
    created_at: datetime
    updated_at: datetime
    status: EscrowStatus = EscrowStatus.HELD
    sequence: int = 1
    frozen_reason: FreezeKind | None = None
    reason: str | None = None
    decided_by: str | None = None
    refund_amount: int | None = None
    refund_reference: str | None = None
    release_due_at: datetime | None = None
    released_at: datetime | None = None
    refunded_at: datetime | None = None

    def __post_init__(self) -> None:
        minor_units(self.amount, "amount")
        minor_units(self.amount_paid, "amount_paid")
        currency_code(self.currency)
        if self.sequence < 1:
            raise ValueError(f"an escrow's sequence starts at 1, got {self.sequence}")

    # -- made ------------------------------------------------------------------------------

    @classmethod
    def held_for(
        cls, money: MoneyReceived, *, id: UUID, order_id: UUID, mentor_id: UUID, now: datetime
    ) -> EscrowHold:
        """(none) -> held: a payment in full, on time, for a live order.

        No release is due yet: only OrderConfirmed (the session is in the calendar) says when.
        """
        return cls(
            id=id,
            order_id=order_id,
            mentor_id=mentor_id,
            amount=money.escrow_amount,
            amount_paid=money.amount_paid,
            currency=money.currency,
            created_at=now,
            updated_at=now,
            reason="paid in full",
        )

    @classmethod
    def owed_back(
        cls,
        *,
        id: UUID,
        order_id: UUID,
        mentor_id: UUID,
        escrow_amount: int,
        amount_paid: int,
        currency: str,
        reason: str,
        now: datetime,
    ) -> EscrowHold:
        """(none) -> refund_due: money for an order that had ended, or an underpaid order that
        expired. All that was paid goes back; nothing was ever held for the mentor."""
        return cls(
            id=id,
            order_id=order_id,
            mentor_id=mentor_id,
            amount=escrow_amount,
            amount_paid=amount_paid,
            currency=currency,
            created_at=now,
            updated_at=now,
            status=EscrowStatus.REFUND_DUE,
            reason=reason,
            refund_amount=amount_paid,
        )

    # -- the session's fate ----------------------------------------------------------------

    def schedule_release(
        self, session_end_at: datetime, delay: timedelta, now: datetime
    ) -> ReleaseScheduling:
        """The session is in the calendar and ends at `session_end_at` (OrderConfirmed).

        Held: its release is due at the end plus the delay. Frozen for the scheduling only:
        held again (an admin's retry of the scheduling succeeded). Any other state no longer
        follows the session: no change, never an error (the caller logs it).
        """
        due = session_end_at + delay
        if self.status is EscrowStatus.HELD:
            if self.release_due_at == due:
                return ReleaseScheduling.UNCHANGED
            self.release_due_at = due
            self.updated_at = now
            return ReleaseScheduling.SCHEDULED
        if (
            self.status is EscrowStatus.FROZEN
            and self.frozen_reason is FreezeKind.SCHEDULING_ABANDONED
        ):
            self._move(
                EscrowStatus.HELD,
                f"the session was scheduled after all; its release is due at {due.isoformat()}",
                None,
                now,
            )
            self.frozen_reason = None
            self.release_due_at = due
            return ReleaseScheduling.UNFROZEN
        return ReleaseScheduling.IGNORED

    def release_when_due(self, now: datetime) -> None:
        """held -> released, once the release OrderConfirmed set is due (EscrowReleased).

        A held hold without a due time (its session was never scheduled) is never released:
        IllegalTransition, as for any state but held; `ReleaseTooEarly` before it is due.
        """
        if self.status is EscrowStatus.RELEASED:
            raise AlreadyApplied(f"escrow {self.id} is already released")
        if self.status is not EscrowStatus.HELD or self.release_due_at is None:
            raise IllegalTransition("escrow", self.id, self.status, EscrowStatus.RELEASED)
        if now < self.release_due_at:
            raise ReleaseTooEarly(self.id, self.release_due_at)
        self._move(
            EscrowStatus.RELEASED,
            f"the session was over; released when due ({self.release_due_at.isoformat()})",
            None,
            now,
        )
        self.released_at = now

    def freeze(self, kind: FreezeKind, reason: str, by: str | None, now: datetime) -> None:
        """held -> frozen: the session will not take place as paid; an admin decides.

        A hold already frozen for the same reason: `AlreadyApplied`. Frozen for the scheduling,
        then for another reason (the order was cancelled): frozen for that one, so that a late
        OrderConfirmed can no longer unfreeze it. Frozen for another reason, then for the
        scheduling: `AlreadyApplied` (the graver reason stays). Released or owed back:
        IllegalTransition.
        """
        if self.status is EscrowStatus.FROZEN:
            if self.frozen_reason is kind or kind is FreezeKind.SCHEDULING_ABANDONED:
                raise AlreadyApplied(f"escrow {self.id} is already frozen ({self.frozen_reason})")
        elif self.status is not EscrowStatus.HELD:
            raise IllegalTransition("escrow", self.id, self.status, EscrowStatus.FROZEN)
        self._move(EscrowStatus.FROZEN, reason, by, now)
        self.frozen_reason = kind
        self.release_due_at = None

    # -- an admin's decisions ----------------------------------------------------------------

    def release_by_admin(self, reason: str, by: str, now: datetime) -> None:
        """frozen -> released: an admin pays the mentor after all. Released: AlreadyApplied."""
        if self.status is EscrowStatus.RELEASED:
            raise AlreadyApplied(f"escrow {self.id} is already released")
        if self.status is not EscrowStatus.FROZEN:
            raise IllegalTransition("escrow", self.id, self.status, EscrowStatus.RELEASED)
        self._move(EscrowStatus.RELEASED, reason, by, now)
        self.released_at = now

    def choose_refund(self, reason: str, by: str, now: datetime) -> None:
        """frozen -> refund_due: an admin gives the mentee back all they paid, the fee
        included. Already refund_due: AlreadyApplied."""
        if self.status is EscrowStatus.REFUND_DUE:
            raise AlreadyApplied(f"a refund of escrow {self.id} is already due")
        if self.status is not EscrowStatus.FROZEN:
            raise IllegalTransition("escrow", self.id, self.status, EscrowStatus.REFUND_DUE)
        self._move(EscrowStatus.REFUND_DUE, reason, by, now)
        self.refund_amount = self.amount_paid

    def owe_more(self, amount_paid: int, escrow_amount: int, reason: str, now: datetime) -> None:
        """refund_due -> refund_due: more money came late on top of what is owed back; the
        refund grows to the new total. Refunded already: IllegalTransition (the admins must
        hear of the rest another way). The total never shrinks: AlreadyApplied."""
        minor_units(amount_paid, "amount_paid")
        minor_units(escrow_amount, "escrow_amount")
        if self.status is not EscrowStatus.REFUND_DUE:
            raise IllegalTransition("escrow", self.id, self.status, EscrowStatus.REFUND_DUE)
        if amount_paid <= self.amount_paid:
            raise AlreadyApplied(f"escrow {self.id} already owes back {self.amount_paid}")
        self._move(EscrowStatus.REFUND_DUE, reason, None, now)
        self.amount = escrow_amount
        self.amount_paid = amount_paid
        self.refund_amount = amount_paid

    def record_refund(self, reference: str, reason: str, by: str, now: datetime) -> None:
        """refund_due -> refunded: an admin paid the refund back and records its reference.

        Refunded under the same reference: AlreadyApplied; under another:
        `RefundAlreadyRecorded` (an IllegalTransition: it would be a second refund).
        """
        if not reference or not reference.strip():
            raise ValueError("a refund is recorded with its reference")
        if self.status is EscrowStatus.REFUNDED:
            if self.refund_reference == reference:
                raise AlreadyApplied(f"escrow {self.id} is already refunded ({reference})")
            raise RefundAlreadyRecorded(self.id, self.refund_reference or "", reference)
        if self.status is not EscrowStatus.REFUND_DUE:
            raise IllegalTransition("escrow", self.id, self.status, EscrowStatus.REFUNDED)
        self._move(EscrowStatus.REFUNDED, reason, by, now)
        self.refund_reference = reference
        self.refunded_at = now

    def _move(self, to: EscrowStatus, reason: str, by: str | None, now: datetime) -> None:
        if not reason or not reason.strip():
            raise ValueError("every escrow transition says why")
        self.status = to
        self.sequence += 1
        self.reason = reason
        self.decided_by = by
        self.updated_at = now


# -- what webhooks may cost ----------------------------------------------------------------------


class Lookup(StrEnum):
    """Who asks Konnect about a payment (a payment read, `GET /payments/{ref}`)."""

    WEBHOOK = "webhook"
    RECONCILIATION = "reconciliation"


@dataclass(slots=True)
class _Bucket:
    """Tokens refilled at `per_second` up to `capacity`; `at` is when they were counted."""

    capacity: float
    per_second: float
    tokens: float
    at: float

    def refill(self, now: float) -> None:
        if now > self.at:
            self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.per_second)
            self.at = now

    def wait(self) -> float:
        """Seconds until it holds a whole token (0: it does now; inf: it never will)."""
        if self.tokens >= 1:
            return 0.0
        if self.capacity < 1 or self.per_second <= 0:
            return math.inf
        return (1 - self.tokens) / self.per_second


class LookupBudget:
    """The payment reads one process may make at Konnect, whose rate limit they all share.

    A token bucket of `per_minute` reads a minute, a minute's worth at once at most. Webhooks
    also draw on a bucket of their own, `webhook_share` of the whole: however many come, they
    leave the rest to reconciliation, which draws on the whole bucket only (and so may use what
    webhooks leave). Time is `now` in seconds on a monotonic clock, the caller's.
    """

    def __init__(self, per_minute: float, webhook_share: float, now: float) -> None:
        if not per_minute >= 1:
            raise ValueError(f"per_minute must be at least 1, got {per_minute}")
        if not 0 <= webhook_share <= 1:
            raise ValueError(f"webhook_share must be within [0, 1], got {webhook_share}")
        webhooks = per_minute * webhook_share
        self._all = _Bucket(per_minute, per_minute / 60, per_minute, now)
        self._webhooks = _Bucket(webhooks, webhooks / 60, webhooks, now)

    def take(self, lookup: Lookup, now: float) -> float:
        """Take one read for `lookup`: 0.0 when granted, else the seconds until one could be
        (nothing is taken then; `math.inf` when webhooks have no share at all)."""
        buckets = [self._all] if lookup is Lookup.RECONCILIATION else [self._all, self._webhooks]
        for bucket in buckets:
            bucket.refill(now)
        wait = max(bucket.wait() for bucket in buckets)
        if wait == 0:
            for bucket in buckets:
                bucket.tokens -= 1
        return wait


@dataclass(frozen=True, slots=True)
class UnknownRefReport:
    """Webhooks that named refs none of our payments has, counted since the last report."""

    count: int
    refs: tuple[str, ...]
    """A sample, oldest first: the first refs seen, then the last (each ref once)."""
    first_seen_at: datetime
    last_seen_at: datetime


class UnknownRefTally:
    """Webhooks naming refs none of our payments has, counted in memory and reported together.

    Konnect only sends refs we created, so such a webhook is forged or mistaken: it costs no
    Konnect call and no write. The first after a quiet `interval` is reported at once; those
    that follow wait for the next report, at most one per `interval`, which says how many came
    and keeps `sample` refs at each end. A flood of any size is one report per interval.
    """

    def __init__(self, interval: timedelta, sample: int) -> None:
        if interval <= timedelta(0) or sample < 1:
            raise ValueError("a tally needs a positive interval and sample")
        self.interval = interval
        self.sample = sample
        self._reported_at: datetime | None = None
        self._clear()

    def _clear(self) -> None:
        self._count = 0
        self._first: list[str] = []
        self._last: list[str] = []
        self._first_seen_at: datetime | None = None
        self._last_seen_at: datetime | None = None

    @property
    def count(self) -> int:
        """Webhooks counted and not reported yet."""
        return self._count

    def seen(self, ref: str, now: datetime) -> UnknownRefReport | None:
        """Count one webhook for `ref`; the report to record now, if one is due."""
        self._count += 1
        self._keep(ref)
        self._first_seen_at = self._first_seen_at or now
        self._last_seen_at = now
        return self.due(now)

    def due(self, now: datetime) -> UnknownRefReport | None:
        """What was counted, once `interval` has passed since the last report (None: not yet,
        or nothing was). Taking it starts the next interval."""
        if not self._count:
            return None
        if self._reported_at is not None and now - self._reported_at < self.interval:
            return None
        assert self._first_seen_at is not None and self._last_seen_at is not None
        report = UnknownRefReport(
            count=self._count,
            refs=(*self._first, *self._last),
            first_seen_at=self._first_seen_at,
            last_seen_at=self._last_seen_at,
        )
        self._reported_at = now
        self._clear()
        return report

    def put_back(self, report: UnknownRefReport) -> None:
        """A report that could not be recorded: its webhooks join the next one (which still
        waits for the interval: an outage is not retried on every webhook)."""
        later_refs = (*self._first, *self._last)
        later_first, later_last = self._first_seen_at, self._last_seen_at
        self._count += report.count
        self._first, self._last = [], []
        for ref in (*report.refs, *later_refs):
            self._keep(ref)
        self._first_seen_at = min(filter(None, (report.first_seen_at, later_first)))
        self._last_seen_at = max(filter(None, (report.last_seen_at, later_last)))

    def _keep(self, ref: str) -> None:
        keep_ends(self._first, self._last, ref, self.sample)
