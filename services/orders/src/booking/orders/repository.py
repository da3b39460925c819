"""The orders schema as the use cases see it: mentors, offerings, orders with their booked
sessions, and the idempotency keys of bookings.

Nothing here commits: every function works in the transaction its caller opened (a use case's
unit of work, or the consumer's for a handler). Rows come out as the domain's objects, or as
small records where a row keeps more than the domain (`StoredOrder`); they go back through the
`save_*` functions. Storing an order's session and a mentor's subject is where the database's
constraints speak, so those refusals come out as the domain's errors (`SlotTaken`,
`SubjectTaken`).

An order and its session are locked together, the order first, everywhere (`lock_order`, the
sweeper's `claim_unopened`), so that no two transactions wait on each other in opposite orders.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
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
    SUBJECT_TAKEN,
    BookedSessionRow,
    IdempotencyKeyRow,
    MentorRow,
    OfferingRow,
    OrderRow,
)

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
    row = await session.get(OfferingRow, offering_id)
    return None if row is None else _offering_of(row)


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


async def add_booking(session: AsyncSession, stored: StoredOrder, mentee: MenteeContact) -> None:
    """Store a new order and its session (at the order's first version). Raises `SlotTaken`
    when the session overlaps a live one of its mentor: the exclusion constraint holds the
    slot, with no check before to race."""
    order, booked = stored.order, stored.booked
    session.add(
        OrderRow(
            id=order.id,
            mentee_id=order.mentee_id,
            mentor_id=order.mentor_id,
            offering_id=order.offering_id,
            title=stored.title,
            amount=order.amount.amount,
            currency=order.amount.currency,
            status=order.status.value,
            amount_paid=order.amount_paid,
            mentee_first_name=mentee.first_name,
            mentee_last_name=mentee.last_name,
            mentee_email=mentee.email,
            mentee_phone=mentee.phone,
            correlation_id=stored.correlation_id,
            created_at=order.created_at,
            updated_at=order.updated_at,
            version=stored.version,
        )
    )
    await session.flush()  # the order before its session (the session's foreign key)
    session.add(
        BookedSessionRow(
            id=booked.id,
            order_id=booked.order_id,
            mentor_id=booked.mentor_id,
            start_at=booked.start_at,
            end_at=booked.end_at,
            status=booked.status.value,
        )
    )
    try:
        await session.flush()  # here the exclusion constraint says whether the slot is free
    except IntegrityError as exc:
        if _violated_constraint(exc) == NO_OVERLAP:
            raise SlotTaken(booked.start_at.isoformat()) from None
        raise


def _order_and_session() -> Any:
    return select(OrderRow, BookedSessionRow).join(
        BookedSessionRow,
        col(BookedSessionRow.order_id) == col(OrderRow.id),
    )


async def find_order(session: AsyncSession, order_id: UUID) -> StoredOrder | None:
    """The order and its session (created together, never deleted) in one statement, from one
    snapshot; None when there is no such order."""
    found = (
        await session.execute(_order_and_session().where(OrderRow.id == order_id))
    ).one_or_none()
    return None if found is None else _stored_order(*found)


async def lock_order(
    session: AsyncSession, order_id: UUID, *, with_session: bool = True
) -> StoredOrder | None:
    """The order and its session, locked until the transaction ends, in one round trip; None
    when there is no such order. Postgres takes the locks in the order of `OF`: the order first,
    as everywhere else. Without `with_session` the session is read but not locked (payments'
    escrow events never change it)."""
    locked = [OrderRow, BookedSessionRow] if with_session else [OrderRow]
    found = (
        await session.execute(
            _order_and_session().where(OrderRow.id == order_id).with_for_update(of=locked)
        )
    ).one_or_none()
    return None if found is None else _stored_order(*found)


async def claim_unopened(
    session: AsyncSession, booked_before: datetime, limit: int
) -> list[StoredOrder]:
    """Up to `limit` orders, oldest first, booked before `booked_before` and still pending with
    no payment and nothing paid, each locked with its session. Rows another transaction holds
    are skipped (`SKIP LOCKED`): replicas never take the same order, and a handler that holds
    one goes first."""
    due = (
        _order_and_session()
        .where(
            OrderRow.status == OrderStatus.PENDING.value,
            col(OrderRow.payment_ref).is_(None),
            OrderRow.amount_paid == 0,
            OrderRow.created_at <= booked_before,
        )
        .order_by(OrderRow.created_at)
        .limit(limit)
        .with_for_update(of=[OrderRow, BookedSessionRow], skip_locked=True)
    )
    return [_stored_order(row, booked_row) for row, booked_row in await session.execute(due)]


async def save_order(session: AsyncSession, stored: StoredOrder) -> bool:
    """Write back what may have changed of an order and its session read in this transaction;
    whether any of it shows in the order view.

    The rows are the ones this session read (no round trip to find them again), and only the
    columns that changed are written, when the transaction flushes. A change that shows bumps
    the order's version (`stored.version` too) in the same UPDATE of the order's row.
    """
    row = await _loaded(session, OrderRow, stored.order.id)
    booked_row = await _loaded(session, BookedSessionRow, stored.booked.id)
    order, booked = stored.order, stored.booked
    shown = {
        "status": order.status.value,
        "amount_paid": order.amount_paid,
        "payment_ref": order.payment_ref,
        "pay_url": order.pay_url,
        "payment_status": None if stored.payment_status is None else stored.payment_status.value,
        "platform_fee": stored.platform_fee,
        "escrow_amount": stored.escrow_amount,
        "escrow_status": None if stored.escrow.status is None else stored.escrow.status.value,
    }
    session_shown = {
        "status": booked.status.value,
        "meet_link": booked.meet_link,
        "calendar_event_id": booked.calendar_event_id,
    }
    changed = _differs(row, shown) or _differs(booked_row, session_shown)
    for name, value in shown.items():
        setattr(row, name, value)
    row.updated_at = order.updated_at
    row.escrow_sequence = stored.escrow.sequence
    for name, value in session_shown.items():
        setattr(booked_row, name, value)
    if changed:
        stored.version += 1
        row.version = stored.version
    return changed


def _differs(row: Any, values: dict[str, Any]) -> bool:
    return any(getattr(row, name) != value for name, value in values.items())


def _stored_order(row: OrderRow, booked_row: BookedSessionRow) -> StoredOrder:
    return StoredOrder(
        order=Order(
            id=row.id,
            mentee_id=row.mentee_id,
            mentor_id=row.mentor_id,
            offering_id=row.offering_id,
            amount=Money(row.amount, row.currency),
            created_at=row.created_at,
            updated_at=row.updated_at,
            status=OrderStatus(row.status),
            amount_paid=row.amount_paid,
            payment_ref=row.payment_ref,
            pay_url=row.pay_url,
        ),
        booked=BookedSession(
            id=booked_row.id,
            order_id=booked_row.order_id,
            mentor_id=booked_row.mentor_id,
            start_at=booked_row.start_at,
            end_at=booked_row.end_at,
            status=SessionStatus(booked_row.status),
            meet_link=booked_row.meet_link,
            calendar_event_id=booked_row.calendar_event_id,
        ),
        title=row.title,
        mentee_email=row.mentee_email,
        correlation_id=row.correlation_id,
        payment_status=None if row.payment_status is None else PaymentStatus(row.payment_status),
        platform_fee=row.platform_fee,
        escrow_amount=row.escrow_amount,
        escrow=_escrow_of(row),
        version=row.version,
    )


def _escrow_of(row: OrderRow) -> Escrow:
    status = None if row.escrow_status is None else EscrowStatus(row.escrow_status)
    return Escrow(status=status, sequence=row.escrow_sequence)


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
    claimed = await session.execute(
        insert(IdempotencyKeyRow)
        .values(mentee_id=mentee_id, key=key, request_fingerprint=fingerprint, created_at=now)
        .on_conflict_do_nothing()
        .returning(col(IdempotencyKeyRow.key))
    )
    if claimed.first() is not None:
        return None
    first = await _loaded(session, IdempotencyKeyRow, (mentee_id, key))
    return FirstRequest(first.request_fingerprint, first.response_status, first.response_body)


async def store_answer(
    session: AsyncSession, mentee_id: str, key: str, status: int, body: dict[str, Any]
) -> None:
    """Keep the answer to the request that claimed the mentee's `key`, to answer its repeats."""
    await session.execute(
        update(IdempotencyKeyRow)
        .where(
            col(IdempotencyKeyRow.mentee_id) == mentee_id,
            col(IdempotencyKeyRow.key) == key,
        )
        .values(response_status=status, response_body=body)
    )


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
