"""The orders service's HTTP routes: mentors, offerings, bookings, orders, and an admin's cancel
and link of a mentor to its identity-provider subject.

The gateway forwards the caller's Authorization header; every route verifies the token and the
role again, so the service reached directly is no more open than through the gateway. Bodies are
the public contract's (`booking.contracts.http`); errors are problem+json. The use cases behind
bookings and orders are `service.OrderService`'s, those behind mentors `service.MentorService`'s:
a route parses, calls one, and shapes. Who may act as a mentor is `acts_as_mentor`'s to say: an
admin, or a mentor token whose `sub` is the mentor's id or its linked identity-provider subject.
"""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from booking.contracts import http
from booking.orders.domain import (
    InvalidBooking,
    InvalidOffering,
    Mentor,
    Offering,
    SlotTaken,
    SubjectTaken,
)
from booking.orders.service import (
    FirstAnswer,
    IdempotencyKeyReused,
    IdempotencyKeyUnanswered,
    MentorService,
    NoSuchMentor,
    NoSuchOffering,
    NoSuchOrder,
    NotTheMentor,
    OrderService,
    order_view,
)
from booking.runtime.auth import (
    Identity,
    OrderLink,
    Role,
    acts_as_mentor,
    authenticated,
    order_reader,
    require_roles,
)
from booking.runtime.clock import utcnow
from booking.runtime.domain import IllegalTransition

log = logging.getLogger(__name__)

router = APIRouter()


async def orders_service(request: Request) -> OrderService:
    return request.app.state.orders


async def mentors_service(request: Request) -> MentorService:
    return request.app.state.mentors


def invalid(field: str, message: str) -> RequestValidationError:
    """A rule of the service broken by one field of the body: answered 422 like the contract's
    own checks (problem+json naming the field), so a caller reads one shape of refusal."""
    return RequestValidationError(
        [{"loc": ("body", *field.split(".")), "msg": message, "type": "value_error"}]
    )


# --- mentors and offerings ----------------------------------------------------------------------


@router.post("/api/mentors", status_code=201, response_model=http.Mentor)
async def register_mentor(
    body: http.MentorCreate,
    _: Identity = Depends(require_roles(Role.ADMIN)),
    mentors: MentorService = Depends(mentors_service),
) -> http.Mentor:
    """A mentor, and MentorRegistered; 409 when its identity subject acts as another already."""
    try:
        mentor = await mentors.register(body, now=utcnow())
    except SubjectTaken:
        raise _subject_taken() from None
    return _mentor_view(mentor)


@router.get("/api/mentors/{mentor_id}", response_model=http.Mentor)
async def get_mentor(
    mentor_id: UUID,
    identity: Identity = Depends(authenticated),
    mentors: MentorService = Depends(mentors_service),
) -> http.Mentor:
    try:
        mentor = await mentors.get(mentor_id)
    except NoSuchMentor:
        raise _no_such_mentor(mentor_id) from None
    view = _mentor_view(mentor)
    # Who a mentor is at the identity provider is the admins' and the mentor's own business.
    if not acts_as_mentor(identity, mentor.id, mentor.identity_subject):
        view.identity_subject = None
    return view


@router.post("/api/mentors/{mentor_id}/offerings", status_code=201, response_model=http.Offering)
async def add_offering(
    mentor_id: UUID,
    body: http.OfferingCreate,
    identity: Identity = Depends(require_roles(Role.ADMIN, Role.MENTOR)),
    mentors: MentorService = Depends(mentors_service),
) -> http.Offering:
    try:
        offering = await mentors.add_offering(mentor_id, body, by=identity, now=utcnow())
    except InvalidOffering as exc:
        raise invalid(exc.field, str(exc)) from None
    except NotTheMentor:
        raise HTTPException(403, "a mentor may add offerings only to their own profile") from None
    except NoSuchMentor:
        raise _no_such_mentor(mentor_id) from None
    return _offering_view(offering)


@router.get("/api/mentors/{mentor_id}/offerings", response_model=list[http.Offering])
async def list_offerings(
    mentor_id: UUID,
    _: Identity = Depends(authenticated),
    mentors: MentorService = Depends(mentors_service),
) -> list[http.Offering]:
    try:
        offerings = await mentors.offerings(mentor_id)
    except NoSuchMentor:
        raise _no_such_mentor(mentor_id) from None
    return [_offering_view(offering) for offering in offerings]


def _no_such_mentor(mentor_id: UUID) -> HTTPException:
    return HTTPException(404, f"there is no mentor {mentor_id}")


def _mentor_view(mentor: Mentor) -> http.Mentor:
    return http.Mentor(
        id=mentor.id,
        name=mentor.name,
        email=mentor.email,
        timezone=mentor.timezone,
        identity_subject=mentor.identity_subject,
    )


def _subject_taken() -> HTTPException:
    return HTTPException(
        409,
        "this identity subject acts as another mentor already (each subject acts as one "
        "mentor): link that mentor to its own subject first, or check the subject",
    )


def _offering_view(offering: Offering) -> http.Offering:
    return http.Offering(
        id=offering.id,
        mentor_id=offering.mentor_id,
        title=offering.title,
        duration_minutes=offering.duration_minutes,
        price=http.Money(amount=offering.price.amount, currency=offering.price.currency),
    )


# --- bookings -----------------------------------------------------------------------------------


@router.post("/api/bookings", status_code=202, response_model=http.BookingAccepted)
async def book_session(
    body: http.BookingCreate,
    identity: Identity = Depends(require_roles(Role.MENTEE)),
    idempotency_key: str | None = Header(
        None, alias="Idempotency-Key", min_length=1, max_length=200
    ),
    orders: OrderService = Depends(orders_service),
) -> Any:
    """The order and its session, holding the slot; 409 when the slot is taken. A request
    repeated with its Idempotency-Key is answered what the first one was."""
    try:
        accepted = await orders.book(
            body, mentee_id=identity.sub, idempotency_key=idempotency_key, now=utcnow()
        )
    except NoSuchOffering:
        raise HTTPException(404, f"there is no offering {body.offering_id}") from None
    except InvalidBooking as exc:
        raise invalid(exc.field, str(exc)) from None
    except SlotTaken as taken:
        raise HTTPException(
            409,
            f"the slot is taken: the mentor already has a session overlapping {taken}; "
            f"choose another start",
        ) from None
    except IdempotencyKeyReused:
        raise HTTPException(
            422,
            "this Idempotency-Key was already used with a different request body; "
            "use a new key for a new booking",
        ) from None
    except IdempotencyKeyUnanswered:
        raise HTTPException(
            409, "the request first sent with this Idempotency-Key has no answer"
        ) from None
    if isinstance(accepted, FirstAnswer):
        return JSONResponse(
            accepted.body, status_code=accepted.status, headers={"Idempotent-Replayed": "true"}
        )
    return accepted


# --- orders -------------------------------------------------------------------------------------


@router.get("/api/orders/{order_id}", response_model=http.Order)
async def get_order(
    order_id: UUID,
    reader: Identity | OrderLink = Depends(order_reader),
    orders: OrderService = Depends(orders_service),
) -> http.Order:
    """The order, for its mentee, an admin, or whoever holds a link to this very order (the
    gateway's order stream sends one on)."""
    if isinstance(reader, OrderLink):
        if reader.order_id != order_id:
            raise HTTPException(403, "this order link is for another order")
    elif reader.role not in (Role.MENTEE, Role.ADMIN):
        raise HTTPException(
            403, f"this needs the role mentee or admin; the token has {reader.role}"
        )
    found = await orders.find(order_id)
    # Another mentee's order is answered like a missing one: its existence is not theirs.
    if found is None or (
        isinstance(reader, Identity) and not reader.is_admin and found.order.mentee_id != reader.sub
    ):
        raise HTTPException(404, f"there is no order {order_id}")
    return order_view(found)


@router.post("/api/admin/orders/{order_id}/cancel", response_model=http.Order)
async def cancel_order(
    order_id: UUID,
    body: http.AdminReason,
    identity: Identity = Depends(require_roles(Role.ADMIN)),
    orders: OrderService = Depends(orders_service),
) -> http.Order:
    """Cancel an order and free its slot (a paid order's escrow is then frozen by payments,
    the session's calendar event deleted by calendar). A repeat answers the cancelled order."""
    try:
        cancelled = await orders.cancel(order_id, by=identity.sub, reason=body.reason, now=utcnow())
    except NoSuchOrder:
        raise HTTPException(404, f"there is no order {order_id}") from None
    except IllegalTransition as exc:
        raise HTTPException(
            409, f"{exc}: an order whose payment failed has already ended and freed its slot"
        ) from None
    return order_view(cancelled)


@router.put("/api/admin/mentors/{mentor_id}/identity", response_model=http.Mentor)
async def link_mentor_identity(
    mentor_id: UUID,
    body: http.MentorIdentityLink,
    identity: Identity = Depends(require_roles(Role.ADMIN)),
    mentors: MentorService = Depends(mentors_service),
) -> http.Mentor:
    """Link a mentor to its identity-provider subject (or change it): tokens with it act as the
    mentor, the previous subject's no longer. A repeat answers the mentor as it is."""
    try:
        mentor = await mentors.link_identity(
            mentor_id,
            body.identity_subject,
            by=identity.sub,
            reason=body.reason,
            now=utcnow(),
        )
    except NoSuchMentor:
        raise _no_such_mentor(mentor_id) from None
    except SubjectTaken:
        raise _subject_taken() from None
    return _mentor_view(mentor)
