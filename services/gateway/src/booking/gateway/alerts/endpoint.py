"""`WS /ws/admin`: who may connect, and the replica's admin connections around the feed."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import jwt
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from booking.gateway.alerts.connection import (
    GOING_AWAY,
    TOO_SLOW,
    AdminConnection,
    Policy,
)
from booking.gateway.alerts.feed import COMPONENT, AlertFeed
from booking.gateway.alerts.notifications import Notifications
from booking.gateway.settings import GatewaySettings
from booking.runtime import context, metrics
from booking.runtime.auth import Identity, TokenRefused, TokenVerifier
from booking.runtime.broker import Broker
from booking.runtime.health import Health, Observation
from booking.runtime.problems import problem

log = logging.getLogger(__name__)

PATH = "/ws/admin"

CONNECTED = metrics.ADMIN_WEBSOCKETS
DROPPED = metrics.ADMIN_WEBSOCKETS_DROPPED


class Refused(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


class AdminAlerts:
    """The admins connected to this replica, the feed that reaches them, and their route.

    Built by the composition root before the broker starts (it registers the feed's queue with
    `Broker.on_started`); `running()` belongs in the app's lifespan.
    """

    def __init__(self, settings: GatewaySettings, broker: Broker, verifier: TokenVerifier) -> None:
        self.verifier = verifier  # the app's: the same rules and provider keys as its routes
        self.feed = AlertFeed(broker, reattach_interval=settings.broker_reconnect_interval_seconds)
        self.notifications = Notifications(
            settings.notifications_url,
            timeout=settings.alerts_notifications_timeout_seconds,
            page_size=settings.alerts_replay_page_size,
        )
        self.policy = Policy(
            queue_size=settings.alerts_client_queue_size,
            ping_interval=settings.alerts_ping_interval_seconds,
            ping_timeout=settings.alerts_ping_timeout_seconds,
            close_timeout=settings.alerts_close_timeout_seconds,
        )
        self.connections: set[AdminConnection] = set()
        self.dropped = 0  # closed by this replica for being too slow
        broker.on_started(self.feed.attach)
        redact_access_tokens_in_server_logs()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        await self.notifications.open()
        try:
            yield
        finally:
            for connection in list(self.connections):
                connection.close(GOING_AWAY, "the gateway is shutting down; connect again")
            await self._wait_closed()
            await self.feed.stop()
            await self.notifications.close()

    async def _wait_closed(self) -> None:
        ends = [connection.finished for connection in self.connections]
        if ends:
            await asyncio.wait(ends, timeout=self.policy.close_timeout + 5)

    def add_checks(self, health: Health) -> None:
        # Not part of readiness: the gateway's HTTP routes do not need the feed, and its queue
        # is briefly missing after every broker reconnect; rabbitmq:connection covers the broker.
        health.add(COMPONENT, "consumers", self.feed.check_queue, ready=False)
        health.add(COMPONENT, "connections", self.check_connections, ready=False)

    async def check_connections(self) -> Observation:
        return Observation(
            COMPONENT,
            "connections",
            "pass",
            "component",
            len(self.feed.subscribers),
            "connections",
            output=f"admins connected to this replica; {self.dropped} dropped as too slow",
        )

    def middleware(self) -> Middleware:
        """`WS /ws/admin`, answered before the app's routing (see AlertsShortcut)."""
        return Middleware(AlertsShortcut, alerts=self)

    # --- one connection ---------------------------------------------------------------------

    async def serve(self, websocket: WebSocket) -> None:
        with context.correlated(str(uuid.uuid4())):
            try:
                token = bearer_token(websocket)
                identity = await self._authorise(token)
                after_id = resume_from_query(websocket)
            except Refused as refused:
                await refuse(websocket, refused)
                return
            await websocket.accept()
            connection = AdminConnection(
                websocket,
                sub=identity.sub,
                token=token,
                expires_at=token_expiry(token),
                feed=self.feed,
                notifications=self.notifications,
                policy=self.policy,
            )
            self.connections.add(connection)
            self.feed.subscribe(connection)
            CONNECTED.inc()
            log.info("admin %s connected to the alert feed", identity.sub)
            try:
                await connection.run(after_id=after_id)
            finally:
                self.feed.unsubscribe(connection)
                self.connections.discard(connection)
                CONNECTED.dec()
                if connection.close_code == TOO_SLOW:
                    self.dropped += 1
                    DROPPED.labels("too_slow").inc()
                log.info(
                    "admin %s left the alert feed (%s %s)",
                    identity.sub,
                    "client" if connection.client_gone else connection.close_code,
                    connection.close_reason,
                )

    async def _authorise(self, token: str) -> Identity:
        try:
            identity = await self.verifier.verify(token)
        except TokenRefused as refused:
            raise Refused(refused.status, refused.detail, refused.headers) from None
        if not identity.is_admin:
            raise Refused(403, f"the alert feed is for admins; the token has {identity.role}")
        return identity


def bearer_token(websocket: WebSocket) -> str:
    """From `Authorization: Bearer` or, for browsers (which cannot set headers on a websocket),
    the `access_token` query parameter."""
    header = websocket.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Refused(401, "the Authorization header must be: Bearer <token>")
        return token.strip()
    query_token = websocket.query_params.get("access_token")
    if not query_token:
        raise Refused(
            401, "a bearer token is required: Authorization header or access_token parameter"
        )
    return query_token


def resume_from_query(websocket: WebSocket) -> int | None:
    """`?after_id=K`: resume from the first frame on, the same as a first resume message."""
    value = websocket.query_params.get("after_id")
    if value is None:
        return None
    if not value.isdigit():
        raise Refused(400, "after_id must be a notification id (an integer >= 0)")
    return int(value)


def token_expiry(token: str) -> float | None:
    """The verified token's `exp`: the connection ends then (verify_token does not return it)."""
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.InvalidTokenError:
        return None
    return float(exp) if isinstance(exp, int | float) else None


async def refuse(websocket: WebSocket, refused: Refused) -> None:
    """Refuse the handshake with an HTTP answer (problem+json): 401, 403, 400, or 503 when the
    identity provider's keys cannot be fetched."""
    response = problem(refused.status, refused.detail, instance=PATH)
    if refused.status == 401:
        response.headers["www-authenticate"] = "Bearer"
    for name, value in refused.headers.items():
        response.headers[name] = value
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:
        # A server without the denial-response extension: a close before accept is a 403.
        await websocket.close(4000 + refused.status, refused.detail)


class AlertsShortcut:
    """Plain ASGI: `/ws/admin` goes straight to `AdminAlerts.serve`, everything else on to the app.

    Each layer a websocket passes through (body limit, exception middleware, FastAPI's exit
    stack, the router, the route's wrappers) keeps its frame for the connection's whole life: a
    thousand admins on a replica is the expected load, and those layers do nothing for this one
    route (issue 6: ~5 KB an admin). Install it first among the app's own middleware.
    """

    def __init__(self, app: ASGIApp, alerts: AdminAlerts) -> None:
        self.app = app
        self.alerts = alerts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and _route_path(scope) == PATH:
            await self.alerts.serve(WebSocket(scope, receive, send))
            return
        await self.app(scope, receive, send)


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


# --- logs ---------------------------------------------------------------------------------------

_ACCESS_TOKEN = re.compile(r"(access_token=)[^&\s\"']+")


class _RedactAccessTokens(logging.Filter):
    """uvicorn logs each websocket's path with its query string: the token must not go along."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            isinstance(arg, str) and "access_token=" in arg for arg in record.args
        ):
            record.args = tuple(
                _ACCESS_TOKEN.sub(r"\1[redacted]", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        return True


def redact_access_tokens_in_server_logs() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _RedactAccessTokens) for f in logger.filters):
        logger.addFilter(_RedactAccessTokens())
