"""`GET /api/orders/{order_id}/events`: an order's changes as Server-Sent Events.

Each event is `event: order`, `id:` the order's version, `data:` the order as GET
/api/orders/{id} shows it (one line of JSON). First the current state, then every change, until
the order ends (confirmed, payment_failed, cancelled): that last state is sent and the stream
closes. `Last-Event-ID` (or `?last_event_id=`) resumes: nothing at or below it is sent again,
and an order that ended at or below it is answered 204 (EventSource stops reconnecting). A
`: keepalive` comment goes out every ORDER_STREAM_KEEPALIVE_SECONDS.

Who may read: the order's mentee and admins, as GET, or whoever holds an order link to this very
order; the token in `Authorization: Bearer` or, for EventSource (which cannot set headers), the
`access_token` query parameter, kept out of the access logs. Every refusal (401, 403, 404) is
problem+json before the stream starts. A stream ends when its token expires.

How: orders records OrderChanged (the view, with its version) on every change, to the order
changes fanout. This replica reads it through a queue of its own (booking.runtime.fanout) and
hands each change to the streams watching that order (a dict from order id to streams); a change
nobody here watches is dropped after a JSON parse, before any validation. A stream asks orders
for the order once, as it opens, with the caller's own token (orders takes an order link on that
GET), then only listens: an idle stream costs orders nothing. After the feed lost its queue (a
broker reconnect) every stream reads its order once more, since changes may have been missed.

A stream's changes wait in a bounded queue drained by its own response: the feed never waits on
a client. A client whose queue fills, or that does not take one write within
ORDER_STREAM_WRITE_TIMEOUT_SECONDS, is dropped; it reconnects with its Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

from aio_pika.abc import AbstractIncomingMessage
from fastapi import Depends, HTTPException, Query
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from booking.contracts import MalformedMessage, OrderChanged, UnknownEvent, decode, http
from booking.contracts import parse_envelope as parse_change
from booking.gateway.alerts.endpoint import token_expiry
from booking.gateway.order_views import OrderViews
from booking.gateway.return_page import hide_link_tokens_from_access_logs
from booking.gateway.settings import GatewaySettings
from booking.gateway.upstreams import (
    Service,
    Unanswered,
    Upstreams,
    failed_service,
    failure_problem,
    passed_back,
)
from booking.runtime import metrics
from booking.runtime.auth import OrderLink, Role, TokenRefused, TokenVerifier
from booking.runtime.broker import Broker
from booking.runtime.fanout import FanoutQueue
from booking.runtime.health import Health, Observation
from booking.runtime.problems import problem

log = logging.getLogger(__name__)

COMPONENT = "order-changes"
MEDIA_TYPE = "text/event-stream"
ENDED = frozenset({"confirmed", "payment_failed", "cancelled"})
KEEPALIVE = b": keepalive\n\n"
MAX_VERSION = 2**63 - 1  # orders keeps it in a BIGINT

ORDER_EVENT = {
    "description": "one event of the stream (OpenAPI 3.1: the schema of an event stream is each "
    "event's)",
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["order"]},
        "id": {"type": "string", "pattern": "^[0-9]+$", "description": "the order's version"},
        "data": {
            "type": "string",
            "description": "the order as GET /api/orders/{order_id} shows it",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": "#/components/schemas/Order"},
        },
    },
    "required": ["event", "id", "data"],
}

OPEN = metrics.ORDER_STREAMS
DROPPED = metrics.ORDER_STREAMS_DROPPED


@dataclass(frozen=True, slots=True)
class Change:
    """One state of an order as its streams send it, serialised once for all of them."""

    version: int
    ended: bool
    data: bytes  # the order as GET shows it: the same model, the same JSON
    frame: bytes

    @classmethod
    def of(cls, order: http.Order) -> Change:
        data = order.model_dump_json().encode()
        frame = b"event: order\nid: %d\ndata: %s\n\n" % (order.version, data)
        return cls(order.version, order.status in ENDED, data, frame)


class Signal(enum.Enum):
    REREAD = "reread"  # the feed had no queue for a while: read the order again
    DISCONNECTED = "disconnected"  # the client went


class Gone(Exception):
    """The stream ends: `reason` says why, for the logs and the drop counter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class OrderStream:
    """One client's stream of one order: what waits for it, and what it was last sent."""

    def __init__(
        self,
        order_id: UUID,
        token: str,
        after: int,
        *,
        queue_size: int,
        expires_at: float | None,
    ) -> None:
        self.order_id = order_id
        self.token = token  # the caller's: reads of the order are made on their behalf
        self.last = after  # the highest version sent (or known to the client)
        self.expires_at = expires_at
        self.queue: asyncio.Queue[Change | Signal] = asyncio.Queue(queue_size)
        self.overflowed = False
        self._writing: asyncio.Timeout | None = None

    def offer(self, item: Change | Signal) -> None:
        """Queue `item` for the client, never waiting: when the queue is full the client is not
        keeping up, and is dropped (a write under way gives up at once)."""
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed = True
            if self._writing is not None:
                self._writing.reschedule(asyncio.get_running_loop().time())

    async def write(self, send: Send, body: bytes, timeout: float) -> None:
        """Send `body`, giving up (Gone) after `timeout` or once the queue overflowed."""
        try:
            async with asyncio.timeout(timeout) as self._writing:
                await send({"type": "http.response.body", "body": body, "more_body": True})
        except TimeoutError:
            raise Gone("too_slow") from None
        finally:
            self._writing = None

    def take(self, change: Change) -> bytes | None:
        """The frame to send for `change`, or None when the client has it already."""
        if change.version <= self.last:
            return None
        self.last = change.version
        return change.frame


class OrderStreams:
    """The order streams open on this replica and the feed of order changes they listen to.

    Built by the composition root before the broker starts (the feed's queue is subscribed once
    it has); `stop()` belongs in the app's lifespan.
    """

    def __init__(self, settings: GatewaySettings, broker: Broker, verifier: TokenVerifier) -> None:
        exchange = settings.order_changes_exchange
        broker.declare_fanout(exchange)
        self.feed = FanoutQueue(
            broker,
            exchange,
            take=self._on_message,
            on_gap=self._read_again,
            name="order change feed",
            reattach_interval=settings.broker_reconnect_interval_seconds,
        )
        broker.on_started(self.feed.attach)
        self.verifier = verifier  # the app's: the same rules and provider keys as its routes
        self.keepalive = settings.order_stream_keepalive_seconds
        self.queue_size = settings.order_stream_queue_size
        self.write_timeout = settings.order_stream_write_timeout_seconds
        self.watching: dict[str, set[OrderStream]] = {}
        # The same feed keeps the views of the orders read lately (GET /api/orders/{id}).
        self.views = OrderViews(lambda: self.feed.consuming)
        self.dropped = 0  # closed by this replica for being too slow
        hide_link_tokens_from_access_logs()  # `access_token=` too

    async def stop(self) -> None:
        await self.feed.stop()

    def add_checks(self, health: Health) -> None:
        # Not part of readiness: only the streams need the feed (as the alert feed).
        health.add(COMPONENT, "consumers", self.check_queue, ready=False)

    async def check_queue(self) -> Observation:
        return await self.feed.check(COMPONENT, "order streams get no changes")

    # --- the feed ---------------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # Most changes are of orders nobody here watches nor read lately: a JSON parse finds
        # out, no validation.
        try:
            order_id = json.loads(message.body)["payload"]["order"]["id"]
        except (ValueError, TypeError, KeyError):
            log.error("order change feed: dropped %s: not an OrderChanged", message.message_id)
            return
        if not isinstance(order_id, str):
            return
        streams = self.watching.get(order_id)
        if not streams and not self.views.watches(order_id):
            return
        try:
            event = decode(parse_change(message.body))
        except (MalformedMessage, UnknownEvent) as exc:
            log.error("order change feed: dropped %s: %s", message.message_id, exc)
            return
        if not isinstance(event, OrderChanged):
            log.warning("order change feed: ignored a %s", type(event).__name__)
            return
        change = Change.of(event.order)
        self.views.changed(order_id, change.version, change.data)
        for stream in list(streams or ()):
            stream.offer(change)

    def _read_again(self) -> None:
        self.views.forget_all()
        for streams in list(self.watching.values()):
            for stream in list(streams):
                stream.offer(Signal.REREAD)

    def _watch(self, stream: OrderStream) -> Callable[[], None]:
        key = str(stream.order_id)
        self.watching.setdefault(key, set()).add(stream)

        def unwatch() -> None:
            streams = self.watching.get(key)
            if streams is not None:
                streams.discard(stream)
                if not streams:
                    del self.watching[key]

        return unwatch

    # --- one stream -------------------------------------------------------------------------

    async def open(self, up: Upstreams, order_id: UUID, token: str, after: int) -> Response:
        """The stream's response; refusals (HTTPException, problem+json) before it starts."""
        await self._authorise(token, order_id)
        stream = OrderStream(
            order_id,
            token,
            after,
            queue_size=self.queue_size,
            expires_at=token_expiry(token),
        )
        # Watching before the read: a change committed meanwhile waits in the queue, and what
        # the read already shows is skipped by its version.
        unwatch = self._watch(stream)
        try:
            current = await self._read(up, stream)
        except BaseException:
            unwatch()
            raise
        if isinstance(current, Response):
            unwatch()
            return current
        if current.ended and current.version <= after:
            unwatch()
            return Response(status_code=204)
        return EventStreamResponse(self, up, stream, current, unwatch)

    async def _authorise(self, token: str, order_id: UUID) -> None:
        try:
            reader = await self.verifier.verify_reader(token)
        except TokenRefused as refused:
            raise HTTPException(refused.status, refused.detail, headers=refused.headers) from None
        if isinstance(reader, OrderLink):
            if reader.order_id != order_id:
                raise HTTPException(403, "this order link is for another order")
        elif reader.role not in (Role.MENTEE, Role.ADMIN):
            raise HTTPException(
                403, f"this needs the role mentee or admin; the token has {reader.role}"
            )

    async def _read(self, up: Upstreams, stream: OrderStream) -> Change | Response:
        """The order as orders shows it to the caller, or the answer to pass back instead (its
        404 for another mentee's order, a 5xx as the gateway answers one)."""
        try:
            answer = await up.read(
                Service.ORDERS, f"/api/orders/{stream.order_id}", token=stream.token
            )
        except Unanswered as failed:
            return failed.problem
        if failed_service(answer):
            return failure_problem(answer, Service.ORDERS)
        if answer.status_code != 200:
            return passed_back(answer)
        try:
            return Change.of(http.Order.model_validate_json(answer.content))
        except ValidationError as exc:
            log.error("orders answered an order that is not one: %s", exc)
            return problem(502, "the orders service gave no valid answer", service="orders")

    async def run(self, send: Send, up: Upstreams, stream: OrderStream, first: Change) -> None:
        """Send the stream until the order ends (Gone for any other end)."""
        timeout = self.write_timeout
        current = first
        frame = stream.take(first)
        if frame is not None:
            await stream.write(send, frame, timeout)
        while not current.ended:
            if stream.overflowed:
                raise Gone("too_slow")
            wait = self.keepalive
            if stream.expires_at is not None:
                wait = min(wait, stream.expires_at - time.time())
                if wait <= 0:
                    raise Gone("token_expired")
            try:
                async with asyncio.timeout(wait):
                    item = await stream.queue.get()
            except TimeoutError:
                await stream.write(send, KEEPALIVE, timeout)
                continue
            if item is Signal.DISCONNECTED:
                raise Gone("client")
            if item is Signal.REREAD:
                read = await self._read(up, stream)
                if isinstance(read, Response):
                    raise Gone(f"read_{read.status_code}")
                item = read
            frame = stream.take(item)
            if frame is not None:  # else a repeat, or older than what the client has
                await stream.write(send, frame, timeout)
                current = item


class EventStreamResponse(Response):
    """The stream itself, written by hand rather than by StreamingResponse: each write may give
    up on a client that does not read, and the client's going away ends the stream at once."""

    media_type = MEDIA_TYPE

    def __init__(
        self,
        streams: OrderStreams,
        up: Upstreams,
        stream: OrderStream,
        first: Change,
        unwatch: Callable[[], None],
    ) -> None:
        # Not cached, nor held back by a buffering proxy (nginx's ingress reads this header).
        super().__init__(headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        # Open-ended: no Content-Length (Response gives an empty body "0").
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.streams = streams
        self.up = up
        self.stream = stream
        self.first = first
        self.unwatch = unwatch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = self.stream
        listening = asyncio.create_task(_until_disconnected(receive, stream))
        OPEN.inc()
        reason = "ended"
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await self.streams.run(send, self.up, stream, self.first)
        except Gone as gone:
            reason = gone.reason
        finally:
            self.unwatch()
            listening.cancel()
            OPEN.dec()
        if reason == "too_slow":
            self.streams.dropped += 1
            DROPPED.labels(reason).inc()
            log.info("order stream of %s dropped: the client does not keep up", stream.order_id)
            return  # what it did not read is abandoned with the connection
        if reason != "client":
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _until_disconnected(receive: Receive, stream: OrderStream) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            stream.offer(Signal.DISCONNECTED)
            return


# --- the route's parameters ---------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False)


async def stream_token(
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    access_token: str | None = Query(
        None,
        max_length=4096,
        description="the bearer token, for clients that cannot set headers (EventSource): a "
        "login token or an order link; kept out of the access logs",
    ),
) -> str:
    """The caller's token: `Authorization: Bearer`, else the `access_token` parameter."""
    if credentials is not None and credentials.scheme.lower() == "bearer":
        return credentials.credentials
    if access_token:
        return access_token
    raise HTTPException(
        401,
        "a bearer token is required: Authorization header or access_token parameter",
        headers={"WWW-Authenticate": "Bearer"},
    )
