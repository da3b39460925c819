"""The public HTTP API (OpenAPI at /docs): each route declared, checked, sent on to its service.

The gateway checks the token, the role and the body, then forwards the request as it came to the
owning service at the same path. Ownership the gateway cannot see (a mentee reading another's
order, a mentor acting on another mentor's offerings or calendar) is the owning service's to
refuse: it gets the caller's token and verifies it too, and its 403 problem+json comes back as
it is. A mentor's routes are checked here for the role only (admin or mentor): which mentor a
token acts as depends on the identity-provider subject linked to the mentor, which only the
services hold.
"""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Body, Depends, Header, HTTPException, Path, Query, Request
from pydantic import BaseModel
from starlette.responses import Response

from booking.contracts.http import (
    AdminReason,
    BookingAccepted,
    BookingCreate,
    CalendarConnection,
    DeadLetterDetail,
    DeadLetterFilter,
    DeadLetterPage,
    DeadLetterStatus,
    Escrow,
    EscrowSettlement,
    FeedFilter,
    MarkedRead,
    Mentor,
    MentorCreate,
    MentorIdentityLink,
    Notification,
    NotificationPage,
    NotificationSummary,
    Offering,
    OfferingCreate,
    OptionalReason,
    Order,
    Problem,
    Replayed,
    ServiceName,
    SessionScheduling,
    WebhookResult,
)
from booking.gateway import dead_letters
from booking.gateway.limits import Limit, rate_limited
from booking.gateway.order_stream import (
    MAX_VERSION,
    MEDIA_TYPE,
    ORDER_EVENT,
    OrderStreams,
    stream_token,
)
from booking.gateway.order_views import read_order
from booking.gateway.upstreams import Service, Upstreams
from booking.runtime.auth import Identity, Role, authenticated, require_roles


async def upstreams(request: Request) -> Upstreams:
    return request.app.state.upstreams


async def order_changes(request: Request) -> OrderStreams:
    """The order streams and the order views, both fed by this replica's order changes feed."""
    return request.app.state.order_streams


# Which mentor the token may act as is the owning service's to decide (see the docstring).
mentor_or_admin = require_roles(Role.ADMIN, Role.MENTOR)


def _problems(*statuses: int, conflict: str | None = None) -> dict[int | str, dict[str, Any]]:
    """The problems a route may answer (the forwarding ones always); `conflict` says what its
    409 means when it is not a taken slot."""
    schema = Problem.model_json_schema()
    return {
        status: {
            "description": conflict if status == 409 and conflict else _PROBLEM_WHEN[status],
            "content": {"application/problem+json": {"schema": schema}},
        }
        for status in (*statuses, 502, 503, 504)
    }


_PROBLEM_WHEN = {
    400: "a required parameter is missing or wrong, or the body is not UTF-8 text",
    401: "no token, or a malformed, expired or wrongly signed one",
    403: "the token's role (or mentor) may not do this",
    404: "no such resource",
    409: "the slot is taken",
    413: "the body is too large",
    422: "the request does not match the contract",
    429: "too many requests from this client; see Retry-After",
    502: "the service behind the gateway failed",
    503: "the service behind the gateway cannot be reached",
    504: "the service behind the gateway did not answer in time",
}
SIGNED_IN = (401, 403, 422)
# A body that is not UTF-8 text cannot be parsed at all: 400 (one that is not JSON is 422).
WITH_BODY = (*SIGNED_IN, 400, 413)
PUBLIC = (400, 422, 429)


def _json(body: BaseModel) -> bytes:
    return body.model_dump_json(exclude_unset=True).encode()


# --- OpenAPI links: where an answer leads (a client, or a stateful test, goes on from there) ----


def _to(target: str, body: dict[str, str] | None = None, **parameters: str) -> dict[str, Any]:
    """A link to `target` ("GET /api/mentors/{mentor_id}"), its parameters (and the fields of its
    body) filled from this answer by runtime expressions (`$response.body#/id`)."""
    method, path = target.split(" ")
    pointer = path.replace("~", "~0").replace("/", "~1")  # a JSON pointer's escapes
    link: dict[str, Any] = {"operationRef": f"#/paths/{pointer}/{method.lower()}"}
    if parameters:
        link["parameters"] = parameters
    if body:
        link["requestBody"] = body
    return link


def _links(status: int, **links: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    return {status: {"links": links}}


def _mentor_links(mentor_id: str) -> dict[str, dict[str, Any]]:
    """What may be done with a mentor whose id is at `mentor_id` in the answer."""
    at: dict[str, Any] = {"mentor_id": mentor_id}
    return {
        "GetMentor": _to("GET /api/mentors/{mentor_id}", **at),
        "AddOffering": _to("POST /api/mentors/{mentor_id}/offerings", **at),
        "ListOfferings": _to("GET /api/mentors/{mentor_id}/offerings", **at),
        "ConnectCalendar": _to("GET /api/mentors/{mentor_id}/calendar/connect", **at),
        "GetCalendarConnection": _to("GET /api/mentors/{mentor_id}/calendar", **at),
        "DisconnectCalendar": _to("DELETE /api/mentors/{mentor_id}/calendar", **at),
        "LinkIdentity": _to("PUT /api/admin/mentors/{mentor_id}/identity", **at),
    }


def _order_links(order_id: str, session_id: str) -> dict[str, dict[str, Any]]:
    """What an admin may do with an order (and its session) whose ids are at those places."""
    return {
        "CancelOrder": _to("POST /api/admin/orders/{order_id}/cancel", order_id=order_id),
        "GetEscrow": _to("GET /api/admin/orders/{order_id}/escrow", order_id=order_id),
        "SettleEscrow": _to("POST /api/admin/orders/{order_id}/escrow", order_id=order_id),
        "RetryScheduling": _to(
            "POST /api/admin/sessions/{session_id}/retry-scheduling", session_id=session_id
        ),
    }


def _dead_letter_links(dead_letter_id: str) -> dict[str, dict[str, Any]]:
    return {
        "ReplayDeadLetter": _to(
            "POST /api/admin/dead-letters/{dead_letter_id}/replay", dead_letter_id=dead_letter_id
        ),
        "DiscardDeadLetter": _to(
            "POST /api/admin/dead-letters/{dead_letter_id}/discard", dead_letter_id=dead_letter_id
        ),
    }


def _delete_notification(notification_id: str) -> dict[str, Any]:
    return _to("DELETE /api/admin/notifications/{notification_id}", notification_id=notification_id)


BOOK = "POST /api/bookings"


MentorId = Path(description="the mentor's id, as the system gave it")
SUBJECT_TAKEN = "the identity subject acts as another mentor already"

# --- orders: mentors, offerings, bookings, orders ----------------------------------------------

orders = APIRouter(tags=["mentors and bookings"])


@orders.post(
    "/api/mentors",
    status_code=201,
    response_model=Mentor,
    responses={
        **_problems(*WITH_BODY, 409, conflict=SUBJECT_TAKEN),
        **_links(201, **_mentor_links("$response.body#/id")),
    },
    dependencies=[Depends(require_roles(Role.ADMIN))],
    summary="Register a mentor",
)
async def register_mentor(
    body: MentorCreate, request: Request, up: Upstreams = Depends(upstreams)
) -> Response:
    return await up.forward(request, Service.ORDERS, content=_json(body))


@orders.get(
    "/api/mentors/{mentor_id}",
    response_model=Mentor,
    responses=_problems(*SIGNED_IN, 404),
    dependencies=[Depends(authenticated)],
    summary="A mentor",
)
async def get_mentor(
    request: Request, mentor_id: UUID = MentorId, up: Upstreams = Depends(upstreams)
) -> Response:
    return await up.forward(request, Service.ORDERS)


@orders.post(
    "/api/mentors/{mentor_id}/offerings",
    status_code=201,
    response_model=Offering,
    responses={
        **_problems(*WITH_BODY, 404),
        **_links(
            201,
            Book=_to(BOOK, body={"offering_id": "$response.body#/id"}),
            ListOfferings=_to(
                "GET /api/mentors/{mentor_id}/offerings", mentor_id="$response.body#/mentor_id"
            ),
        ),
    },
    dependencies=[Depends(mentor_or_admin)],
    summary="Add an offering to a mentor",
)
async def add_offering(
    body: OfferingCreate,
    request: Request,
    mentor_id: UUID = MentorId,
    up: Upstreams = Depends(upstreams),
) -> Response:
    return await up.forward(request, Service.ORDERS, content=_json(body))


@orders.get(
    "/api/mentors/{mentor_id}/offerings",
    response_model=list[Offering],
    responses={
        **_problems(*SIGNED_IN, 404),
        **_links(200, Book=_to(BOOK, body={"offering_id": "$response.body#/0/id"})),
    },
    dependencies=[Depends(authenticated)],
    summary="A mentor's offerings",
)
async def list_offerings(
    request: Request, mentor_id: UUID = MentorId, up: Upstreams = Depends(upstreams)
) -> Response:
    return await up.forward(request, Service.ORDERS)


@orders.post(
    "/api/bookings",
    status_code=202,
    response_model=BookingAccepted,
    responses={
        **_problems(*WITH_BODY, 404, 409),
        **_links(
            202,
            GetOrder=_to("GET /api/orders/{order_id}", order_id="$response.body#/order_id"),
            **_order_links("$response.body#/order_id", "$response.body#/session_id"),
        ),
    },
    dependencies=[Depends(require_roles(Role.MENTEE))],
    summary="Book a session (the order then awaits payment)",
)
async def book_session(
    body: BookingCreate,
    request: Request,
    idempotency_key: str | None = Header(
        None,
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="a retried POST with the same key answers the first result",
    ),
    up: Upstreams = Depends(upstreams),
) -> Response:
    return await up.forward(request, Service.ORDERS, content=_json(body))


@orders.get(
    "/api/orders/{order_id}",
    response_model=Order,
    responses={
        **_problems(*SIGNED_IN, 404),
        **_links(200, **_order_links("$response.body#/id", "$response.body#/session/id")),
    },
    summary="An order, its payment, session and escrow",
)
async def get_order(
    request: Request,
    order_id: UUID,
    reader: Identity = Depends(require_roles(Role.MENTEE, Role.ADMIN)),
    up: Upstreams = Depends(upstreams),
    streams: OrderStreams = Depends(order_changes),
) -> Response:
    """Answered by the gateway from the order changes feed when it knows the order's latest
    view and that the caller may read it (booking.gateway.order_views), else by orders."""
    return await read_order(streams.views, up, request, order_id, reader)


# Served by the gateway itself (from the order changes fanout), not forwarded to orders.
order_streams = APIRouter(tags=["mentors and bookings"])


@order_streams.get(
    "/api/orders/{order_id}/events",
    response_class=Response,
    response_model=None,
    responses={
        200: {
            "description": "Server-Sent Events: `event: order`, `id:` the order's version, "
            "`data:` the order as GET /api/orders/{order_id} shows it (one line of JSON); first "
            "the current state, then each change; after a state that ends the order "
            "(confirmed, payment_failed, cancelled) the stream closes. A `: keepalive` comment "
            "comes every 15 s",
            "content": {MEDIA_TYPE: {"schema": ORDER_EVENT}},
        },
        204: {"description": "the order ended at or below Last-Event-ID: nothing more to send"},
        **_problems(*SIGNED_IN, 404),
    },
    summary="Follow an order: its changes as Server-Sent Events, until it ends",
)
async def follow_order(
    request: Request,
    order_id: UUID,
    token: str = Depends(stream_token),
    last_event_id: int | None = Query(
        None, ge=0, le=MAX_VERSION, description="resume after this version (as Last-Event-ID)"
    ),
    last_event_id_header: int | None = Header(
        None,
        alias="Last-Event-ID",
        ge=0,
        le=MAX_VERSION,
        description="resume: nothing at or below this version is sent again (EventSource "
        "sends it when it reconnects)",
    ),
    up: Upstreams = Depends(upstreams),
    streams: OrderStreams = Depends(order_changes),
) -> Response:
    """For the order's mentee and admins, or whoever holds an order link to this order."""
    after = max(last_event_id or 0, last_event_id_header or 0)
    return await streams.open(up, order_id, token, after)


# --- payments: the Konnect webhook -------------------------------------------------------------

payments = APIRouter(tags=["payments"])


@payments.get(
    "/api/payments/webhook",
    response_model=WebhookResult,
    responses=_problems(*PUBLIC, 404),
    dependencies=[Depends(rate_limited(Limit.WEBHOOK))],
    summary="Konnect's payment notification (unsigned: payments asks Konnect itself)",
)
async def konnect_webhook(
    request: Request,
    payment_ref: str | None = Query(None, max_length=200, description="required"),
    up: Upstreams = Depends(upstreams),
) -> Response:
    if not payment_ref:
        raise HTTPException(400, "payment_ref is required: the Konnect payment reference")
    return await up.forward(request, Service.PAYMENTS)


# --- calendar: mentors' Google connections -----------------------------------------------------

calendar = APIRouter(tags=["calendar"])


@calendar.get(
    "/api/mentors/{mentor_id}/calendar/connect",
    status_code=302,
    response_class=Response,
    response_model=None,
    responses={
        302: {
            "description": "to Google's consent page",
            "headers": {"Location": {"schema": {"type": "string"}}},
        },
        **_problems(*SIGNED_IN, 404),
    },
    dependencies=[Depends(mentor_or_admin)],
    summary="Start connecting a mentor's Google Calendar",
)
async def connect_calendar(
    request: Request, mentor_id: UUID = MentorId, up: Upstreams = Depends(upstreams)
) -> Response:
    return await up.forward(request, Service.CALENDAR)


@calendar.get(
    "/api/calendar/oauth/callback",
    response_model=CalendarConnection,
    responses=_problems(*PUBLIC, 404),
    dependencies=[Depends(rate_limited(Limit.PUBLIC))],
    summary="Where Google sends the browser back (the signed state says who)",
)
async def finish_calendar_connection(
    request: Request,
    code: str | None = Query(None, max_length=2000),
    state: str | None = Query(None, max_length=2000),
    up: Upstreams = Depends(upstreams),
) -> Response:
    return await up.forward(request, Service.CALENDAR)


@calendar.get(
    "/api/mentors/{mentor_id}/calendar",
    response_model=CalendarConnection,
    responses=_problems(*SIGNED_IN, 404),
    dependencies=[Depends(mentor_or_admin)],
    summary="A mentor's calendar connection",
)
async def calendar_connection(
    request: Request, mentor_id: UUID = MentorId, up: Upstreams = Depends(upstreams)
) -> Response:
    return await up.forward(request, Service.CALENDAR)


@calendar.delete(
    "/api/mentors/{mentor_id}/calendar",
    status_code=204,
    response_class=Response,
    response_model=None,
    responses=_problems(*SIGNED_IN, 404),
    dependencies=[Depends(mentor_or_admin)],
    summary="Disconnect a mentor's calendar (its tokens are forgotten)",
)
async def disconnect_calendar(
    request: Request, mentor_id: UUID = MentorId, up: Upstreams = Depends(upstreams)
) -> Response:
    return await up.forward(request, Service.CALENDAR)


# --- notifications: the admins' feed -----------------------------------------------------------

notifications = APIRouter(
    prefix="/api/admin/notifications",
    tags=["admin notifications"],
    dependencies=[Depends(require_roles(Role.ADMIN))],
)


async def _filters(given: Annotated[FeedFilter, Query()]) -> None:
    """The feed's filters, checked here and passed on in the query string as they came."""


@notifications.get(
    "",
    response_model=NotificationPage,
    responses={
        **_problems(*SIGNED_IN),
        **_links(
            200,
            MarkRead=_to(
                "POST /api/admin/notifications/{notification_id}/read",
                notification_id="$response.body#/items/0/id",
            ),
            DeleteNotification=_delete_notification("$response.body#/items/0/id"),
        ),
    },
    dependencies=[Depends(_filters)],
    summary="The notifications, newest first",
)
async def list_notifications(
    request: Request,
    limit: int | None = Query(None, ge=1, le=200),
    cursor: str | None = Query(None, max_length=200),
    up: Upstreams = Depends(upstreams),
) -> Response:
    return await up.forward(request, Service.NOTIFICATIONS)


@notifications.post(
    "/read-all",
    response_model=MarkedRead,
    responses=_problems(*SIGNED_IN),
    dependencies=[Depends(_filters)],
    summary="Mark every notification (matching the filters) read",
)
async def mark_all_read(request: Request, up: Upstreams = Depends(upstreams)) -> Response:
    return await up.forward(request, Service.NOTIFICATIONS)


@notifications.get(
    "/summary",
    response_model=NotificationSummary,
    responses=_problems(*SIGNED_IN),
    summary="Counts by day and severity",
)
async def summarize_notifications(
    request: Request,
    days: int = Query(7, ge=1, le=366),
    up: Upstreams = Depends(upstreams),
) -> Response:
    return await up.forward(request, Service.NOTIFICATIONS)


@notifications.post(
    "/{notification_id}/read",
    response_model=Notification,
    responses={
        **_problems(*SIGNED_IN, 404),
        **_links(200, DeleteNotification=_delete_notification("$response.body#/id")),
    },
    summary="Mark a notification read",
)
async def mark_read(
    request: Request, notification_id: int = Path(ge=1), up: Upstreams = Depends(upstreams)
) -> Response:
    return await up.forward(request, Service.NOTIFICATIONS)


@notifications.delete(
    "/{notification_id}",
    status_code=204,
    response_class=Response,
    response_model=None,
    responses=_problems(*SIGNED_IN, 404),
    summary="Delete a notification",
)
async def delete_notification(
    request: Request, notification_id: int = Path(ge=1), up: Upstreams = Depends(upstreams)
) -> Response:
    return await up.forward(request, Service.NOTIFICATIONS)


# --- admin actions: dead letters, orders, scheduling, escrow (docs/recovery.md section 7) -------

dead_letter_routes = APIRouter(
    prefix="/api/admin/dead-letters",
    tags=["dead letters"],
    dependencies=[Depends(require_roles(Role.ADMIN))],
)

DeadLetterId = Path(
    max_length=60, description="`<service>:<n>`: the service keeps it", examples=["payments:42"]
)


def _owner(dead_letter_id: str) -> Service:
    try:
        return dead_letters.service_of(dead_letter_id)
    except ValueError as exc:
        raise HTTPException(404, str(exc)) from None


@dead_letter_routes.get(
    "",
    response_model=DeadLetterPage,
    responses={
        **_problems(*SIGNED_IN),
        **_links(
            200,
            GetDeadLetter=_to(
                "GET /api/admin/dead-letters/{dead_letter_id}",
                dead_letter_id="$response.body#/items/0/id",
            ),
            **_dead_letter_links("$response.body#/items/0/id"),
        ),
    },
    summary="Dead letters, newest first, of one service or of all four",
)
async def list_dead_letters(
    request: Request,
    service: ServiceName | None = Query(
        None, description="only this service's (its own cursor then); all four without it"
    ),
    type_: str | None = Query(
        None, alias="type", max_length=100, pattern=r"^[^\x00]*$", description="event type"
    ),
    status: DeadLetterStatus | None = Query(None),
    limit: int = Query(50, ge=1, le=200),
    cursor: str | None = Query(None, max_length=200, description="the last page's next_cursor"),
    up: Upstreams = Depends(upstreams),
) -> Response:
    if service is not None:
        return await up.forward(request, Service(service))
    try:
        after = None if cursor is None else dead_letters.Position.decode(cursor)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    return await dead_letters.list_everywhere(
        up, request, event_type=type_, status=status, limit=limit, after=after
    )


@dead_letter_routes.post(
    "/replay",
    response_model=Replayed,
    responses=_problems(*WITH_BODY),
    summary="Replay every kept dead letter (of one service, of one type)",
)
async def replay_dead_letters(
    request: Request,
    body: DeadLetterFilter = Body(default_factory=DeadLetterFilter),
    up: Upstreams = Depends(upstreams),
) -> Response:
    if body.service is not None:
        return await up.forward(request, Service(body.service), content=_json(body))
    return await dead_letters.replay_everywhere(up, request, body)


@dead_letter_routes.get(
    "/{dead_letter_id}",
    response_model=DeadLetterDetail,
    responses={
        **_problems(*SIGNED_IN, 404),
        **_links(200, **_dead_letter_links("$response.body#/id")),
    },
    summary="A dead letter, with its whole envelope",
)
async def get_dead_letter(
    request: Request, dead_letter_id: str = DeadLetterId, up: Upstreams = Depends(upstreams)
) -> Response:
    return await up.forward(request, _owner(dead_letter_id))


@dead_letter_routes.post(
    "/{dead_letter_id}/replay",
    response_model=DeadLetterDetail,
    responses=_problems(*WITH_BODY, 404, 409, conflict="it was discarded: it cannot be replayed"),
    summary="Send a dead letter back to its consumer (once: a replayed one answers as it is)",
)
async def replay_dead_letter(
    request: Request,
    dead_letter_id: str = DeadLetterId,
    body: OptionalReason = Body(default_factory=OptionalReason),
    up: Upstreams = Depends(upstreams),
) -> Response:
    return await up.forward(request, _owner(dead_letter_id), content=_json(body))


@dead_letter_routes.post(
    "/{dead_letter_id}/discard",
    response_model=DeadLetterDetail,
    responses=_problems(*WITH_BODY, 404, 409, conflict="it was replayed: nothing to discard"),
    summary="Discard a dead letter, saying why",
)
async def discard_dead_letter(
    body: AdminReason,
    request: Request,
    dead_letter_id: str = DeadLetterId,
    up: Upstreams = Depends(upstreams),
) -> Response:
    return await up.forward(request, _owner(dead_letter_id), content=_json(body))


admin = APIRouter(
    prefix="/api/admin", tags=["admin actions"], dependencies=[Depends(require_roles(Role.ADMIN))]
)

NOT_FROM_HERE = "the state machine does not allow this move from where it stands"


@admin.post(
    "/orders/{order_id}/cancel",
    response_model=Order,
    responses={
        **_problems(*WITH_BODY, 404, 409, conflict=NOT_FROM_HERE),
        **_links(200, **_order_links("$response.body#/id", "$response.body#/session/id")),
    },
    summary="Cancel an order: its slot freed, its Google event deleted, a paid one's escrow frozen",
)
async def cancel_order(
    body: AdminReason,
    request: Request,
    order_id: UUID,
    up: Upstreams = Depends(upstreams),
    streams: OrderStreams = Depends(order_changes),
) -> Response:
    answer = await up.forward(request, Service.ORDERS, content=_json(body))
    # The admin reads their own change next: from orders, not from a view the feed has yet to
    # bring up to date.
    streams.views.forget(order_id)
    return answer


@admin.post(
    "/sessions/{session_id}/retry-scheduling",
    response_model=SessionScheduling,
    responses=_problems(*WITH_BODY, 404, 409, conflict=NOT_FROM_HERE),
    summary="Try a failed scheduling of a session in its mentor's calendar again, now",
)
async def retry_scheduling(
    request: Request,
    session_id: UUID,
    body: OptionalReason = Body(default_factory=OptionalReason),
    up: Upstreams = Depends(upstreams),
) -> Response:
    return await up.forward(request, Service.CALENDAR, content=_json(body))


@admin.get(
    "/orders/{order_id}/escrow",
    response_model=Escrow,
    responses=_problems(*SIGNED_IN, 404),
    summary="An order's escrow, as payments holds it",
)
async def get_escrow(
    request: Request, order_id: UUID, up: Upstreams = Depends(upstreams)
) -> Response:
    return await up.forward(request, Service.PAYMENTS)


@admin.post(
    "/orders/{order_id}/escrow",
    response_model=Escrow,
    responses=_problems(*WITH_BODY, 404, 409, conflict=NOT_FROM_HERE),
    summary="Settle an order's escrow: release it, refund it, or record the refund as made",
)
async def settle_escrow(
    body: EscrowSettlement, request: Request, order_id: UUID, up: Upstreams = Depends(upstreams)
) -> Response:
    return await up.forward(request, Service.PAYMENTS, content=_json(body))


@admin.put(
    "/mentors/{mentor_id}/identity",
    response_model=Mentor,
    responses=_problems(*WITH_BODY, 404, 409, conflict=SUBJECT_TAKEN),
    summary="Link a mentor to its identity-provider subject (or change it): tokens with it act "
    "as the mentor",
)
async def link_mentor_identity(
    body: MentorIdentityLink,
    request: Request,
    mentor_id: UUID = MentorId,
    up: Upstreams = Depends(upstreams),
) -> Response:
    return await up.forward(request, Service.ORDERS, content=_json(body))


routers = [orders, order_streams, payments, calendar, notifications, dead_letter_routes, admin]
