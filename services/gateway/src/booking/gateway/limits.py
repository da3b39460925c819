"""What a caller may send: a body size limit (413), and a rate limit (429) on the routes that
need no token."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Hashable
from enum import StrEnum
from ipaddress import IPv6Address, IPv6Network

from fastapi import HTTPException, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from booking.gateway.forwarded import LOOPBACK, IPAddress, Networks, request_client, within
from booking.gateway.settings import GatewaySettings
from booking.runtime.problems import problem

DRAIN_FACTOR = 16


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: at once on its Content-Length, else while it streams in.

    The body (small by definition) is read here before the app sees it, so a chunked body that
    grows too large is refused before any route, validation or forwarding starts.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._drain(receive, more=message.get("more_body", False), size=size)
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _drain(self, receive: Receive, *, more: bool, size: int) -> None:
        """Read (and drop) the rest of a body a little over the limit, so that a client still
        sending gets the 413 rather than a reset connection; a far larger one is cut off."""
        while more and size <= DRAIN_FACTOR * self.max_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem(
            413,
            f"the request body is larger than the {self.max_bytes} bytes this API accepts",
            instance=scope.get("path"),
        )
        response.headers["connection"] = "close"  # the rest of the body is not read
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for the disconnect, as usual

    return replay


class RateLimiter:
    """At most `per_minute` requests per client in each clock minute (a fixed window); a client
    in `exempt` is not counted. An IPv6 client is counted by its /64, the block one host or site
    is given, so that cycling through its own addresses does not escape the limit.

    In-process, so the limit holds per gateway replica: n replicas let a client make up to
    n x per_minute. Memory is bounded: once `max_clients` clients are counted in a minute, every
    further one shares a single overflow count, so a flood of distinct addresses grows nothing
    and is held to `per_minute` as a whole. The clients already counted keep their own counts
    (none is evicted: a flood cannot reset anyone's count). Counts are dropped at each new window.
    """

    def __init__(
        self,
        per_minute: int,
        *,
        max_clients: int = 10_000,
        exempt: Networks = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_minute = per_minute
        self.max_clients = max_clients
        self.exempt = exempt
        self.clock = clock
        self._window = -1
        self._counts: dict[Hashable, int] = {}
        self._overflow = 0

    @property
    def tracked(self) -> int:
        """The clients counted on their own in this minute (at most `max_clients`)."""
        return len(self._counts)

    def retry_after(self, client: IPAddress | None) -> int | None:
        """Count one request from `client`; None if allowed, else seconds until it may retry."""
        if within(client, self.exempt):
            return None
        now = self.clock()
        window = int(now // 60)
        if window != self._window:
            self._window = window
            self._counts = {}
            self._overflow = 0
        key = _counted_as(client)
        if key in self._counts or len(self._counts) < self.max_clients:
            count = self._counts[key] = self._counts.get(key, 0) + 1
        else:
            self._overflow += 1
            count = self._overflow
        if count <= self.per_minute:
            return None
        return max(1, math.ceil((window + 1) * 60 - now))


def _counted_as(client: IPAddress | None) -> Hashable:
    if isinstance(client, IPv6Address):
        return IPv6Network((client, 64), strict=False)
    return client  # None (no IP peer) is one client


class Limit(StrEnum):
    """The unauthenticated routes' limits, each counted on its own."""

    WEBHOOK = "webhook"  # Konnect: a few addresses sending every payment's notification
    PUBLIC = "public"  # browsers: the OAuth callback


def rate_limiters(settings: GatewaySettings) -> dict[Limit, RateLimiter]:
    # Konnect's addresses send every payment's notification: never held back. Locally the
    # sandbox Konnect, the bench and the tests call from loopback.
    webhook_exempt = settings.konnect_webhook_sources
    if settings.development_mode:
        webhook_exempt += LOOPBACK
    max_clients = settings.rate_limit_max_clients
    return {
        Limit.WEBHOOK: RateLimiter(
            settings.webhook_rate_limit_per_minute, max_clients=max_clients, exempt=webhook_exempt
        ),
        Limit.PUBLIC: RateLimiter(settings.rate_limit_per_minute, max_clients=max_clients),
    }


def rate_limited(limit: Limit) -> Callable[[Request], Awaitable[None]]:
    """Dependency for an unauthenticated route: 429 with Retry-After past the client's limit."""

    async def dependency(request: Request) -> None:
        limiter: RateLimiter = request.app.state.rate_limiters[limit]
        client = request_client(request)
        wait = limiter.retry_after(client)
        if wait is not None:
            raise HTTPException(
                429,
                f"too many requests from {client or 'this client'}; "
                f"at most {limiter.per_minute} a minute. "
                f"Retry after {wait}s",
                headers={"Retry-After": str(wait)},
            )

    return dependency
