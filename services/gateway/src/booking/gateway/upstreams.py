"""Forwarding to the services behind the gateway: one pooled httpx client per service.

A request goes on at the same path with its query string, the caller's Authorization header,
the correlation id and the client's address (X-Forwarded-For, booking.gateway.forwarded); the
service's status, body and content type come back. Failures become problem+json: unreachable
503, too slow 504, a service's own 5xx 502 (a service's 503 problem+json passes as it is).
Every call is bounded in total time, so nothing hangs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from enum import StrEnum
from urllib.parse import urlencode

import httpx
from fastapi import Request
from starlette.responses import Response

from booking.gateway.forwarded import request_client
from booking.gateway.settings import GatewaySettings
from booking.runtime.context import current_correlation_id
from booking.runtime.problems import PROBLEM_MEDIA_TYPE, problem
from booking.runtime.transport import CancelSafeTransport

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


class Upstreams:
    def __init__(self, clients: dict[Service, httpx.AsyncClient], timeout: float) -> None:
        self.clients = clients
        self.timeout = timeout

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: GatewaySettings) -> AsyncIterator[Upstreams]:
        urls = service_urls(settings)
        total = settings.upstream_timeout_seconds
        connect = min(settings.upstream_connect_timeout_seconds, total)
        timeout = httpx.Timeout(total, connect=connect)
        async with AsyncExitStack() as stack:
            clients = {
                service: await stack.enter_async_context(
                    httpx.AsyncClient(
                        base_url=url.rstrip("/"),
                        timeout=timeout,
                        transport=CancelSafeTransport(
                            settings.upstream_max_connections,
                            settings.upstream_max_keepalive_connections,
                        ),
                        follow_redirects=False,  # a 302 to Google is the answer, not a hop
                        trust_env=False,
                    )
                )
                for service, url in urls.items()
            }
            yield cls(clients, total)

    async def forward(
        self, request: Request, service: Service, *, content: bytes | None = None
    ) -> Response:
        """Send `request` on to `service` as it came (or with `content`, JSON, as its body)."""
        try:
            upstream = await self.send(request, service, content=content)
        except Unanswered as failed:
            return failed.problem
        return _pass_back(upstream, service)

    async def send(
        self,
        request: Request,
        service: Service,
        *,
        content: bytes | None = None,
        query: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """`request` sent on to `service` (with `content`, JSON, as its body and `query` as its
        query string when given): the service's answer, whatever its status.

        Raises Unanswered, with the problem to answer, when the service cannot be reached, does
        not answer in time, or breaks the exchange.
        """
        client = self.clients[service]
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
        target = client.base_url.copy_with(
            raw_path=client.base_url.raw_path.rstrip(b"/") + _raw_path_and_query(request, query)
        )
        try:
            # httpx's read timeout is per chunk; this bounds the whole exchange.
            async with asyncio.timeout(self.timeout):
                return await client.request(
                    request.method, target, headers=headers, content=content
                )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
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
        except httpx.PoolTimeout:
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
        except (TimeoutError, httpx.TimeoutException):
            log.warning("%s did not answer within %ss", service, self.timeout)
            raise Unanswered(
                service,
                problem(
                    504,
                    f"the {service} service did not answer within {self.timeout:g}s",
                    service=str(service),
                ),
            ) from None
        except httpx.HTTPError as exc:
            log.warning("%s broke the exchange: %r", service, exc)
            raise Unanswered(
                service,
                problem(502, f"the {service} service gave no valid answer", service=str(service)),
            ) from None


class Unanswered(Exception):
    """A service gave no answer to pass on; `problem` is what the caller is answered instead."""

    def __init__(self, service: Service, problem: Response) -> None:
        super().__init__(f"{service}: {problem.status_code}")
        self.service = service
        self.problem = problem


def _raw_path_and_query(request: Request, query: Mapping[str, str] | None = None) -> bytes:
    # The raw path, so percent-encoding reaches the service exactly as the caller wrote it.
    raw = request.scope.get("raw_path") or request.url.path.encode()
    given = request.scope.get("query_string", b"") if query is None else urlencode(query).encode()
    return raw + (b"?" + given if given else b"")


def failed_service(upstream: httpx.Response) -> bool:
    """A 5xx: the service failed (its own 503 problem+json included: it is not answering)."""
    return upstream.status_code >= 500


def failure_problem(upstream: httpx.Response, service: Service) -> Response:
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


def _pass_back(upstream: httpx.Response, service: Service) -> Response:
    if failed_service(upstream):
        return failure_problem(upstream, service)
    return passed_back(upstream)


def passed_back(upstream: httpx.Response) -> Response:
    """The service's answer as the caller gets it: status, body and the headers that matter."""
    headers = {
        name: value
        for name in RETURNED_RESPONSE_HEADERS
        if (value := upstream.headers.get(name)) is not None
    }
    return Response(upstream.content, status_code=upstream.status_code, headers=headers)
