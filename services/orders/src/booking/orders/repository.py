"""The orders schema as the use cases see it: mentors, offerings, orders with their booked
sessions, and the idempotency keys of bookings.

Nothing here commits: every function works in the transaction its caller opened (a use case's
unit of work, or the consumer's for a handler). What runs for every booking (an offering, an
order and its session, an Idempotency-Key) is plain SQL on the driver (`driver_connection`),
one statement per step; the admins' rarer work on mentors and offerings goes through the ORM.
Rows come out as the domain's objects, or as small records where a row keeps more than the
domain (`StoredOrder`); they go back through the `save_*` functions. Storing an order's session
and a mentor's subject is where the database's constraints speak, so those refusals come out as
the domain's errors (`SlotTaken`, `SubjectTaken`).

An order and its session are locked together, the order first, everywhere (`lock_order`, the
sweeper's `claim_unopened`), so that no two transactions wait on each other in opposite orders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import asyncpg
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from booking.contracts import MenteeContact
from booking.orders.domain import (
    BookedSession,
    Escrow,
    EscrowStatus,
    Mentor,
    Money,
    Offering,
    Order,
    OrderStatus,
    PaymentStatus,
    SessionStatus,
    SlotTaken,
    SubjectTaken,
)
from booking.orders.tables import (
    NO_OVERLAP,
    SCHEMA,
    SUBJECT_TAKEN,
    MentorRow,
    OfferingRow,
)
from booking.runtime.db import driver_connection

_Row = TypeVar("_Row")

# --- mentors ------------------------------------------------------------------------------------


async def mentor(session: AsyncSession, mentor_id: UUID, *, lock: bool = False) -> Mentor | None:
    """The mentor, locked until the transaction ends if `lock`; None when there is none."""
    row = await session.get(MentorRow, mentor_id, with_for_update=True if lock else None)
    return None if row is None else _mentor_of(row)


async def add_mentor(session: AsyncSession, new: Mentor) -> None:
    """Store a new mentor. Raises `SubjectTaken` when its subject acts as another already."""
    session.add(
        MentorRow(
            id=new.id,
            name=new.name,
            email=new.email,
            timezone=new.timezone,
            identity_subject=new.identity_subject,
            identity_sequence=new.identity_sequence,
            created_at=new.created_at,
        )
    )
    await _flush_subject(session, new.identity_subject)


async def save_mentor(session: AsyncSession, changed: Mentor) -> None:
    """Write back the mentor's link to its subject (read in this transaction). Raises
    `SubjectTaken` when that subject acts as another mentor already."""
    row = await _loaded(session, MentorRow, changed.id)
    row.identity_subject = changed.identity_subject
    row.identity_sequence = changed.identity_sequence
    await _flush_subject(session, changed.identity_subject)


async def _flush_subject(session: AsyncSession, subject: str | None) -> None:
    # Here the unique constraint says whether the subject is free; the caller's transaction
    # then rolls back with the domain's error.
    try:
        await session.flush()
    except IntegrityError as exc:
        if subject is not None and _violated_constraint(exc) == SUBJECT_TAKEN:
            raise SubjectTaken(subject) from None
        raise


def _mentor_of(row: MentorRow) -> Mentor:
    return Mentor(
        id=row.id,
        name=row.name,
        email=row.email,
        timezone=row.timezone,
        created_at=row.created_at,
        identity_subject=row.identity_subject,
        identity_sequence=row.identity_sequence,
    )


# --- offerings ----------------------------------------------------------------------------------


async def offering(session: AsyncSession, offering_id: UUID) -> Offering | None:
    row = await (await driver_connection(session)).fetchrow(_OFFERING, offering_id)
    if row is None:
        return None
    return Offering(
        id=row["id"],
        mentor_id=row["mentor_id"],
        title=row["title"],
        duration_minutes=row["duration_minutes"],
        price=Money(row["price_amount"], row["price_currency"]),
        created_at=row["created_at"],
    )


_OFFERING = f"""
    SELECT id, mentor_id, title, duration_minutes, price_amount, price_currency, created_at
    FROM "{SCHEMA}".offerings WHERE id = $1
    """


async def offerings_of(session: AsyncSession, mentor_id: UUID) -> list[Offering]:
    """The mentor's offerings, oldest first."""
    rows = await session.scalars(
        select(OfferingRow)
        .where(col(OfferingRow.mentor_id) == mentor_id)
        .order_by(col(OfferingRow.created_at), col(OfferingRow.id))
    )
    return [_offering_of(row) for row in rows]


def add_offering(session: AsyncSession, new: Offering) -> None:
    """Store a new offering (written when the transaction commits)."""
    session.add(
        OfferingRow(
            id=new.id,
            mentor_id=new.mentor_id,
            title=new.title,
            duration_minutes=new.duration_minutes,
            price_amount=new.price.amount,
            price_currency=new.price.currency,
            created_at=new.created_at,
        )
    )


def _offering_of(row: OfferingRow) -> Offering:
    return Offering(
        id=row.id,
        mentor_id=row.mentor_id,
        title=row.title,
        duration_minutes=row.duration_minutes,
        price=Money(row.price_amount, row.price_currency),
        created_at=row.created_at,
    )


# --- orders and their sessions ------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class StoredOrder:
    """An order and its session as stored: the domain's two, and what orders keeps beside them.

    `title` and `mentee_email` are the booking's, as they were; `correlation_id` is the
    booking's, which every later event about the order carries; the payment's status, the fee,
    the escrow's amount and its status are what payments reported. `version` grows by one with
    each change `save_order` writes of what the order view shows.
    """

    order: Order
    booked: BookedSession
    title: str
    mentee_email: str
    correlation_id: str | None
    payment_status: PaymentStatus | None
    platform_fee: int | None
    escrow_amount: int | None
    escrow: Escrow
    version: int
    # What `save_order` compares with: the columns as read (or as added) in this transaction.
    stored_as: tuple[tuple[Any, ...], tuple[Any, ...]] | None = field(default=None, repr=False)


async def add_booking(session: AsyncSession, stored: StoredOrder, mentee: MenteeContact) -> None:
    """Store a new order and its session (at the order's first version), in one statement.
    Raises `SlotTaken` when the session overlaps a live one of its mentor: the exclusion
    constraint holds the slot, with no check before to race."""
    order, booked = stored.order, stored.booked
    try:
        await (await driver_connection(session)).execute(
            _ADD_BOOKING,
            order.id,
            order.mentee_id,
            order.mentor_id,
            order.offering_id,
            stored.title,
            order.amount.amount,
            order.amount.currency,
            order.status.value,
            order.amount_paid,
            mentee.first_name,
            mentee.last_name,
            mentee.email,
            mentee.phone,
            stored.correlation_id,
            order.created_at,
            order.updated_at,
            stored.version,
            booked.id,
            booked.start_at,
            booked.end_at,
            booked.status.value,
        )
    except asyncpg.ExclusionViolationError as exc:
        if exc.constraint_name == NO_OVERLAP:
            raise SlotTaken(booked.start_at.isoformat()) from None
        raise
    stored.stored_as = _columns(stored)


# The session's foreign key is checked at the statement's end, when the order is there.
_ADD_BOOKING = f"""
    WITH added AS (
        INSERT INTO "{SCHEMA}".orders (
            id, mentee_id, mentor_id, offering_id, title, amount, currency, status, amount_paid,
            mentee_first_name, mentee_last_name, mentee_email, mentee_phone, correlation_id,
            created_at, updated_at, version, escrow_sequence)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, 0)
        RETURNING id, mentor_id
    )
    INSERT INTO "{SCHEMA}".booked_sessions (id, order_id, mentor_id, start_at, end_at, status)
    SELECT $18, added.id, added.mentor_id, $19, $20, $21 FROM added
    """

_ORDER_AND_SESSION = f"""
    SELECT o.id, o.mentee_id, o.mentor_id, o.offering_id, o.title, o.amount, o.currency,
           o.status, o.amount_paid, o.payment_ref, o.pay_url, o.payment_status, o.platform_fee,
           o.escrow_amount, o.escrow_status, o.escrow_sequence, o.correlation_id, o.version,
           o.mentee_email, o.created_at, o.updated_at,
           s.id AS session_id, s.start_at, s.end_at, s.status AS session_status, s.meet_link,
           s.calendar_event_id
    FROM "{SCHEMA}".orders AS o JOIN "{SCHEMA}".booked_sessions AS s ON s.order_id = o.id
    """
_FIND_ORDER = f"{_ORDER_AND_SESSION} WHERE o.id = $1"
# Postgres takes the locks in the order of `OF`: the order first, as everywhere else. Both
# rows are locked, even for a change of the order alone: a statement that waited for the lock
# reads again only the rows it locks, so an unlocked session would be the one from before the
# wait, and the order view built from it (OrderChanged) would show a session that no longer is.
_LOCK_ORDER = f"{_FIND_ORDER} FOR UPDATE OF o, s"
_CLAIM_UNOPENED = f"""
    {_ORDER_AND_SESSION}
    WHERE o.status = '{OrderStatus.PENDING.value}' AND o.payment_ref IS NULL
      AND o.amount_paid = 0 AND o.created_at <= $1
    ORDER BY o.created_at LIMIT $2
    FOR UPDATE OF o, s SKIP LOCKED
    """


# Answered by the partial index on pending orders' created_at (ix_orders_pending_created_at).
_OLDEST_PENDING = f"""
    SELECT min(created_at) FROM "{SCHEMA}".orders WHERE status = '{OrderStatus.PENDING.value}'
    """


async def oldest_pending_created_at(session: AsyncSession) -> datetime | None:
    """When the oldest order still pending (no payment opened yet) was booked; None: none."""
    oldest: datetime | None = await (await driver_connection(session)).fetchval(_OLDEST_PENDING)
    return oldest


async def find_order(session: AsyncSession, order_id: UUID) -> StoredOrder | None:
    """The order and its session (created together, never deleted) in one statement, from one
    snapshot; None when there is no such order."""
    row = await (await driver_connection(session)).fetchrow(_FIND_ORDER, order_id)
    return None if row is None else _stored_order(row)


async def lock_order(session: AsyncSession, order_id: UUID) -> StoredOrder | None:
    """The order and its session, locked until the transaction ends, in one round trip; None
    when there is no such order."""
    row = await (await driver_connection(session)).fetchrow(_LOCK_ORDER, order_id)
    return None if row is None else _stored_order(row)


async def claim_unopened(
    session: AsyncSession, booked_before: datetime, limit: int
) -> list[StoredOrder]:
    """Up to `limit` orders, oldest first, booked before `booked_before` and still pending with
    no payment and nothing paid, each locked with its session. Rows another transaction holds
    are skipped (`SKIP LOCKED`): replicas never take the same order, and a handler that holds
    one goes first."""
    rows = await (await driver_connection(session)).fetch(_CLAIM_UNOPENED, booked_before, limit)
    return [_stored_order(row) for row in rows]


async def save_order(session: AsyncSession, stored: StoredOrder) -> bool:
    """Write back what changed of an order and its session read (or added) in this transaction;
    whether any of it shows in the order view.

    One statement, and none when nothing changed; the session's row is written only when it
    changed. A change that shows bumps the order's version (`stored.version` too) in the same
    UPDATE of the order's row.
    """
    assert stored.stored_as is not None, "save_order writes back an order read with this module"
    was_order, was_session = stored.stored_as
    now_order, now_session = _columns(stored)
    if now_order == was_order and now_session == was_session:
        return False
    order, booked = stored.order, stored.booked
    shows = now_order[:_SHOWN] != was_order[:_SHOWN] or now_session != was_session
    if shows:
        stored.version += 1
    arguments = (*now_order, stored.version, order.id)
    driver = await driver_connection(session)
    if now_session == was_session:
        await driver.execute(_SAVE_ORDER, *arguments)
    else:
        await driver.execute(_SAVE_ORDER_AND_SESSION, *arguments, *now_session, booked.id)
    stored.stored_as = (now_order, now_session)
    return shows


# How many of `_columns`'s order columns (the first) show in the order view.
_SHOWN = 8
_SAVE_ORDER = f"""
    UPDATE "{SCHEMA}".orders SET status = $1, amount_paid = $2, payment_ref = $3, pay_url = $4,
        payment_status = $5, platform_fee = $6, escrow_amount = $7, escrow_status = $8,
        updated_at = $9, escrow_sequence = $10, version = $11
    WHERE id = $12
    """
_SAVE_ORDER_AND_SESSION = f"""
    WITH session_saved AS (
        UPDATE "{SCHEMA}".booked_sessions SET status = $13, meet_link = $14,
            calendar_event_id = $15
        WHERE id = $16
    )
    {_SAVE_ORDER}
    """


def _columns(stored: StoredOrder) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The order's columns `save_order` writes (those the view shows first) and its session's."""
    order, booked = stored.order, stored.booked
    return (
        (
            order.status.value,
            order.amount_paid,
            order.payment_ref,
            order.pay_url,
            None if stored.payment_status is None else stored.payment_status.value,
            stored.platform_fee,
            stored.escrow_amount,
            None if stored.escrow.status is None else stored.escrow.status.value,
            order.updated_at,
            stored.escrow.sequence,
        ),
        (booked.status.value, booked.meet_link, booked.calendar_event_id),
    )


def _stored_order(row: asyncpg.Record) -> StoredOrder:
    escrow_status = row["escrow_status"]
    payment_status = row["payment_status"]
    stored = StoredOrder(
        order=Order(
            id=row["id"],
            mentee_id=row["mentee_id"],
            mentor_id=row["mentor_id"],
            offering_id=row["offering_id"],
            amount=Money(row["amount"], row["currency"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            status=OrderStatus(row["status"]),
            amount_paid=row["amount_paid"],
            payment_ref=row["payment_ref"],
            pay_url=row["pay_url"],
        ),
        booked=BookedSession(
            id=row["session_id"],
            order_id=row["id"],
            mentor_id=row["mentor_id"],
            start_at=row["start_at"],
            end_at=row["end_at"],
            status=SessionStatus(row["session_status"]),
            meet_link=row["meet_link"],
            calendar_event_id=row["calendar_event_id"],
        ),
        title=row["title"],
        mentee_email=row["mentee_email"],
        correlation_id=row["correlation_id"],
        payment_status=None if payment_status is None else PaymentStatus(payment_status),
        platform_fee=row["platform_fee"],
        escrow_amount=row["escrow_amount"],
        escrow=Escrow(
            status=None if escrow_status is None else EscrowStatus(escrow_status),
            sequence=row["escrow_sequence"],
        ),
        version=row["version"],
    )
    stored.stored_as = _columns(stored)
    return stored


# --- idempotency keys ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FirstRequest:
    """What the request that claimed an Idempotency-Key first stored under it."""

    fingerprint: str
    response_status: int | None
    response_body: dict[str, Any] | None


async def claim_key(
    session: AsyncSession, mentee_id: str, key: str, fingerprint: str, now: datetime
) -> FirstRequest | None:
    """Claim the mentee's `key` for this request (None), or what its first request stored.

    The insert waits while another transaction holds the key; once that one commits the key is
    taken and its answer readable, once it rolls back the key is ours.
    """
    driver = await driver_connection(session)
    if await driver.fetchval(_CLAIM_KEY, mentee_id, key, fingerprint, now) is not None:
        return None
    first = await driver.fetchrow(_FIRST_REQUEST, mentee_id, key)
    assert first is not None  # the insert found it there
    # JSONB comes decoded: the engine's connections carry SQLAlchemy's JSON codec.
    return FirstRequest(
        first["request_fingerprint"], first["response_status"], first["response_body"]
    )


_KEYS = f'"{SCHEMA}".idempotency_keys'
_CLAIM_KEY = f"""
    INSERT INTO {_KEYS} (mentee_id, key, request_fingerprint, created_at)
    VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING key
    """
_FIRST_REQUEST = f"""
    SELECT request_fingerprint, response_status, response_body FROM {_KEYS}
    WHERE mentee_id = $1 AND key = $2
    """


async def store_answer(
    session: AsyncSession, mentee_id: str, key: str, status: int, body: dict[str, Any]
) -> None:
    """Keep the answer to the request that claimed the mentee's `key`, to answer its repeats."""
    # SQLAlchemy's JSON codec on the engine's connections takes JSON text.
    await (await driver_connection(session)).execute(
        _STORE_ANSWER, mentee_id, key, status, json.dumps(body)
    )


_STORE_ANSWER = f"""
    UPDATE {_KEYS} SET response_status = $3, response_body = $4::jsonb
    WHERE mentee_id = $1 AND key = $2
    """


# --- helpers ------------------------------------------------------------------------------------


async def _loaded(session: AsyncSession, table: type[_Row], key: Any) -> _Row:
    """A row this transaction has read (or claimed) already, so it exists."""
    row = await session.get(table, key)
    assert row is not None, f"no {table.__name__} {key}"
    return row


def _violated_constraint(exc: IntegrityError) -> str | None:
    """The name of the constraint asyncpg reported, through SQLAlchemy's wrapper."""
    for error in (exc.orig, getattr(exc.orig, "__cause__", None)):
        name = getattr(error, "constraint_name", None)
        if name:
            return str(name)
    return None
