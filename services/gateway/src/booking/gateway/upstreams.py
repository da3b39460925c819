"""Forwarding to the services behind the gateway: one pooled aiohttp session per service.

A request goes on at the same path with its query string, the caller's Authorization header,
the correlation id and the client's address (X-Forwarded-For, booking.gateway.forwarded); the
service's status, body and content type come back. Failures become problem+json: unreachable
503, no free connection 503, too slow 504, a broken exchange 502, a service's own 5xx 502 (a
service's 503 problem+json passes as it is). Every call is bounded in total time, so nothing
hangs.

This hop is on aiohttp, not httpx: the gateway forwards several requests per booking, and
aiohttp spends a fifth of httpx's CPU on each. The calls to Konnect and Google stay on httpx
(booking.runtime.outside). An answer is read whole (the services speak JSON) into an `Answer`.

A caller may be cancelled at any point (its client went away, a timeout): waiting for a slot is
an asyncio.Semaphore, and aiohttp closes a connection whose exchange was cut short rather than
pool it, so nothing is leaked (tests/test_upstreams.py churns cancelled callers to prove it).
aiohttp sends a request once; the one resend it makes on a kept-alive connection that the
service closed unanswered is for idempotent methods only, never a POST.

While tracing is on, each call is a CLIENT span whose `traceparent` goes with it, so the
service's spans join the gateway's trace (OpenTelemetry instruments httpx, not aiohttp).
"""

from __future__ import annotations

import asyncio
import email.message
import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlencode

import aiohttp
from fastapi import Request
from multidict import CIMultiDictProxy
from starlette.responses import Response
from yarl import URL

from booking.gateway.forwarded import request_client
from booking.gateway.settings import GatewaySettings
from booking.runtime import tracing
from booking.runtime.context import current_correlation_id
from booking.runtime.problems import PROBLEM_MEDIA_TYPE, problem
from booking.runtime.transport import KEEPALIVE_EXPIRY_SECONDS

log = logging.getLogger(__name__)


class Service(StrEnum):
    ORDERS = "orders"
    PAYMENTS = "payments"
    CALENDAR = "calendar"
    NOTIFICATIONS = "notifications"


FORWARDED_REQUEST_HEADERS = ("authorization", "accept", "content-type", "idempotency-key")
RETURNED_RESPONSE_HEADERS = (
    "content-type",
    "location",
    "retry-after",
    "cache-control",
    "www-authenticate",
)


def service_urls(settings: GatewaySettings) -> dict[Service, str]:
    """Where each service behind the gateway is, from the settings (ORDERS_URL, ...)."""
    return {
        Service.ORDERS: settings.orders_url,
        Service.PAYMENTS: settings.payments_url,
        Service.CALENDAR: settings.calendar_url,
        Service.NOTIFICATIONS: settings.notifications_url,
    }


class Answer:
    """A service's answer, read whole: its status, its headers (case-insensitive, as they came)
    and its body bytes (decompressed if the service compressed them)."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: CIMultiDictProxy[str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        """The body decoded by the charset its content type names, else as UTF-8."""
        header = email.message.Message()
        header["content-type"] = self.headers.get("content-type", "")
        try:
            return self.content.decode(header.get_content_charset("utf-8"), errors="replace")
        except LookupError:  # a charset Python does not know
            return self.content.decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class _Pool:
    """One service's connections: its base URL, its session, and the slots that admit requests
    (as many as the session's connections, so aiohttp itself never makes one wait)."""

    base: str
    session: aiohttp.ClientSession
    slots: asyncio.Semaphore


class Upstreams:
    def __init__(self, pools: dict[Service, _Pool], timeout: float, pool_timeout: float) -> None:
        self.pools = pools
        self.timeout = timeout
        self.pool_timeout = pool_timeout

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: GatewaySettings) -> AsyncIterator[Upstreams]:
        total = settings.upstream_timeout_seconds
        connect = min(settings.upstream_connect_timeout_seconds, total)
        size = settings.upstream_max_connections
        async with AsyncExitStack() as stack:
            pools = {}
            for service, url in service_urls(settings).items():
                session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(
                        limit=size,
                        # Under the services' own 5 s keep-alive, so no request races its close.
                        keepalive_timeout=KEEPALIVE_EXPIRY_SECONDS,
                    ),
                    # Making a connection; `send` bounds the whole exchange itself.
                    timeout=aiohttp.ClientTimeout(connect=connect),
                    cookie_jar=aiohttp.DummyCookieJar(),  # no caller's cookie reaches another
                    skip_auto_headers=("Content-Type",),  # no body type the caller did not send
                )
                await stack.enter_async_context(session)
                pools[service] = _Pool(url.rstrip("/"), session, asyncio.Semaphore(size))
            yield cls(pools, total, connect)

    async def forward(
        self, request: Request, service: Service, *, content: bytes | None = None
    ) -> Response:
        """Send `request` on to `service` as it came (or with `content`, JSON, as its body)."""
        try:
            upstream = await self.send(request, service, content=content)
        except Unanswered as failed:
            return failed.problem
        return pass_back(upstream, service)

    async def send(
        self,
        request: Request,
        service: Service,
        *,
        content: bytes | None = None,
        query: Mapping[str, str] | None = None,
    ) -> Answer:
        """`request` sent on to `service` (with `content`, JSON, as its body and `query` as its
        query string when given): the service's answer, whatever its status.

        Raises Unanswered, with the problem to answer, when the service cannot be reached, does
        not answer in time, or breaks the exchange.
        """
        headers = {
            name: value
            for name in FORWARDED_REQUEST_HEADERS
            if (value := request.headers.get(name)) is not None
        }
        headers["x-correlation-id"] = current_correlation_id()
        # The client as the gateway judged it, alone: the entries a client wrote itself are not
        # passed on for a service to believe.
        if (address := request_client(request)) is not None:
            headers["x-forwarded-for"] = str(address)
        if content is not None:
            headers["content-type"] = "application/json"  # a body the gateway checked and wrote
        elif request.method in ("POST", "PUT", "PATCH"):
            content = await request.body()
        target = _raw_path_and_query(request, query)
        return await self._exchange(service, request.method, target, headers, content)

    async def read(self, service: Service, path: str, *, token: str) -> Answer:
        """GET `path` from `service` with `token` as the bearer, on behalf of a caller but
        outside any request of theirs (an order stream reading its order again); raises
        Unanswered as `send` does."""
        headers = {
            "authorization": f"Bearer {token}",
            "accept": "application/json",
            "x-correlation-id": current_correlation_id(),
        }
        return await self._exchange(service, "GET", path, headers, None)

    async def _exchange(
        self,
        service: Service,
        method: str,
        target: str,
        headers: dict[str, str],
        content: bytes | None,
    ) -> Answer:
        pool = self.pools[service]
        url = URL(pool.base + target, encoded=True)  # the path's encoding kept as it is
        try:
            async with asyncio.timeout(self.timeout):
                await self._admit(pool.slots, service)
                try:
                    with tracing.outgoing(method, str(url), headers, peer=service) as span:
                        async with pool.session.request(
                            method,
                            url,
                            headers=headers,
                            data=content,
                            allow_redirects=False,  # a 302 to Google is the answer, not a hop
                        ) as answer:
                            if span is not None:
                                tracing.answered(span, answer.status)
                            return Answer(answer.status, answer.headers, await answer.read())
                finally:
                    pool.slots.release()
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            log.warning("%s unreachable: %r", service, exc)
            raise Unanswered(
                service,
                problem(
                    503,
                    f"the {service} service cannot be reached; try again shortly",
                    title="Service Unavailable",
                    service=str(service),
                ),
            ) from None
        except TimeoutError:
            log.warning("%s did not answer within %ss", service, self.timeout)
            raise Unanswered(
                service,
                problem(
                    504,
                    f"the {service} service did not answer within {self.timeout:g}s",
                    service=str(service),
                ),
            ) from None
        except aiohttp.ClientError as exc:
            log.warning("%s broke the exchange: %r", service, exc)
            raise Unanswered(
                service,
                problem(502, f"the {service} service gave no valid answer", service=str(service)),
            ) from None

    async def _admit(self, slots: asyncio.Semaphore, service: Service) -> None:
        """A slot for one request, waited for at most the pool timeout."""
        if not slots.locked():
            await slots.acquire()  # free: taken at once
            return
        try:
            async with asyncio.timeout(self.pool_timeout):
                await slots.acquire()
        except TimeoutError:
            log.warning("%s: no free connection in the pool", service)
            raise Unanswered(
                service,
                problem(
                    503,
                    f"the gateway has no free connection to the {service} service; "
                    "try again shortly",
                    service=str(service),
                ),
            ) from None


class Unanswered(Exception):
    """A service gave no answer to pass on; `problem` is what the caller is answered instead."""

    def __init__(self, service: Service, problem: Response) -> None:
        super().__init__(f"{service}: {problem.status_code}")
        self.service = service
        self.problem = problem


def _raw_path_and_query(request: Request, query: Mapping[str, str] | None = None) -> str:
    # The raw path, so percent-encoding reaches the service exactly as the caller wrote it
    # (ASCII: the server refuses any other byte in a request target).
    raw = request.scope.get("raw_path") or request.url.path.encode()
    given = request.scope.get("query_string", b"") if query is None else urlencode(query).encode()
    return (raw + (b"?" + given if given else b"")).decode("ascii")


def failed_service(upstream: Answer) -> bool:
    """A 5xx: the service failed (its own 503 problem+json included: it is not answering)."""
    return upstream.status_code >= 500


def failure_problem(upstream: Answer, service: Service) -> Response:
    """What the caller is answered for a service's 5xx: its own 503 problem+json (a database
    it cannot reach, with Retry-After) as it is; anything else a 502, its body kept out."""
    content_type = upstream.headers.get("content-type", "")
    if upstream.status_code == 503 and content_type.startswith(PROBLEM_MEDIA_TYPE):
        return passed_back(upstream)
    log.warning("%s answered %s", service, upstream.status_code)
    return problem(
        502,
        f"the {service} service failed ({upstream.status_code}); the error is in its logs",
        service=str(service),
    )


def pass_back(upstream: Answer, service: Service) -> Response:
    """What the caller is answered for `upstream`: a 5xx as `failure_problem`, the rest as
    it came (`passed_back`)."""
    if failed_service(upstream):
        return failure_problem(upstream, service)
    return passed_back(upstream)


def passed_back(upstream: Answer) -> Response:
    """The service's answer as the caller gets it: status, body and the headers that matter
    (a header the service repeated as one, its values joined)."""
    headers = {
        name: ", ".join(values)
        for name in RETURNED_RESPONSE_HEADERS
        if (values := upstream.headers.getall(name, ()))
    }
    return Response(upstream.content, status_code=upstream.status_code, headers=headers)
