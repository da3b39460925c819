"""The orders service's HTTP routes: mentors, offerings, bookings and orders (DESIGN section 5).

The gateway forwards the caller's Authorization header; every route verifies the token and the
role again, so the service reached directly is no more open than through the gateway. Bodies are
the public contract's (`booking.contracts.http`); errors are problem+json.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from booking.contracts import BookingRequested, MenteeContact, MentorRegistered, http
from booking.contracts import Offering as OfferingSnapshot
from booking.orders.domain import BookedSession, InvalidBooking, Money, Order, plan_session
from booking.orders.tables import (
    NO_OVERLAP,
    BookedSessionRow,
    IdempotencyKeyRow,
    MentorRow,
    OfferingRow,
    OrderRow,
)
from booking.runtime.auth import Identity, Role, authenticated, require_roles
from booking.runtime.db import Database, database
from booking.runtime.outbox import Outbox

log = logging.getLogger(__name__)

router = APIRouter()


async def outbox(request: Request) -> Outbox:
    box = request.app.state.runtime.outbox
    assert box is not None
    return box


async def mentor_himself_or_admin(
    mentor_id: UUID, identity: Identity = Depends(require_roles(Role.ADMIN, Role.MENTOR))
) -> Identity:
    """An admin, or the mentor whose id is in the path (a mentor's token has it as `sub`)."""
    if identity.role is Role.MENTOR and identity.sub != str(mentor_id):
        raise HTTPException(403, "a mentor may add offerings only to their own profile")
    return identity


# --- mentors and offerings ----------------------------------------------------------------------


@router.post("/api/mentors", status_code=201, response_model=http.Mentor)
async def register_mentor(
    body: http.MentorCreate,
    _: Identity = Depends(require_roles(Role.ADMIN)),
    db: Database = Depends(database),
    events: Outbox = Depends(outbox),
) -> http.Mentor:
    mentor = MentorRow(
        id=uuid4(),
        name=body.name,
        email=body.email,
        timezone=body.timezone,
        created_at=datetime.now(UTC),
    )
    async with db.transaction() as session:
        session.add(mentor)
        await events.record(
            session,
            MentorRegistered(
                mentor_id=mentor.id, name=mentor.name, email=mentor.email, timezone=mentor.timezone
            ),
        )
    return _mentor_view(mentor)


@router.get("/api/mentors/{mentor_id}", response_model=http.Mentor)
async def get_mentor(
    mentor_id: UUID,
    _: Identity = Depends(authenticated),
    db: Database = Depends(database),
) -> http.Mentor:
    async with db.transaction() as session:
        mentor = await _mentor_or_404(session, mentor_id)
    return _mentor_view(mentor)


@router.post("/api/mentors/{mentor_id}/offerings", status_code=201, response_model=http.Offering)
async def add_offering(
    mentor_id: UUID,
    body: http.OfferingCreate,
    _: Identity = Depends(mentor_himself_or_admin),
    db: Database = Depends(database),
) -> http.Offering:
    async with db.transaction() as session:
        await _mentor_or_404(session, mentor_id)
        offering = OfferingRow(
            id=uuid4(),
            mentor_id=mentor_id,
            title=body.title,
            duration_minutes=body.duration_minutes,
            price_amount=body.price.amount,
            price_currency=body.price.currency,
            created_at=datetime.now(UTC),
        )
        session.add(offering)
    return _offering_view(offering)


@router.get("/api/mentors/{mentor_id}/offerings", response_model=list[http.Offering])
async def list_offerings(
    mentor_id: UUID,
    _: Identity = Depends(authenticated),
    db: Database = Depends(database),
) -> list[http.Offering]:
    async with db.transaction() as session:
        await _mentor_or_404(session, mentor_id)
        rows = await session.scalars(
            select(OfferingRow)
            .where(OfferingRow.mentor_id == mentor_id)
            .order_by(OfferingRow.created_at, OfferingRow.id)
        )
        return [_offering_view(row) for row in rows]


async def _mentor_or_404(session: AsyncSession, mentor_id: UUID) -> MentorRow:
    mentor = await session.get(MentorRow, mentor_id)
    if mentor is None:
        raise HTTPException(404, f"there is no mentor {mentor_id}")
    return mentor


def _mentor_view(mentor: MentorRow) -> http.Mentor:
    return http.Mentor(id=mentor.id, name=mentor.name, email=mentor.email, timezone=mentor.timezone)


def _offering_view(offering: OfferingRow) -> http.Offering:
    return http.Offering(
        id=offering.id,
        mentor_id=offering.mentor_id,
        title=offering.title,
        duration_minutes=offering.duration_minutes,
        price=http.Money(amount=offering.price_amount, currency=offering.price_currency),
    )


# --- bookings -----------------------------------------------------------------------------------


@router.post("/api/bookings", status_code=202, response_model=http.BookingAccepted)
async def book_session(
    body: http.BookingCreate,
    identity: Identity = Depends(require_roles(Role.MENTEE)),
    idempotency_key: str | None = Header(
        None, alias="Idempotency-Key", min_length=1, max_length=200
    ),
    db: Database = Depends(database),
    events: Outbox = Depends(outbox),
) -> Any:
    """The Order, its BookedSession and BookingRequested, in one transaction.

    The slot is the exclusion constraint's to guard: the insert either holds it or fails with
    409, with no check before it to race. With an Idempotency-Key, the key is claimed first in
    the same transaction, so a second request with that key waits for the first to end and then
    answers what it answered; a booking that fails leaves no key behind.
    """
    now = datetime.now(UTC)
    fingerprint = _fingerprint(body)
    try:
        async with db.transaction() as session:
            if idempotency_key is not None:
                first = await _claim_key(session, identity.sub, idempotency_key, fingerprint, now)
                if first is not None:
                    return first
            accepted = await _book(session, events, body, identity.sub, now)
            if idempotency_key is not None:
                await session.execute(
                    update(IdempotencyKeyRow)
                    .where(
                        IdempotencyKeyRow.mentee_id == identity.sub,
                        IdempotencyKeyRow.key == idempotency_key,
                    )
                    .values(response_status=202, response_body=accepted.model_dump(mode="json"))
                )
    except IntegrityError as exc:
        if _violated_constraint(exc) == NO_OVERLAP:
            raise HTTPException(
                409,
                f"the slot is taken: the mentor already has a session overlapping "
                f"{body.start_at.astimezone(UTC).isoformat()}; choose another start",
            ) from None
        raise
    return accepted


async def _book(
    session: AsyncSession,
    events: Outbox,
    body: http.BookingCreate,
    mentee_id: str,
    now: datetime,
) -> http.BookingAccepted:
    offering = await session.get(OfferingRow, body.offering_id)
    if offering is None:
        raise HTTPException(404, f"there is no offering {body.offering_id}")
    try:
        end_at = plan_session(offering.duration_minutes, body.start_at, now)
    except InvalidBooking as exc:
        raise HTTPException(422, str(exc)) from None
    order = Order(
        id=uuid4(),
        mentee_id=mentee_id,
        mentor_id=offering.mentor_id,
        offering_id=offering.id,
        amount=Money(offering.price_amount, offering.price_currency),
        created_at=now,
        updated_at=now,
    )
    booked = BookedSession(
        id=uuid4(),
        order_id=order.id,
        mentor_id=order.mentor_id,
        start_at=body.start_at.astimezone(UTC),
        end_at=end_at.astimezone(UTC),
    )
    mentee = body.mentee
    session.add(
        OrderRow(
            id=order.id,
            mentee_id=mentee_id,
            mentor_id=order.mentor_id,
            offering_id=order.offering_id,
            title=offering.title,
            amount=order.amount.amount,
            currency=order.amount.currency,
            status=order.status.value,
            amount_paid=order.amount_paid,
            mentee_first_name=mentee.first_name,
            mentee_last_name=mentee.last_name,
            mentee_email=mentee.email,
            mentee_phone=mentee.phone,
            created_at=now,
            updated_at=now,
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
    await session.flush()  # here the exclusion constraint says whether the slot is free
    await events.record(
        session,
        BookingRequested(
            order_id=order.id,
            session_id=booked.id,
            mentor_id=order.mentor_id,
            offering=OfferingSnapshot(
                offering_id=offering.id,
                title=offering.title,
                duration_minutes=offering.duration_minutes,
            ),
            amount=order.amount.amount,
            currency=order.amount.currency,
            mentee=MenteeContact(
                first_name=mentee.first_name,
                last_name=mentee.last_name,
                email=mentee.email,
                phone=mentee.phone,
            ),
            start_at=booked.start_at,
            end_at=booked.end_at,
        ),
    )
    return http.BookingAccepted(order_id=order.id, session_id=booked.id, status=order.status.value)


async def _claim_key(
    session: AsyncSession, mentee_id: str, key: str, fingerprint: str, now: datetime
) -> JSONResponse | None:
    """Claim `key` for this request (None), or the first answer given under it.

    The insert waits while another transaction holds the key; once that one commits the key is
    taken and its answer readable, once it rolls back the key is ours.
    """
    claimed = await session.execute(
        insert(IdempotencyKeyRow)
        .values(mentee_id=mentee_id, key=key, request_fingerprint=fingerprint, created_at=now)
        .on_conflict_do_nothing()
        .returning(IdempotencyKeyRow.key)
    )
    if claimed.first() is not None:
        return None
    first = await session.get(IdempotencyKeyRow, (mentee_id, key))
    assert first is not None  # committed by the request that claimed it
    if first.request_fingerprint != fingerprint:
        raise HTTPException(
            422,
            "this Idempotency-Key was already used with a different request body; "
            "use a new key for a new booking",
        )
    if first.response_status is None or first.response_body is None:
        # Not written by this code (a claim always stores its answer in the same transaction).
        raise HTTPException(409, "the request first sent with this Idempotency-Key has no answer")
    return JSONResponse(
        first.response_body,
        status_code=first.response_status,
        headers={"Idempotent-Replayed": "true"},
    )


def _fingerprint(body: http.BookingCreate) -> str:
    """What makes two requests "the same": the parsed body, with the start as a UTC instant."""
    canonical = body.model_dump(mode="json")
    canonical["start_at"] = body.start_at.astimezone(UTC).isoformat()
    encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()


def _violated_constraint(exc: IntegrityError) -> str | None:
    """The name of the constraint asyncpg reported, through SQLAlchemy's wrapper."""
    for error in (exc.orig, getattr(exc.orig, "__cause__", None)):
        name = getattr(error, "constraint_name", None)
        if name:
            return name
    return None


# --- orders -------------------------------------------------------------------------------------


@router.get("/api/orders/{order_id}", response_model=http.Order)
async def get_order(
    order_id: UUID,
    identity: Identity = Depends(require_roles(Role.MENTEE, Role.ADMIN)),
    db: Database = Depends(database),
) -> http.Order:
    # One statement, no transaction: the order and its session (created together, never
    # deleted) from the same snapshot, in one round trip. Clients poll this route.
    async with db.single_statement() as session:
        found = (
            await session.execute(
                select(OrderRow, BookedSessionRow)
                .join(BookedSessionRow, BookedSessionRow.order_id == OrderRow.id)
                .where(OrderRow.id == order_id)
            )
        ).one_or_none()
    # Another mentee's order is answered like a missing one: its existence is not theirs.
    if found is None or (not identity.is_admin and found[0].mentee_id != identity.sub):
        raise HTTPException(404, f"there is no order {order_id}")
    order, booked = found
    return _order_view(order, booked)


def _order_view(order: OrderRow, booked: BookedSessionRow) -> http.Order:
    def money(amount: int) -> http.Money:
        return http.Money(amount=amount, currency=order.currency)

    payment = None
    if order.payment_status is not None:
        payment = http.PaymentView(
            ref=order.payment_ref, pay_url=order.pay_url, status=order.payment_status
        )
    escrow = None
    if order.platform_fee is not None and order.escrow_amount is not None:
        escrow = http.EscrowView(
            platform_fee=money(order.platform_fee), escrow_amount=money(order.escrow_amount)
        )
    return http.Order(
        id=order.id,
        status=order.status,
        amount=money(order.amount),
        amount_paid=money(order.amount_paid),
        payment=payment,
        session=http.SessionView(
            id=booked.id,
            status=booked.status,
            start_at=booked.start_at,
            end_at=booked.end_at,
            meet_link=booked.meet_link,
            calendar_event_id=booked.calendar_event_id,
        ),
        escrow=escrow,
    )
