"""The payments schema as the use cases see it: payments, escrow holds and order endings.

Nothing here commits: every function works in the caller's transaction. Escrow holds come and
go as domain objects; a payment row carries more than the domain's `Payment` (who to ask
Konnect for, the booking's correlation id), so its row is read and the domain built from it.

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


def payment_of(row: Row[Any]) -> Payment:
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


def stored(payment: Payment) -> dict[str, Any]:
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


# Built once: every webhook runs it, a flood of forged ones too.
_BY_REF = select(payments.c.id, payments.c.order_id, payments.c.status).where(
    payments.c.payment_ref == bindparam("payment_ref")
)


async def payment_by_ref(session: AsyncSession, payment_ref: str) -> Row[Any] | None:
    """The id, order and status of the payment with this Konnect ref (unique: one index read),
    or None when none of ours has it."""
    return (await session.execute(_BY_REF, {"payment_ref": payment_ref})).one_or_none()


async def locked_payment(session: AsyncSession, payment_id: uuid.UUID) -> Row[Any]:
    query = select(payments).where(payments.c.id == payment_id).with_for_update()
    return (await session.execute(query)).one()


async def locked_payment_of_order(session: AsyncSession, order_id: uuid.UUID) -> Row[Any] | None:
    query = select(payments).where(payments.c.order_id == order_id).with_for_update()
    return (await session.execute(query)).one_or_none()


async def save_payment(session: AsyncSession, payment: Payment, **columns: Any) -> None:
    await session.execute(
        update(payments).where(payments.c.id == payment.id).values(**stored(payment), **columns)
    )


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


def hold_of(row: Row[Any]) -> EscrowHold:
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


def stored_hold(row: Row[Any]) -> StoredHold:
    return StoredHold(
        hold=hold_of(row),
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
    return None if row is None else stored_hold(row)


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
    return [stored_hold(row) for row in (await session.execute(query)).all()]


async def add_hold(session: AsyncSession, hold: EscrowHold, payment_id: uuid.UUID) -> None:
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
    await session.execute(
        update(escrow_holds).where(escrow_holds.c.id == hold.id).values(**_hold_columns(hold))
    )
