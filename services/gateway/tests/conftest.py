"""The gateway served over real HTTP in front of recording stand-ins for the four services."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from booking.devtools.fixtures import free_port, serving
from booking.gateway.app import create_app
from booking.gateway.settings import GatewaySettings
from booking.gateway.upstreams import Service
from booking.runtime.auth import Role, issue_token
from booking.runtime.health import HealthResponse

MENTOR_ID = "5d0c5b8e-7d0a-4a7e-9f57-1b1e1c7f2a01"
ORDER_ID = "0b7e3f0e-3f5a-4a33-8d0e-2c6e4b9f1a03"
OFFERING_ID = "c2a1e4d6-9b8f-4f1e-8a3c-5d7e6f8a9b04"
SESSION_ID = "e4f5a6b7-c8d9-4e0f-a1b2-c3d4e5f6a705"
NOW = "2030-05-01T09:00:00Z"


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


def dead_letter(service: Service | str, number: int = 1, at: str = NOW, **fields: Any) -> dict:
    """A dead letter as `service` lists it."""
    return {
        "id": f"{service}:{number}",
        "service": str(service),
        "message_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{service}:{number}")),
        "type": "OrderPaid",
        "error": "ValueError: no such session",
        "attempts": 5,
        "dead_lettered_at": at,
        "status": "kept",
        **fields,
    }


def dead_letter_detail(service: Service | str, number: int = 1, **fields: Any) -> dict:
    """One dead letter as `service` shows it, with its envelope."""
    return {
        **dead_letter(service, number),
        "consumer": f"{service}.events",
        "reason": "retries_exhausted",
        "routing_key": "orders.order_paid",
        "envelope": {"type": "OrderPaid", "payload": {"order_id": ORDER_ID}},
        "body": None,
        "replayed_at": None,
        "discarded_at": None,
        "decided_by": None,
        "decision_reason": None,
        **fields,
    }


def valid_answer(method: str, path: str, service: Service | None = None) -> Response:
    """What the owning service would answer to a valid request: bodies that fit the contract."""
    money = {"amount": 120000, "currency": "TND"}
    mentor = {
        "id": MENTOR_ID,
        "name": "Amel",
        "email": "amel@example.com",
        "timezone": "UTC",
        "identity_subject": None,
    }
    offering = {
        "id": OFFERING_ID,
        "mentor_id": MENTOR_ID,
        "title": "Career chat",
        "duration_minutes": 60,
        "price": money,
    }
    connection = {
        "connected": True,
        "calendar_id": "primary",
        "connected_at": NOW,
        "revoked": False,
    }
    notification = {
        "id": 7,
        "type": "PaymentAnomaly",
        "severity": "Error",
        "title": "Amount mismatch",
        "message": "paid less than due",
        "metadata": {"order_id": ORDER_ID},
        "is_read": True,
        "read_at": NOW,
        "created_at": NOW,
        "fingerprint": "PaymentAnomaly:amount_mismatch:" + ORDER_ID,
        "occurrences": 1,
        "last_occurred_at": NOW,
    }
    order = {
        "id": ORDER_ID,
        "status": "confirmed",
        "amount": money,
        "amount_paid": money,
        "payment": {"ref": "pay-1", "pay_url": "https://pay.example/1", "status": "completed"},
        "session": {
            "id": SESSION_ID,
            "status": "scheduled",
            "start_at": NOW,
            "end_at": "2030-05-01T10:00:00Z",
            "meet_link": "https://meet.example/abc",
            "calendar_event_id": "evt1",
        },
        "escrow": {
            "platform_fee": {"amount": 18000, "currency": "TND"},
            "escrow_amount": {"amount": 102000, "currency": "TND"},
        },
        "version": 4,
    }
    escrow = {
        "order_id": ORDER_ID,
        "status": "frozen",
        "escrow_amount": {"amount": 102000, "currency": "TND"},
        "refund_amount": None,
        "reason": "order_cancelled",
        "reference": None,
        "release_due_at": None,
        "updated_at": NOW,
    }
    scheduling = {
        "session_id": SESSION_ID,
        "order_id": ORDER_ID,
        "status": "pending",
        "reason": None,
        "final": False,
        "attempts": 2,
        "next_attempt_at": None,
    }
    # A dead letter's number, from its id in the path (`/api/admin/dead-letters/payments:3`).
    number = int(m[1]) if (m := re.search(r":(\d+)(/|$)", path)) else 1
    uuid_ = "[^/]+"
    answers: list[tuple[str, str, Callable[[], Response]]] = [
        ("POST", "/api/mentors", lambda: JSONResponse(mentor, 201)),
        ("GET", f"/api/mentors/{uuid_}", lambda: JSONResponse(mentor)),
        (
            "PUT",
            f"/api/admin/mentors/{uuid_}/identity",
            lambda: JSONResponse({**mentor, "identity_subject": "auth0|amel"}),
        ),
        ("POST", f"/api/mentors/{uuid_}/offerings", lambda: JSONResponse(offering, 201)),
        ("GET", f"/api/mentors/{uuid_}/offerings", lambda: JSONResponse([offering])),
        (
            "POST",
            "/api/bookings",
            lambda: JSONResponse(
                {"order_id": ORDER_ID, "session_id": SESSION_ID, "status": "pending"}, 202
            ),
        ),
        ("GET", f"/api/orders/{uuid_}", lambda: JSONResponse(order)),
        (
            "GET",
            "/api/payments/webhook",
            lambda: JSONResponse({"payment_ref": "pay-1", "status": "completed"}),
        ),
        (
            "GET",
            f"/api/mentors/{uuid_}/calendar/connect",
            lambda: Response(status_code=302, headers={"location": "https://google.example/o"}),
        ),
        ("GET", "/api/calendar/oauth/callback", lambda: JSONResponse(connection)),
        ("GET", f"/api/mentors/{uuid_}/calendar", lambda: JSONResponse(connection)),
        ("DELETE", f"/api/mentors/{uuid_}/calendar", lambda: Response(status_code=204)),
        (
            "GET",
            "/api/admin/notifications",
            lambda: JSONResponse({"items": [notification], "next_cursor": None}),
        ),
        ("POST", "/api/admin/notifications/read-all", lambda: JSONResponse({"updated": 3})),
        (
            "GET",
            "/api/admin/notifications/summary",
            lambda: JSONResponse(
                {"days": 7, "counts": [{"day": "2030-05-01", "severity": "Error", "count": 2}]}
            ),
        ),
        ("POST", r"/api/admin/notifications/\d+/read", lambda: JSONResponse(notification)),
        ("DELETE", r"/api/admin/notifications/\d+", lambda: Response(status_code=204)),
        (
            "GET",
            "/api/admin/dead-letters",
            lambda: JSONResponse(
                {"items": [dead_letter(service or "orders")], "next_cursor": None}
            ),
        ),
        ("POST", "/api/admin/dead-letters/replay", lambda: JSONResponse({"replayed": 1})),
        (
            "GET",
            "/api/admin/dead-letters/[^/]+",
            lambda: JSONResponse(dead_letter_detail(service or "orders", number)),
        ),
        (
            "POST",
            "/api/admin/dead-letters/[^/]+/replay",
            lambda: JSONResponse(
                dead_letter_detail(service or "orders", number, status="replayed", replayed_at=NOW)
            ),
        ),
        (
            "POST",
            "/api/admin/dead-letters/[^/]+/discard",
            lambda: JSONResponse(
                dead_letter_detail(
                    service or "orders", number, status="discarded", discarded_at=NOW
                )
            ),
        ),
        (
            "POST",
            f"/api/admin/orders/{uuid_}/cancel",
            lambda: JSONResponse({**order, "status": "cancelled"}),
        ),
        (
            "POST",
            f"/api/admin/sessions/{uuid_}/retry-scheduling",
            lambda: JSONResponse(scheduling),
        ),
        ("GET", f"/api/admin/orders/{uuid_}/escrow", lambda: JSONResponse(escrow)),
        (
            "POST",
            f"/api/admin/orders/{uuid_}/escrow",
            lambda: JSONResponse({**escrow, "status": "released"}),
        ),
    ]
    for want_method, pattern, answer in answers:
        if method == want_method and re.fullmatch(pattern, path):
            return answer()
    return JSONResponse({"detail": f"no stand-in answer for {method} {path}"}, 404)


class RecordingUpstream:
    """A stand-in service: records every request and answers as the real one would."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.requests: list[Recorded] = []
        self.answer: Callable[[Recorded], Response] | None = None
        self.delay = 0.0
        self.released = asyncio.Event()  # set at teardown, so a slow answer ends at once

    async def record(self, request: Request) -> Response:
        prefix = f"/{self.service}".encode()
        recorded = Recorded(
            method=request.method,
            path=request.scope["raw_path"].removeprefix(prefix).decode(),
            query=request.scope["query_string"].decode(),
            headers=dict(request.headers),
            body=await request.body(),
        )
        self.requests.append(recorded)
        if self.delay:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.delay):
                    await self.released.wait()
        if self.answer is not None:
            return self.answer(recorded)
        return valid_answer(recorded.method, recorded.path, self.service)


def stand_in_app(upstreams: dict[Service, RecordingUpstream]) -> FastAPI:
    """One server for the four stand-ins, each under its own path prefix (`/orders/...`): one
    server starts and stops faster than four, and the gateway must keep a base URL's path."""
    app = FastAPI()

    # The gateway's health monitor asks each service for /health: that is not forwarded
    # traffic, so it is answered without being recorded.
    @app.get("/{service}/health")
    async def health(service: Service) -> Response:
        return HealthResponse({"status": "pass", "serviceId": str(service)})

    async def record(service: Service, path: str, request: Request) -> Response:
        return await upstreams[service].record(request)

    app.add_api_route(
        "/{service}/{path:path}", record, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]
    )
    return app


@dataclass
class System:
    url: str
    settings: GatewaySettings
    upstreams: dict[Service, RecordingUpstream]
    app: FastAPI
    client: httpx.AsyncClient = field(init=False)
    peers: dict[str, httpx.AsyncClient] = field(default_factory=dict)

    def peer(self, address: str) -> httpx.AsyncClient:
        """A client reaching the served gateway in-process, connected (as the ASGI scope's
        `client` says) from `address`: the real server's peer is always loopback."""
        if address not in self.peers:
            transport = httpx.ASGITransport(self.app, client=(address, 40000))
            self.peers[address] = httpx.AsyncClient(transport=transport, base_url="http://gateway")
        return self.peers[address]

    async def close_peers(self) -> None:
        for client in self.peers.values():
            await client.aclose()

    def token(self, role: Role | str, sub: str | None = None, **kwargs: Any) -> str:
        secret = self.settings.auth_jwt_secret.get_secret_value()
        return issue_token(secret, sub or f"{role}-{uuid.uuid4().hex[:6]}", role, **kwargs)

    def auth(self, role: Role | str, sub: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role, sub)}"}

    def forget(self) -> None:
        for upstream in self.upstreams.values():
            upstream.requests.clear()

    def received(self) -> dict[Service, list[Recorded]]:
        return {s: list(u.requests) for s, u in self.upstreams.items() if u.requests}


@contextlib.asynccontextmanager
async def run_system(
    settings: GatewaySettings, down: frozenset[Service] = frozenset()
) -> AsyncIterator[System]:
    """Stand-ins for the services (none listening for those in `down`) and the gateway."""
    upstreams = {service: RecordingUpstream(service) for service in Service}
    async with contextlib.AsyncExitStack() as stack:
        base = await stack.enter_async_context(serving(stand_in_app(upstreams)))
        urls = {}
        for service, upstream in upstreams.items():
            stack.callback(upstream.released.set)
            closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
            urls[f"{service}_url"] = closed if service in down else f"{base}/{service}"
        settings = settings.model_copy(update=urls)
        app = create_app(settings)
        url = await stack.enter_async_context(serving(app))
        system = System(url, settings, upstreams, app)
        stack.push_async_callback(system.close_peers)
        system.client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=url, timeout=10, trust_env=False)
        )
        yield system


@pytest.fixture
def gateway_settings(make_settings: Callable[..., Any]) -> Callable[..., GatewaySettings]:
    def build(**overrides: Any) -> GatewaySettings:
        return make_settings(GatewaySettings, **overrides)

    return build


@pytest.fixture
async def system(gateway_settings: Callable[..., GatewaySettings]) -> AsyncIterator[System]:
    async with run_system(gateway_settings()) as system:
        yield system


@pytest.fixture
def start_system(gateway_settings: Callable[..., GatewaySettings]) -> Callable[..., Any]:
    """`async with start_system(down={Service.PAYMENTS}, max_body_bytes=10) as system: ...`"""

    def start(down: set[Service] | frozenset[Service] = frozenset(), **overrides: Any):
        return run_system(gateway_settings(**overrides), frozenset(down))

    return start


@pytest.fixture
def system_in_thread(gateway_settings: Callable[..., GatewaySettings]) -> Iterator[str]:
    """The system served from a thread with its own event loop, for synchronous clients
    (schemathesis); yields the gateway's URL."""
    settings = gateway_settings(
        rate_limit_per_minute=100_000, webhook_rate_limit_per_minute=100_000
    )
    # What schemathesis imports on the first document it loads, loaded before the system's
    # thread runs: CPython 3.11's compiler is not safe against two threads compiling at once
    # ("AST constructor recursion depth mismatch", seen under load).
    importlib.import_module("schemathesis.specs.openapi.schemas")
    started: Future[str] = Future()
    stop = threading.Event()

    async def run() -> None:
        try:
            async with run_system(settings) as system:
                started.set_result(system.url)
                await asyncio.to_thread(stop.wait)
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            raise

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    try:
        yield started.result(timeout=20)
    finally:
        stop.set()
        thread.join(timeout=20)
