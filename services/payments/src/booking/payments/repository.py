"""All of the payments schema's SQL, and the mapping between its rows and the domain: payments,
escrow holds and order endings.

Nothing here commits: every function works in the caller's transaction (the unit of work a
use case opened, or the one a handler was given), so that a use case's statements stay
together. Payments and escrow holds come and go as domain objects; a payment row carries more
than the domain's `Payment` (the booking it pays for, the booking's correlation id), so it
comes as a `StoredPayment`: the payment and its `Booking`. The few reads and claims that need
less come as small records of their own.

Everything that changes what payments knows of one order (its payment opened, its ending, its
escrow moved) first takes the order's lock (`lock_order`), then the rows' locks: one order's
changes are serialised, in one lock order, so whichever comes second sees the other.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, bindparam, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from booking.payments.domain import (
    EscrowHold,
    EscrowStatus,
    FreezeKind,
    Payment,
    PaymentState,
)
from booking.payments.tables import SCHEMA, escrow_holds, order_endings, payments

_LOCK = text("SELECT pg_advisory_xact_lock(hashtext(:key))")


async def lock_order(session: AsyncSession, order_id: uuid.UUID) -> None:
    """Hold the order's lock until the transaction ends.

    A transaction-scoped advisory lock, so it covers an order that has no row yet (an ending
    that comes before its BookingRequested). Its key names this schema: advisory locks are the
    database's, and another service locking the same order must not wait on ours.
    """
    await session.execute(_LOCK, {"key": f"{SCHEMA}:order:{order_id}"})


# -- payments ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Booking:
    """What a payment keeps of the booking it pays for: the session and its mentor (for the
    escrow), what Konnect's page shows and who pays, and the booking's correlation id, which
    every later event about the payment carries."""

    session_id: uuid.UUID
    mentor_id: uuid.UUID
    session_end_at: datetime
    title: str
    mentee_first_name: str
    mentee_last_name: str
    mentee_email: str
    mentee_phone: str | None
    correlation_id: str


@dataclass(slots=True)
class StoredPayment:
    """A payment and the booking it pays for."""

    payment: Payment
    booking: Booking


@dataclass(frozen=True, slots=True)
class PaymentOfRef:
    """What the webhook needs to know of the payment with a Konnect ref."""

    id: uuid.UUID
    order_id: uuid.UUID
    status: PaymentState


@dataclass(frozen=True, slots=True)
class PaymentToCheck:
    """An open payment the sweeper has claimed, to ask Konnect about."""

    id: uuid.UUID
    order_id: uuid.UUID
    payment_ref: str
    currency: str


def _payment_of(row: Row[Any]) -> Payment:
    """The domain's view of a `payments` row."""
    return Payment(
        id=row.id,
        order_id=row.order_id,
        amount=row.amount,
        currency=row.currency,
        created_at=row.created_at,
        updated_at=row.updated_at,
        payment_ref=row.payment_ref,
        pay_url=row.pay_url,
        expires_at=row.expires_at,
        status=PaymentState(row.status),
        amount_paid=row.amount_paid,
        platform_fee=row.platform_fee,
        escrow_amount=row.escrow_amount,
        paid_at=row.paid_at,
    )


def _stored_payment(row: Row[Any]) -> StoredPayment:
    return StoredPayment(
        payment=_payment_of(row),
        booking=Booking(
            session_id=row.session_id,
            mentor_id=row.mentor_id,
            session_end_at=row.session_end_at,
            title=row.title,
            mentee_first_name=row.mentee_first_name,
            mentee_last_name=row.mentee_last_name,
            mentee_email=row.mentee_email,
            mentee_phone=row.mentee_phone,
            correlation_id=row.correlation_id,
        ),
    )


def _payment_columns(payment: Payment) -> dict[str, Any]:
    """The columns of a `payments` row the domain may change."""
    return {
        "status": payment.status.value,
        "payment_ref": payment.payment_ref,
        "pay_url": payment.pay_url,
        "expires_at": payment.expires_at,
        "amount_paid": payment.amount_paid,
        "platform_fee": payment.platform_fee,
        "escrow_amount": payment.escrow_amount,
        "paid_at": payment.paid_at,
        "updated_at": payment.updated_at,
    }


async def add_payment(session: AsyncSession, payment: Payment, booking: Booking) -> bool:
    """Store a payment just opened; False when its order has one already.

    Exactly one payment per order: the unique order_id decides, not a check before.
    """
    opened = await session.execute(
        insert(payments)
        .values(
            id=payment.id,
            order_id=payment.order_id,
            amount=payment.amount,
            currency=payment.currency,
            created_at=payment.created_at,
            session_id=booking.session_id,
            mentor_id=booking.mentor_id,
            session_end_at=booking.session_end_at,
            title=booking.title,
            mentee_first_name=booking.mentee_first_name,
            mentee_last_name=booking.mentee_last_name,
            mentee_email=booking.mentee_email,
            mentee_phone=booking.mentee_phone,
            correlation_id=booking.correlation_id,
            **_payment_columns(payment),
        )
        .on_conflict_do_nothing(index_elements=[payments.c.order_id])
        .returning(payments.c.id)
    )
    return opened.scalar_one_or_none() is not None


# Built once: every webhook runs it, a flood of forged ones too.
_BY_REF = select(payments.c.id, payments.c.order_id, payments.c.status).where(
    payments.c.payment_ref == bindparam("payment_ref")
)


async def payment_of_ref(session: AsyncSession, payment_ref: str) -> PaymentOfRef | None:
    """The payment with this Konnect ref (unique: one index read), or None when none of ours
    has it."""
    row = (await session.execute(_BY_REF, {"payment_ref": payment_ref})).one_or_none()
    if row is None:
        return None
    return PaymentOfRef(id=row.id, order_id=row.order_id, status=PaymentState(row.status))


async def locked_payment(session: AsyncSession, payment_id: uuid.UUID) -> StoredPayment:
    """The payment, locked for update until the transaction ends."""
    query = select(payments).where(payments.c.id == payment_id).with_for_update()
    return _stored_payment((await session.execute(query)).one())


async def locked_payment_of_order(
    session: AsyncSession, order_id: uuid.UUID
) -> StoredPayment | None:
    """The order's payment, locked for update, or None when none was opened for it."""
    query = select(payments).where(payments.c.order_id == order_id).with_for_update()
    row = (await session.execute(query)).one_or_none()
    return None if row is None else _stored_payment(row)


async def save_payment(
    session: AsyncSession,
    payment: Payment,
    *,
    lease_ended: bool = False,
    checked_at: datetime | None = None,
) -> None:
    """Store what the domain changed of a payment; `lease_ended` when the replica that
    initiated it is done with it, `checked_at` when Konnect was asked about it."""
    extra: dict[str, Any] = {}
    if lease_ended:
        extra["claimed_until"] = None
    if checked_at is not None:
        extra["last_checked_at"] = checked_at
    await session.execute(
        update(payments)
        .where(payments.c.id == payment.id)
        .values(**_payment_columns(payment), **extra)
    )


async def mark_checked(session: AsyncSession, payment_id: uuid.UUID, now: datetime) -> None:
    """Konnect was asked about the payment at `now`, and said nothing new."""
    await session.execute(
        update(payments).where(payments.c.id == payment_id).values(last_checked_at=now)
    )


async def claim_initiation(
    session: AsyncSession, payment_id: uuid.UUID, now: datetime, until: datetime
) -> StoredPayment | None:
    """Take the lease of initiating a payment until `until`, unless it is no longer
    `initiating` or another replica's lease still runs; the payment, or None."""
    claim = (
        update(payments)
        .where(
            payments.c.id == payment_id,
            payments.c.status == PaymentState.INITIATING.value,
            payments.c.claimed_until.is_(None) | (payments.c.claimed_until < now),
        )
        .values(claimed_until=until)
        .returning(*payments.c)
    )
    row = (await session.execute(claim)).one_or_none()
    return None if row is None else _stored_payment(row)


async def claim_lapsed_initiations(
    session: AsyncSession,
    now: datetime,
    *,
    created_before: datetime,
    until: datetime,
    limit: int,
) -> list[StoredPayment]:
    """Take the lease, until `until`, of up to `limit` payments left `initiating`: their lease
    lapsed, or nobody took one and they were opened before `created_before`. Those another
    replica is claiming are skipped."""
    lapsed = (
        select(payments.c.id)
        .where(
            payments.c.status == PaymentState.INITIATING.value,
            (payments.c.claimed_until.is_(None) & (payments.c.created_at <= created_before))
            | (payments.c.claimed_until < now),
        )
        .order_by(payments.c.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    claim = (
        update(payments)
        .where(payments.c.id.in_(lapsed.scalar_subquery()))
        .values(claimed_until=until)
        .returning(*payments.c)
    )
    return [_stored_payment(row) for row in (await session.execute(claim)).all()]


_OPEN = (PaymentState.PENDING.value, PaymentState.UNDERPAID.value)


async def claim_payments_to_check(
    session: AsyncSession,
    now: datetime,
    *,
    created_before: datetime,
    checked_before: datetime,
    limit: int,
) -> list[PaymentToCheck]:
    """Stamp as checked at `now` up to `limit` open payments opened before `created_before` and
    not checked since `checked_before` (never checked first); those another replica is
    claiming are skipped."""
    due = (
        select(payments.c.id)
        .where(
            payments.c.status.in_(_OPEN),
            payments.c.created_at <= created_before,
            payments.c.last_checked_at.is_(None) | (payments.c.last_checked_at <= checked_before),
        )
        .order_by(payments.c.last_checked_at.asc().nulls_first())
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    claim = (
        update(payments)
        .where(payments.c.id.in_(due.scalar_subquery()))
        .values(last_checked_at=now)
        .returning(payments.c.id, payments.c.order_id, payments.c.payment_ref, payments.c.currency)
    )
    return [
        PaymentToCheck(
            id=row.id, order_id=row.order_id, payment_ref=row.payment_ref, currency=row.currency
        )
        for row in (await session.execute(claim)).all()
    ]


# -- order endings -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OrderEnding:
    """An order that ended without its payment."""

    order_id: uuid.UUID
    reason: str
    by: str | None
    ended_at: datetime


async def record_ending(session: AsyncSession, ending: OrderEnding) -> bool:
    """Record that the order ended; False when it was already (the first ending stays)."""
    inserted = await session.execute(
        insert(order_endings)
        .values(
            order_id=ending.order_id,
            reason=ending.reason,
            by=ending.by,
            ended_at=ending.ended_at,
        )
        .on_conflict_do_nothing(index_elements=[order_endings.c.order_id])
        .returning(order_endings.c.order_id)
    )
    return inserted.scalar_one_or_none() is not None


async def ending_of(session: AsyncSession, order_id: uuid.UUID) -> OrderEnding | None:
    """How the order ended without its payment, or None while it has not."""
    row = (
        await session.execute(select(order_endings).where(order_endings.c.order_id == order_id))
    ).one_or_none()
    if row is None:
        return None
    return OrderEnding(order_id=row.order_id, reason=row.reason, by=row.by, ended_at=row.ended_at)


# -- escrow holds --------------------------------------------------------------------------------


@dataclass(slots=True)
class StoredHold:
    """A hold and what its events and audit need of its payment."""

    hold: EscrowHold
    payment_id: uuid.UUID
    session_id: uuid.UUID
    correlation_id: str


def _hold_of(row: Row[Any]) -> EscrowHold:
    """The domain's view of an `escrow_holds` row."""
    return EscrowHold(
        id=row.id,
        order_id=row.order_id,
        mentor_id=row.mentor_id,
        amount=row.amount,
        amount_paid=row.amount_paid,
        currency=row.currency,
        created_at=row.created_at,
        updated_at=row.updated_at,
        status=EscrowStatus(row.status),
        sequence=row.sequence,
        frozen_reason=None if row.frozen_reason is None else FreezeKind(row.frozen_reason),
        reason=row.reason,
        decided_by=row.decided_by,
        refund_amount=row.refund_amount,
        refund_reference=row.refund_reference,
        release_due_at=row.release_due_at,
        released_at=row.released_at,
        refunded_at=row.refunded_at,
    )


def _hold_columns(hold: EscrowHold) -> dict[str, Any]:
    return {
        "amount": hold.amount,
        "amount_paid": hold.amount_paid,
        "status": hold.status.value,
        "sequence": hold.sequence,
        "frozen_reason": None if hold.frozen_reason is None else hold.frozen_reason.value,
        "reason": hold.reason,
        "decided_by": hold.decided_by,
        "refund_amount": hold.refund_amount,
        "refund_reference": hold.refund_reference,
        "release_due_at": hold.release_due_at,
        "released_at": hold.released_at,
        "refunded_at": hold.refunded_at,
        "updated_at": hold.updated_at,
    }


_WITH_PAYMENT = (
    escrow_holds,
    payments.c.session_id.label("session_id"),
    payments.c.correlation_id.label("correlation_id"),
)


def _stored_hold(row: Row[Any]) -> StoredHold:
    return StoredHold(
        hold=_hold_of(row),
        payment_id=row.payment_id,
        session_id=row.session_id,
        correlation_id=row.correlation_id,
    )


async def hold_of_order(
    session: AsyncSession, order_id: uuid.UUID, *, lock: bool = True
) -> StoredHold | None:
    """The order's hold (locked for update unless `lock` is False), or None if it has none."""
    query = (
        select(*_WITH_PAYMENT)
        .join(payments, payments.c.id == escrow_holds.c.payment_id)
        .where(escrow_holds.c.order_id == order_id)
    )
    if lock:
        query = query.with_for_update(of=escrow_holds)
    row = (await session.execute(query)).one_or_none()
    return None if row is None else _stored_hold(row)


async def holds_due(session: AsyncSession, now: datetime, limit: int) -> list[StoredHold]:
    """Held holds whose release is due, locked; those another replica holds are skipped."""
    query = (
        select(*_WITH_PAYMENT)
        .join(payments, payments.c.id == escrow_holds.c.payment_id)
        .where(
            escrow_holds.c.status == EscrowStatus.HELD.value,
            escrow_holds.c.release_due_at <= now,
        )
        .order_by(escrow_holds.c.release_due_at)
        .limit(limit)
        .with_for_update(of=escrow_holds, skip_locked=True)
    )
    return [_stored_hold(row) for row in (await session.execute(query)).all()]


async def add_hold(session: AsyncSession, hold: EscrowHold, payment_id: uuid.UUID) -> None:
    """Store a hold just made for the payment's money."""
    await session.execute(
        escrow_holds.insert().values(
            id=hold.id,
            order_id=hold.order_id,
            payment_id=payment_id,
            mentor_id=hold.mentor_id,
            currency=hold.currency,
            created_at=hold.created_at,
            **_hold_columns(hold),
        )
    )


async def save_hold(session: AsyncSession, hold: EscrowHold) -> None:
    """Store what the domain changed of a hold."""
    await session.execute(
        update(escrow_holds).where(escrow_holds.c.id == hold.id).values(**_hold_columns(hold))
    )
