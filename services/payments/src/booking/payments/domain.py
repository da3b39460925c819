"""The payments service's rules: the fee split, Konnect's verdict, payments and escrow holds.

Pure: no I/O, no framework, no clock. Every method that stamps a time takes `now`.

Payment::

    initiating --initiated--> pending
    initiating --initiation_failed--> initiation_failed
    pending --apply_completion--> completed
    expired | failed --apply_completion--> completed  (late money: recorded, `Completion.late`)
    pending --expire--> expired
    pending --fail--> failed
    completed --apply_completion--> AlreadyApplied

Escrow hold::

    held --release (session end + delay passed)--> released
    held --cancel--> cancelled
    released --release--> AlreadyApplied
    frozen (a late or short payment: an admin decides, never released automatically)
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
      (a late one is the caller's Critical anomaly, see `Payment.apply_completion`).
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
        raise MalformedKonnectPayment(f"{field} must be a whole number of millimes, got {value!r}")
    return value


def konnect_amount_paid(payment: dict[str, Any]) -> int:
    """How much a Konnect payment has reached, in minor units.

    A partial payment (`type: partial`) reached `reachedAmount`. A completed payment of another
    type reached `amount`, unless it reports a positive `reachedAmount` below `amount`: then the
    lower figure, so we never credit money Konnect does not say arrived (the shortfall becomes an
    underpayment anomaly). A payment that is not completed reached `reachedAmount` (0 if absent).
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


@dataclass(frozen=True, slots=True)
class Completion:
    """What `Payment.apply_completion` recorded; the facts for PaymentCompleted and anomalies."""

    amount: int
    amount_paid: int
    platform_fee: int
    escrow_amount: int
    currency: str
    paid_at: datetime
    previous_state: PaymentState

    @property
    def late(self) -> bool:
        """The money arrived after the payment had ended: a Critical anomaly, never dropped."""
        return self.previous_state is not PaymentState.PENDING

    @property
    def amount_mismatch(self) -> bool:
        """The payer paid more or less than the order's amount: an anomaly for the admins."""
        return self.amount_paid != self.amount


@dataclass(frozen=True, slots=True)
class Settlement:
    """What applying Konnect's verdict changed: nothing, a completion, or an expiry."""

    completion: Completion | None = None
    expired: bool = False
    currency_mismatch: CurrencyMismatch | None = None

    @property
    def changed(self) -> bool:
        return self.completion is not None or self.expired


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

    def apply_completion(
        self, amount_paid: int, currency: str, fee_rate: Decimal, now: datetime
    ) -> Completion:
        """Record that Konnect completed the payment: what arrived, the fee and the escrow.

        Applies once: a payment already completed raises `AlreadyApplied` (a duplicate webhook).
        A payment that had expired or failed is still completed (the money is real and never
        dropped); the returned `Completion.late` tells the caller to raise a Critical anomaly.
        A currency other than the payment's raises `CurrencyMismatch` and changes nothing.
        """
        minor_units(amount_paid, "amount_paid")
        currency_code(currency)
        if self.status is PaymentState.COMPLETED:
            raise AlreadyApplied(f"payment {self.payment_ref or self.id} is already completed")
        if currency != self.currency:
            raise CurrencyMismatch(self.payment_ref or str(self.id), self.currency, currency)
        split = split_payment(amount_paid, fee_rate)
        previous = self.status
        self.status = PaymentState.COMPLETED
        self.amount_paid = amount_paid
        self.platform_fee = split.platform_fee
        self.escrow_amount = split.escrow
        self.paid_at = now
        self.updated_at = now
        return Completion(
            amount=self.amount,
            amount_paid=amount_paid,
            platform_fee=split.platform_fee,
            escrow_amount=split.escrow,
            currency=currency,
            paid_at=now,
            previous_state=previous,
        )

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
        """Konnect refused the payment or stayed out of reach: PaymentInitiationFailed."""
        if self.status is not PaymentState.INITIATING:
            raise IllegalTransition("payment", self.id, self.status, PaymentState.INITIATION_FAILED)
        self.status = PaymentState.INITIATION_FAILED
        self.updated_at = now

    def apply_verdict(
        self, verdict: KonnectVerdict, fee_rate: Decimal, now: datetime
    ) -> Settlement:
        """Apply what Konnect says, once: the one rule the webhook and the sweeper share.

        - Completed: `apply_completion` with what Konnect reached (a duplicate changes nothing;
          a currency mismatch changes nothing and is reported).
        - Ended (Konnect says expired, or it is pending past our own expiry) after some money
          reached it (a partial payment): completed with what arrived, never dropped; the
          shortfall is the caller's underpayment anomaly.
        - Ended with nothing paid: the payment expires, if it was still pending.
        - Pending otherwise (failed attempts or a partial payment included): nothing changes,
          the payer may still pay (the rest).
        """
        ended = verdict.state is PaymentState.EXPIRED or self.is_overdue(now)
        paid = verdict.state is PaymentState.COMPLETED or (ended and verdict.amount_paid > 0)
        if paid:
            try:
                completion = self.apply_completion(
                    verdict.amount_paid, verdict.currency, fee_rate, now
                )
            except AlreadyApplied:
                return Settlement()
            except CurrencyMismatch as mismatch:
                return Settlement(currency_mismatch=mismatch)
            return Settlement(completion=completion)
        if ended and self.status is PaymentState.PENDING:
            self.expire(now)
            return Settlement(expired=True)
        return Settlement()

    def is_overdue(self, now: datetime) -> bool:
        """Pending past its expiry: the sweeper asks Konnect once more, then expires it."""
        return (
            self.status is PaymentState.PENDING
            and self.expires_at is not None
            and now >= self.expires_at
        )

    def expire(self, now: datetime) -> None:
        """The payment was never completed within its lifespan (PaymentFailed, expired)."""
        self._end(PaymentState.EXPIRED, now)

    def fail(self, now: datetime) -> None:
        """We end a pending payment for good for another reason (PaymentFailed, failed)."""
        self._end(PaymentState.FAILED, now)

    def _end(self, to_state: PaymentState, now: datetime) -> None:
        if self.status is not PaymentState.PENDING:
            raise IllegalTransition("payment", self.payment_ref or self.id, self.status, to_state)
        self.status = to_state
        self.updated_at = now


# -- escrow --------------------------------------------------------------------------------------


class EscrowStatus(StrEnum):
    HELD = "held"
    RELEASED = "released"
    CANCELLED = "cancelled"
    FROZEN = "frozen"
    """Money that came late or short: kept, never released automatically; an admin decides."""


@dataclass(kw_only=True, slots=True)
class EscrowHold:
    """The mentor's share of a completed payment, held until the session is over."""

    id: UUID
    order_id: UUID
    mentor_id: UUID
    amount: int
    currency: str
    created_at: datetime
    status: EscrowStatus = EscrowStatus.HELD
    release_due_at: datetime | None = None
    released_at: datetime | None = None
    cancelled_at: datetime | None = None

    def __post_init__(self) -> None:
        minor_units(self.amount, "amount")
        currency_code(self.currency)

    @classmethod
    def for_completion(
        cls,
        completion: Completion,
        *,
        id: UUID,
        order_id: UUID,
        mentor_id: UUID,
        session_end_at: datetime,
        delay: timedelta,
        now: datetime,
    ) -> EscrowHold:
        """The hold for a completed payment's escrow.

        Held until the session's end plus the delay only when the money came on time and in
        full; money that came late (the payment had ended) or short is frozen: never released
        automatically, an admin decides.
        """
        on_time_and_full = not completion.late and completion.amount_paid >= completion.amount
        return cls(
            id=id,
            order_id=order_id,
            mentor_id=mentor_id,
            amount=completion.escrow_amount,
            currency=completion.currency,
            created_at=now,
            status=EscrowStatus.HELD if on_time_and_full else EscrowStatus.FROZEN,
            release_due_at=cls.due_at(session_end_at, delay) if on_time_and_full else None,
        )

    @staticmethod
    def due_at(session_end_at: datetime, delay: timedelta) -> datetime:
        """When a hold may be released: the session's end plus the delay."""
        return session_end_at + delay

    def release(self, now: datetime, session_end_at: datetime, delay: timedelta) -> None:
        """Release the hold for the mentor (EscrowReleased).

        Refused with `ReleaseTooEarly` before the session's end plus the delay, with
        `IllegalTransition` once cancelled, and with `AlreadyApplied` when already released.
        """
        if self.status is EscrowStatus.RELEASED:
            raise AlreadyApplied(f"escrow {self.id} is already released")
        if self.status is not EscrowStatus.HELD:
            raise IllegalTransition("escrow", self.id, self.status, EscrowStatus.RELEASED)
        due = self.due_at(session_end_at, delay)
        if now < due:
            raise ReleaseTooEarly(self.id, due)
        self.status = EscrowStatus.RELEASED
        self.released_at = now

    def release_when_due(self, now: datetime) -> None:
        """Release the hold at the due time it was given when made (`release_due_at`).

        Refused like `release`; a hold without a due time (frozen) is never released here.
        """
        if self.status is EscrowStatus.RELEASED:
            raise AlreadyApplied(f"escrow {self.id} is already released")
        if self.status is not EscrowStatus.HELD or self.release_due_at is None:
            raise IllegalTransition("escrow", self.id, self.status, EscrowStatus.RELEASED)
        if now < self.release_due_at:
            raise ReleaseTooEarly(self.id, self.release_due_at)
        self.status = EscrowStatus.RELEASED
        self.released_at = now

    def cancel(self, now: datetime) -> None:
        """The session was cancelled: the hold is never released."""
        if self.status is not EscrowStatus.HELD:
            raise IllegalTransition("escrow", self.id, self.status, EscrowStatus.CANCELLED)
        self.status = EscrowStatus.CANCELLED
        self.cancelled_at = now
