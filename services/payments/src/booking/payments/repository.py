"""All of the payments schema's SQL, and the mapping between its rows and the domain: payments,
escrow holds and order endings.

Nothing here commits: every function works in the caller's transaction (the unit of work a
use case opened, or the one a handler was given), so that a use case's statements stay
together. Payments and escrow holds come and go as domain objects; a payment row carries more
than the domain's `Payment` (the booking it pays for, the booking's correlation id), so it
comes as a `StoredPayment`: the payment and its `Booking`. The few reads and claims that need
less come as small records of their own.

The statements run on the session's own asyncpg connection (`driver_connection`: the same
transaction), as SQL text written once below with asyncpg's `$n` placeholders: through
SQLAlchemy's compiling, caching and result processing they cost the service about half of its
CPU per booking. Statuses are written into the text, not passed, so that the partial indexes on
`status` serve every plan of a prepared statement.

Everything that changes what payments knows of one order (its payment opened, its ending, its
escrow moved) first takes the order's lock (`lock_order`), then the rows' locks: one order's
changes are serialised, in one lock order, so whichever comes second sees the other. A read
that must see what the lock's previous holder committed is a statement after `lock_order`'s,
never the same one (a statement reads the database as it was when it began).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

from booking.payments.domain import (
    EscrowHold,
    EscrowStatus,
    FreezeKind,
    Payment,
    PaymentState,
)
from booking.payments.tables import SCHEMA
from booking.runtime.db import driver_connection

# -- the tables, and the columns read and written ------------------------------------------------

_PAYMENTS = f'"{SCHEMA}".payments'
_HOLDS = f'"{SCHEMA}".escrow_holds'
_ENDINGS = f'"{SCHEMA}".order_endings'

_INITIATING = f"'{PaymentState.INITIATING.value}'"
_OPEN = f"'{PaymentState.PENDING.value}', '{PaymentState.UNDERPAID.value}'"
_HELD = f"'{EscrowStatus.HELD.value}'"

# What `_stored_payment` maps.
_PAYMENT = (
    "id",
    "order_id",
    "amount",
    "currency",
    "created_at",
    "updated_at",
    "payment_ref",
    "pay_url",
    "expires_at",
    "status",
    "amount_paid",
    "platform_fee",
    "escrow_amount",
    "paid_at",
    "session_id",
    "mentor_id",
    "session_end_at",
    "title",
    "mentee_first_name",
    "mentee_last_name",
    "mentee_email",
    "mentee_phone",
    "correlation_id",
    "traceparent",
)
# The columns of a payment the domain may change, as `_payment_changes` gives them.
_PAYMENT_CHANGES = (
    "status",
    "payment_ref",
    "pay_url",
    "expires_at",
    "amount_paid",
    "platform_fee",
    "escrow_amount",
    "paid_at",
    "updated_at",
)
# A new payment's row, as `_new_payment` gives it: its id is $1 and its order's $2.
_NEW_PAYMENT = (
    "id",
    "order_id",
    "amount",
    "currency",
    "created_at",
    "session_id",
    "mentor_id",
    "session_end_at",
    "title",
    "mentee_first_name",
    "mentee_last_name",
    "mentee_email",
    "mentee_phone",
    "correlation_id",
    "traceparent",
    *_PAYMENT_CHANGES,
)
# What `_hold_of` maps.
_HOLD = (
    "id",
    "order_id",
    "payment_id",
    "mentor_id",
    "amount",
    "amount_paid",
    "currency",
    "created_at",
    "updated_at",
    "status",
    "sequence",
    "frozen_reason",
    "reason",
    "decided_by",
    "refund_amount",
    "refund_reference",
    "release_due_at",
    "released_at",
    "refunded_at",
)
# The columns of a hold the domain may change, as `_hold_changes` gives them.
_HOLD_CHANGES = (
    "amount",
    "amount_paid",
    "status",
    "sequence",
    "frozen_reason",
    "reason",
    "decided_by",
    "refund_amount",
    "refund_reference",
    "release_due_at",
    "released_at",
    "refunded_at",
    "updated_at",
)
# A new hold's row, as `_new_hold` gives it.
_NEW_HOLD = ("id", "order_id", "payment_id", "mentor_id", "currency", "created_at", *_HOLD_CHANGES)


def _of(alias: str, columns: Iterable[str]) -> str:
    return ", ".join(f"{alias}.{name}" for name in columns)


def _placeholders(first: int, count: int) -> str:
    return ", ".join(f"${n}" for n in range(first, first + count))


def _assignments(columns: tuple[str, ...], first: int) -> str:
    return ", ".join(f"{name} = ${n}" for n, name in enumerate(columns, start=first))


# -- the order's lock ----------------------------------------------------------------------------

_LOCK = "SELECT pg_advisory_xact_lock(hashtext($1))"


async def lock_order(session: AsyncSession, order_id: uuid.UUID) -> None:
    """Hold the order's lock until the transaction ends.

    A transaction-scoped advisory lock, so it covers an order that has no row yet (an ending
    that comes before its BookingRequested). Its key names this schema: advisory locks are the
    database's, and another service locking the same order must not wait on ours.
    """
    await (await driver_connection(session)).execute(_LOCK, f"{SCHEMA}:order:{order_id}")


# -- payments ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Booking:
    """What a payment keeps of the booking it pays for: the session and its mentor (for the
    escrow), what Konnect's page shows and who pays, and the booking's correlation id, which
    every later event about the payment carries, and its trace (while tracing is on), which
    the later work on the payment joins."""

    session_id: uuid.UUID
    mentor_id: uuid.UUID
    session_end_at: datetime
    title: str
    mentee_first_name: str
    mentee_last_name: str
    mentee_email: str
    mentee_phone: str | None
    correlation_id: str
    traceparent: str | None = None


@dataclass(slots=True)
class StoredPayment:
    """A payment and the booking it pays for."""

    payment: Payment
    booking: Booking


@dataclass(frozen=True, slots=True)
class Opening:
    """What storing an order's payment came to: stored, or not because the order had ended
    (`ending`) or had its payment already."""

    stored: bool
    ending: OrderEnding | None


@dataclass(frozen=True, slots=True)
class PaymentOfRef:
    """What the webhook needs to know of the payment with a Konnect ref (and the booking's
    trace, which it joins)."""

    id: uuid.UUID
    order_id: uuid.UUID
    status: PaymentState
    traceparent: str | None = None


@dataclass(frozen=True, slots=True)
class PaymentToCheck:
    """An open payment the sweeper has claimed, to ask Konnect about."""

    id: uuid.UUID
    order_id: uuid.UUID
    payment_ref: str
    currency: str


def _stored_payment(row: asyncpg.Record) -> StoredPayment:
    """The domain's view of a `payments` row (its `_PAYMENT` columns), and its booking."""
    return StoredPayment(
        payment=Payment(
            id=row["id"],
            order_id=row["order_id"],
            amount=row["amount"],
            currency=row["currency"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            payment_ref=row["payment_ref"],
            pay_url=row["pay_url"],
            expires_at=row["expires_at"],
            status=PaymentState(row["status"]),
            amount_paid=row["amount_paid"],
            platform_fee=row["platform_fee"],
            escrow_amount=row["escrow_amount"],
            paid_at=row["paid_at"],
        ),
        booking=Booking(
            session_id=row["session_id"],
            mentor_id=row["mentor_id"],
            session_end_at=row["session_end_at"],
            title=row["title"],
            mentee_first_name=row["mentee_first_name"],
            mentee_last_name=row["mentee_last_name"],
            mentee_email=row["mentee_email"],
            mentee_phone=row["mentee_phone"],
            correlation_id=row["correlation_id"],
            traceparent=row["traceparent"],
        ),
    )


def _payment_changes(payment: Payment) -> tuple[object, ...]:
    """The `_PAYMENT_CHANGES` columns of the payment."""
    return (
        payment.status.value,
        payment.payment_ref,
        payment.pay_url,
        payment.expires_at,
        payment.amount_paid,
        payment.platform_fee,
        payment.escrow_amount,
        payment.paid_at,
        payment.updated_at,
    )


def _new_payment(payment: Payment, booking: Booking) -> tuple[object, ...]:
    """The `_NEW_PAYMENT` columns of a payment just opened."""
    return (
        payment.id,
        payment.order_id,
        payment.amount,
        payment.currency,
        payment.created_at,
        booking.session_id,
        booking.mentor_id,
        booking.session_end_at,
        booking.title,
        booking.mentee_first_name,
        booking.mentee_last_name,
        booking.mentee_email,
        booking.mentee_phone,
        booking.correlation_id,
        booking.traceparent,
        *_payment_changes(payment),
    )


# The ending is read in the statement that inserts: it runs after the order's lock was taken.
_ADD_PAYMENT_UNLESS_ENDED = f"""
    WITH ending AS (SELECT reason, "by", ended_at FROM {_ENDINGS} WHERE order_id = $2),
    stored AS (
        INSERT INTO {_PAYMENTS} ({", ".join(_NEW_PAYMENT)})
        SELECT {_placeholders(1, len(_NEW_PAYMENT))} WHERE NOT EXISTS (SELECT FROM ending)
        ON CONFLICT (order_id) DO NOTHING RETURNING id
    )
    SELECT EXISTS (SELECT FROM stored) AS stored, ending.*
    FROM (SELECT) AS one LEFT JOIN ending ON true
    """


async def add_payment_unless_ended(
    session: AsyncSession, payment: Payment, booking: Booking
) -> Opening:
    """Store a payment just opened, unless its order ended (the ending comes back) or has one
    already; one round trip. Call it under the order's lock, which orders it against the
    ending.

    Exactly one payment per order: the unique order_id decides, not a check before.
    """
    row = await (await driver_connection(session)).fetchrow(
        _ADD_PAYMENT_UNLESS_ENDED, *_new_payment(payment, booking)
    )
    assert row is not None  # one row, whatever was stored
    if row["reason"] is None:
        return Opening(stored=row["stored"], ending=None)
    ending = OrderEnding(
        order_id=payment.order_id, reason=row["reason"], by=row["by"], ended_at=row["ended_at"]
    )
    return Opening(stored=False, ending=ending)


# Every webhook runs it, a flood of forged ones too.
_BY_REF = f"SELECT id, order_id, status, traceparent FROM {_PAYMENTS} WHERE payment_ref = $1"


async def payment_of_ref(session: AsyncSession, payment_ref: str) -> PaymentOfRef | None:
    """The payment with this Konnect ref (unique: one index read), or None when none of ours
    has it."""
    row = await (await driver_connection(session)).fetchrow(_BY_REF, payment_ref)
    if row is None:
        return None
    return PaymentOfRef(
        id=row["id"],
        order_id=row["order_id"],
        status=PaymentState(row["status"]),
        traceparent=row["traceparent"],
    )


_LOCKED = f"SELECT {', '.join(_PAYMENT)} FROM {_PAYMENTS} WHERE id = $1 FOR UPDATE"
_LOCKED_OF_ORDER = f"SELECT {', '.join(_PAYMENT)} FROM {_PAYMENTS} WHERE order_id = $1 FOR UPDATE"
# An ending is written only under the order's lock, which the caller holds: it cannot change
# while the payment's row lock is waited for.
_LOCKED_AND_ENDING = f"""
    SELECT {_of("p", _PAYMENT)}, e.reason AS ending_reason, e."by" AS ending_by, e.ended_at
    FROM {_PAYMENTS} AS p LEFT JOIN {_ENDINGS} AS e ON e.order_id = p.order_id
    WHERE p.id = $1 FOR UPDATE OF p
    """


async def locked_payment(session: AsyncSession, payment_id: uuid.UUID) -> StoredPayment:
    """The payment, locked for update until the transaction ends."""
    row = await (await driver_connection(session)).fetchrow(_LOCKED, payment_id)
    assert row is not None, f"no payment {payment_id}"
    return _stored_payment(row)


async def locked_payment_of_order(
    session: AsyncSession, order_id: uuid.UUID
) -> StoredPayment | None:
    """The order's payment, locked for update, or None when none was opened for it."""
    row = await (await driver_connection(session)).fetchrow(_LOCKED_OF_ORDER, order_id)
    return None if row is None else _stored_payment(row)


async def locked_payment_and_ending(
    session: AsyncSession, payment_id: uuid.UUID
) -> tuple[StoredPayment, OrderEnding | None]:
    """The payment, locked for update, and how its order ended without it (None while it has
    not), in one round trip. Call it under the order's lock."""
    row = await (await driver_connection(session)).fetchrow(_LOCKED_AND_ENDING, payment_id)
    assert row is not None, f"no payment {payment_id}"
    stored = _stored_payment(row)
    if row["ending_reason"] is None:
        return stored, None
    ending = OrderEnding(
        order_id=stored.payment.order_id,
        reason=row["ending_reason"],
        by=row["ending_by"],
        ended_at=row["ended_at"],
    )
    return stored, ending


_AFTER_CHANGES = len(_PAYMENT_CHANGES) + 2  # the first placeholder after them ($1 is the id)
_SAVE_PAYMENT = f"""
    UPDATE {_PAYMENTS} SET {_assignments(_PAYMENT_CHANGES, 2)},
        claimed_until = CASE WHEN ${_AFTER_CHANGES}::boolean THEN NULL ELSE claimed_until END,
        last_checked_at = COALESCE(${_AFTER_CHANGES + 1}, last_checked_at)
    WHERE id = $1
    """


async def save_payment(
    session: AsyncSession,
    payment: Payment,
    *,
    lease_ended: bool = False,
    checked_at: datetime | None = None,
) -> None:
    """Store what the domain changed of a payment; `lease_ended` when the replica that
    initiated it is done with it, `checked_at` when Konnect was asked about it."""
    await (await driver_connection(session)).execute(
        _SAVE_PAYMENT, payment.id, *_payment_changes(payment), lease_ended, checked_at
    )


_MARK_CHECKED = f"UPDATE {_PAYMENTS} SET last_checked_at = $2 WHERE id = $1"


async def mark_checked(session: AsyncSession, payment_id: uuid.UUID, now: datetime) -> None:
    """Konnect was asked about the payment at `now`, and said nothing new."""
    await (await driver_connection(session)).execute(_MARK_CHECKED, payment_id, now)


_CLAIM_INITIATION = f"""
    UPDATE {_PAYMENTS} SET claimed_until = $3
    WHERE id = $1 AND status = {_INITIATING} AND (claimed_until IS NULL OR claimed_until < $2)
    RETURNING {", ".join(_PAYMENT)}
    """


async def claim_initiation(
    session: AsyncSession, payment_id: uuid.UUID, now: datetime, until: datetime
) -> StoredPayment | None:
    """Take the lease of initiating a payment until `until`, unless it is no longer
    `initiating` or another replica's lease still runs; the payment, or None."""
    row = await (await driver_connection(session)).fetchrow(
        _CLAIM_INITIATION, payment_id, now, until
    )
    return None if row is None else _stored_payment(row)


_CLAIM_LAPSED = f"""
    UPDATE {_PAYMENTS} SET claimed_until = $3
    WHERE id IN (
        SELECT id FROM {_PAYMENTS}
        WHERE status = {_INITIATING}
          AND ((claimed_until IS NULL AND created_at <= $2) OR claimed_until < $1)
        ORDER BY created_at LIMIT $4 FOR UPDATE SKIP LOCKED
    )
    RETURNING {", ".join(_PAYMENT)}
    """


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
    rows = await (await driver_connection(session)).fetch(
        _CLAIM_LAPSED, now, created_before, until, limit
    )
    return [_stored_payment(row) for row in rows]


_CLAIM_TO_CHECK = f"""
    UPDATE {_PAYMENTS} SET last_checked_at = $1
    WHERE id IN (
        SELECT id FROM {_PAYMENTS}
        WHERE status IN ({_OPEN}) AND created_at <= $2
          AND (last_checked_at IS NULL OR last_checked_at <= $3)
        ORDER BY last_checked_at NULLS FIRST LIMIT $4 FOR UPDATE SKIP LOCKED
    )
    RETURNING id, order_id, payment_ref, currency
    """


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
    rows = await (await driver_connection(session)).fetch(
        _CLAIM_TO_CHECK, now, created_before, checked_before, limit
    )
    return [
        PaymentToCheck(
            id=row["id"],
            order_id=row["order_id"],
            payment_ref=row["payment_ref"],
            currency=row["currency"],
        )
        for row in rows
    ]


# -- order endings -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OrderEnding:
    """An order that ended without its payment."""

    order_id: uuid.UUID
    reason: str
    by: str | None
    ended_at: datetime


_RECORD_ENDING = f"""
    INSERT INTO {_ENDINGS} (order_id, reason, "by", ended_at) VALUES ($1, $2, $3, $4)
    ON CONFLICT (order_id) DO NOTHING RETURNING order_id
    """


async def record_ending(session: AsyncSession, ending: OrderEnding) -> bool:
    """Record that the order ended; False when it was already (the first ending stays)."""
    inserted = await (await driver_connection(session)).fetchval(
        _RECORD_ENDING, ending.order_id, ending.reason, ending.by, ending.ended_at
    )
    return inserted is not None


# -- escrow holds --------------------------------------------------------------------------------


@dataclass(slots=True)
class StoredHold:
    """A hold and what its events and audit need of its payment."""

    hold: EscrowHold
    payment_id: uuid.UUID
    session_id: uuid.UUID
    correlation_id: str


def _stored_hold(row: asyncpg.Record) -> StoredHold:
    """The domain's view of an `escrow_holds` row (its `_HOLD` columns), and what it keeps of
    its payment."""
    frozen_reason = row["frozen_reason"]
    hold = EscrowHold(
        id=row["id"],
        order_id=row["order_id"],
        mentor_id=row["mentor_id"],
        amount=row["amount"],
        amount_paid=row["amount_paid"],
        currency=row["currency"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        status=EscrowStatus(row["status"]),
        sequence=row["sequence"],
        frozen_reason=None if frozen_reason is None else FreezeKind(frozen_reason),
        reason=row["reason"],
        decided_by=row["decided_by"],
        refund_amount=row["refund_amount"],
        refund_reference=row["refund_reference"],
        release_due_at=row["release_due_at"],
        released_at=row["released_at"],
        refunded_at=row["refunded_at"],
    )
    return StoredHold(
        hold=hold,
        payment_id=row["payment_id"],
        session_id=row["session_id"],
        correlation_id=row["correlation_id"],
    )


def _hold_changes(hold: EscrowHold) -> tuple[object, ...]:
    """The `_HOLD_CHANGES` columns of the hold."""
    return (
        hold.amount,
        hold.amount_paid,
        hold.status.value,
        hold.sequence,
        None if hold.frozen_reason is None else hold.frozen_reason.value,
        hold.reason,
        hold.decided_by,
        hold.refund_amount,
        hold.refund_reference,
        hold.release_due_at,
        hold.released_at,
        hold.refunded_at,
        hold.updated_at,
    )


# A hold and its payment's session and correlation id, the hold's row locked (`FOR UPDATE OF
# h`, appended) or not.
_HOLDS_WITH_PAYMENT = f"""
    SELECT {_of("h", _HOLD)}, p.session_id, p.correlation_id
    FROM {_HOLDS} AS h JOIN {_PAYMENTS} AS p ON p.id = h.payment_id
    """
_HOLD_OF_ORDER = f"{_HOLDS_WITH_PAYMENT} WHERE h.order_id = $1"
_LOCKED_HOLD_OF_ORDER = f"{_HOLD_OF_ORDER} FOR UPDATE OF h"
_HOLDS_DUE = f"""
    {_HOLDS_WITH_PAYMENT}
    WHERE h.status = {_HELD} AND h.release_due_at <= $1
    ORDER BY h.release_due_at LIMIT $2 FOR UPDATE OF h SKIP LOCKED
    """


async def hold_of_order(
    session: AsyncSession, order_id: uuid.UUID, *, lock: bool = True
) -> StoredHold | None:
    """The order's hold (locked for update unless `lock` is False), or None if it has none."""
    query = _LOCKED_HOLD_OF_ORDER if lock else _HOLD_OF_ORDER
    row = await (await driver_connection(session)).fetchrow(query, order_id)
    return None if row is None else _stored_hold(row)


async def holds_due(session: AsyncSession, now: datetime, limit: int) -> list[StoredHold]:
    """Held holds whose release is due, locked; those another replica holds are skipped."""
    rows = await (await driver_connection(session)).fetch(_HOLDS_DUE, now, limit)
    return [_stored_hold(row) for row in rows]


_ADD_HOLD = f"""
    INSERT INTO {_HOLDS} ({", ".join(_NEW_HOLD)})
    VALUES ({_placeholders(1, len(_NEW_HOLD))})
    """


async def add_hold(session: AsyncSession, hold: EscrowHold, payment_id: uuid.UUID) -> None:
    """Store a hold just made for the payment's money."""
    await (await driver_connection(session)).execute(
        _ADD_HOLD,
        hold.id,
        hold.order_id,
        payment_id,
        hold.mentor_id,
        hold.currency,
        hold.created_at,
        *_hold_changes(hold),
    )


_SAVE_HOLD = f"UPDATE {_HOLDS} SET {_assignments(_HOLD_CHANGES, 2)} WHERE id = $1"


async def save_hold(session: AsyncSession, hold: EscrowHold) -> None:
    """Store what the domain changed of a hold."""
    await (await driver_connection(session)).execute(_SAVE_HOLD, hold.id, *_hold_changes(hold))
