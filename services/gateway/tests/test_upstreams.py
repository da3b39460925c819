"""Forwarding to the services: an unreachable or slow service is a quick 503 or 504, never a
hang; callers cancelled at any point leak no connection; a POST is sent once; what goes on and
comes back is what the caller and the service wrote."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from multidict import CIMultiDict, CIMultiDictProxy
from starlette.responses import Response

from booking.devtools.fixtures import eventually
from booking.gateway.settings import GatewaySettings
from booking.gateway.upstreams import Answer, Service, Unanswered, Upstreams
from booking.runtime.auth import Role
from booking.runtime.transport import KEEPALIVE_EXPIRY_SECONDS

MENTOR_ID = "5d0c5b8e-7d0a-4a7e-9f57-1b1e1c7f2a01"
PROBLEM = "application/problem+json"


class TestUnreachable:
    async def test_a_closed_port_is_a_quick_503_naming_the_service(self, start_system: Any) -> None:
        async with start_system(down={Service.PAYMENTS}) as system:
            started = time.monotonic()
            response = await system.client.get("/api/payments/webhook?payment_ref=p1")
            elapsed = time.monotonic() - started

        assert response.status_code == 503
        assert response.headers["content-type"] == PROBLEM
        assert "payments service cannot be reached" in response.json()["detail"]
        # Refused at once: not held for the upstream timeout (10 s by default).
        assert elapsed < system.settings.upstream_timeout_seconds / 2

    async def test_the_other_services_keep_working(self, start_system: Any) -> None:
        async with start_system(down={Service.PAYMENTS, Service.CALENDAR}) as system:
            admin = system.auth(Role.ADMIN)
            mentor = await system.client.get(f"/api/mentors/{MENTOR_ID}", headers=admin)
            feed = await system.client.get("/api/admin/notifications", headers=admin)
            calendar = await system.client.get(f"/api/mentors/{MENTOR_ID}/calendar", headers=admin)

        assert (mentor.status_code, feed.status_code) == (200, 200)
        assert calendar.status_code == 503
        assert "calendar" in calendar.json()["detail"]


class TestSlow:
    async def test_a_service_slower_than_the_timeout_is_a_504_within_the_bound(
        self, start_system: Any
    ) -> None:
        async with start_system(upstream_timeout_seconds=0.3) as system:
            system.upstreams[Service.ORDERS].delay = 30
            started = time.monotonic()
            response = await system.client.get(
                f"/api/mentors/{MENTOR_ID}", headers=system.auth(Role.ADMIN)
            )
            elapsed = time.monotonic() - started
            system.upstreams[Service.ORDERS].delay = 0
            after = await system.client.get(
                f"/api/mentors/{MENTOR_ID}", headers=system.auth(Role.ADMIN)
            )

        assert response.status_code == 504
        assert response.headers["content-type"] == PROBLEM
        assert "orders service did not answer within 0.3s" in response.json()["detail"]
        assert 0.3 <= elapsed < 10  # given up at its timeout, not after the service's 30 s
        assert after.status_code == 200


class TestServiceErrors:
    async def test_a_service_crash_is_a_502_problem_without_its_body(self, system: Any) -> None:
        system.upstreams[Service.NOTIFICATIONS].answer = lambda _: PlainTextResponse(
            "Traceback (most recent call last): secret stuff", 500
        )
        response = await system.client.get(
            "/api/admin/notifications", headers=system.auth(Role.ADMIN)
        )

        assert response.status_code == 502
        assert response.headers["content-type"] == PROBLEM
        assert "notifications service failed (500)" in response.json()["detail"]
        assert "Traceback" not in response.text

    async def test_a_services_own_503_problem_passes_as_it_is(self, system: Any) -> None:
        problem = {"title": "Service Unavailable", "status": 503, "detail": "Konnect is down"}
        system.upstreams[Service.PAYMENTS].answer = lambda _: JSONResponse(
            problem, 503, media_type=PROBLEM, headers={"Retry-After": "30"}
        )
        response = await system.client.get("/api/payments/webhook?payment_ref=p1")

        assert response.status_code == 503
        assert response.json() == problem
        assert response.headers["retry-after"] == "30"


# --- the hop itself, against a service on a bare socket ----------------------------------------


OK_BODY = b'{"ok": true}'


@dataclass
class RawService:
    """A service on a bare socket, so that a test decides every byte of its answer: after
    `delay` (else a random 0-10 ms), `answer`, its body a few ms after its head; the connection
    closed after it when `close`. Keeps the head of every request it read and counts the
    connections made to it."""

    delay: float = 0.0
    answer: bytes = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n" + OK_BODY
    )
    close: bool = False
    heads: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(Exception):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                if length := re.search(rb"(?i)\r\ncontent-length: *(\d+)", head):
                    await reader.readexactly(int(length[1]))
                await asyncio.sleep(self.delay or random.uniform(0, 0.01))
                # The body a moment after the head: a caller may be cut short while it reads.
                head, blank, body = self.answer.partition(b"\r\n\r\n")
                writer.write(head + blank)
                if body:
                    await writer.drain()
                    await asyncio.sleep(random.uniform(0, 0.005))
                    writer.write(body)
                await writer.drain()
                if self.close:
                    break
        writer.close()

    def cookies_sent(self) -> list[bytes]:
        return [head for head in self.heads if b"\r\ncookie:" in head.lower()]


@pytest.fixture
async def service() -> AsyncIterator[RawService]:
    state = RawService()
    listening = await asyncio.start_server(state.serve, "127.0.0.1", 0)
    state.port = listening.sockets[0].getsockname()[1]
    yield state
    listening.close()


@pytest.fixture
def upstreams(
    service: RawService, gateway_settings: Callable[..., GatewaySettings]
) -> Callable[..., Any]:
    """`async with upstreams(upstream_max_connections=2) as up:` the orders pool on `service`."""

    def open_(host: str = "127.0.0.1", **overrides: Any) -> Any:
        url = f"http://{host}:{service.port}/orders"
        return Upstreams.open(gateway_settings(orders_url=url, **overrides))

    return open_


def caller(
    method: str = "GET",
    target: bytes = b"/api/x",
    body: bytes = b"",
    content_type: bytes | None = b"application/json",
) -> Request:
    """A request as the gateway received it, to be sent on."""
    path, _, query = target.partition(b"?")
    headers = [(b"authorization", b"Bearer t")]
    if body:
        headers.append((b"content-length", str(len(body)).encode()))
        if content_type is not None:
            headers.append((b"content-type", content_type))

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": method,
        "path": path.decode(),
        "raw_path": path,
        "query_string": query,
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "app": FastAPI(),
    }
    return Request(scope, receive)


async def unanswered(up: Upstreams, request: Request) -> Response:
    with pytest.raises(Unanswered) as failed:
        await up.send(request, Service.ORDERS)
    return failed.value.problem


class TestCancelledCallers:
    async def test_callers_cancelled_at_random_points_leave_every_connection_usable(
        self, service: RawService, upstreams: Callable[..., Any]
    ) -> None:
        async with upstreams(
            upstream_max_connections=4, upstream_connect_timeout_seconds=0.5
        ) as up:
            loop = asyncio.get_running_loop()
            end = loop.time() + 1.5

            async def churn(method: str) -> None:
                # Cut short anywhere: waiting for a slot, connecting, sending, reading.
                while loop.time() < end:
                    body = b'{"n": 1}' if method == "POST" else b""
                    sending = asyncio.ensure_future(
                        up.send(caller(method, body=body), Service.ORDERS)
                    )
                    await asyncio.sleep(random.uniform(0, 0.004))
                    sending.cancel()
                    with contextlib.suppress(BaseException):
                        await sending

            await asyncio.gather(*(churn(("GET", "POST")[n % 2]) for n in range(12)))

            # Every one of the 4 connections at once: a slot lost to a cancelled caller would
            # leave one of these waiting for it, then answered 503.
            service.delay = 0.2
            answers = await asyncio.gather(*(up.send(caller(), Service.ORDERS) for _ in range(4)))

        assert [a.status_code for a in answers] == [200] * 4
        assert answers[0].json() == {"ok": True}

    async def test_callers_cancelled_while_waiting_for_a_connection_take_none(
        self, service: RawService, upstreams: Callable[..., Any]
    ) -> None:
        service.delay = 0.3
        async with upstreams(upstream_max_connections=2, upstream_connect_timeout_seconds=2) as up:
            holding = [asyncio.ensure_future(up.send(caller(), Service.ORDERS)) for _ in range(2)]
            waiting = [asyncio.ensure_future(up.send(caller(), Service.ORDERS)) for _ in range(6)]
            await eventually(lambda: len(service.heads) == 2)
            for waiter in waiting:
                waiter.cancel()
            assert [(await h).status_code for h in holding] == [200, 200]
            answers = await asyncio.gather(*(up.send(caller(), Service.ORDERS) for _ in range(2)))

        assert [a.status_code for a in answers] == [200, 200]
        assert all(w.cancelled() for w in waiting)
        assert len(service.heads) == 4  # the cancelled waiters sent nothing

    async def test_a_caller_cancelled_mid_request_frees_its_connection_unreused(
        self, service: RawService, upstreams: Callable[..., Any]
    ) -> None:
        service.delay = 0.3
        async with upstreams(
            upstream_max_connections=1, upstream_connect_timeout_seconds=0.5
        ) as up:
            sending = asyncio.ensure_future(up.send(caller(), Service.ORDERS))
            await eventually(lambda: service.heads)
            sending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sending
            answer = await up.send(caller(), Service.ORDERS)

        assert answer.status_code == 200
        # The cut exchange's connection was closed, not pooled with its answer still unread.
        assert service.connections == 2


class TestFullPool:
    async def test_a_full_pool_is_a_503_after_the_connect_timeout_then_serves_again(
        self, service: RawService, upstreams: Callable[..., Any]
    ) -> None:
        service.delay = 1.0
        async with upstreams(
            upstream_max_connections=1, upstream_connect_timeout_seconds=0.2
        ) as up:
            holding = asyncio.ensure_future(up.send(caller(), Service.ORDERS))
            await eventually(lambda: service.heads)
            started = time.monotonic()
            refused = await unanswered(up, caller())
            waited = time.monotonic() - started
            assert (await holding).status_code == 200
            service.delay = 0.001
            after = await up.send(caller(), Service.ORDERS)

        assert refused.status_code == 503
        assert b"no free connection to the orders service" in refused.body
        assert 0.2 <= waited < 0.9  # the connect timeout, not the holder's whole second
        assert after.status_code == 200


class TestConnections:
    async def test_a_connection_idle_past_the_expiry_is_not_sent_on_again(
        self, service: RawService, upstreams: Callable[..., Any]
    ) -> None:
        async with upstreams() as up:
            for _ in range(2):
                assert (await up.send(caller(), Service.ORDERS)).status_code == 200
            assert service.connections == 1  # reused while fresh
            # Idle past the expiry (under the services' 5 s keep-alive): the subject of the
            # test, not a wait for something to happen.
            await asyncio.sleep(KEEPALIVE_EXPIRY_SECONDS + 0.3)
            assert (await up.send(caller(), Service.ORDERS)).status_code == 200

        assert service.connections == 2

    async def test_a_post_the_service_drops_unanswered_is_sent_once_and_answered_502(
        self, service: RawService, upstreams: Callable[..., Any]
    ) -> None:
        async with upstreams() as up:
            assert (await up.send(caller(), Service.ORDERS)).status_code == 200
            # On that kept-alive connection, the service now closes without answering.
            service.answer, service.close = b"", True
            problem = await unanswered(up, caller("POST", body=b'{"n": 1}'))

        assert problem.status_code == 502
        assert b"the orders service gave no valid answer" in problem.body
        assert [h.split(b" ", 1)[0] for h in service.heads] == [b"GET", b"POST"]

    async def test_no_cookie_a_service_sets_is_sent_for_anyone(
        self, service: RawService, upstreams: Callable[..., Any]
    ) -> None:
        service.answer = (
            b"HTTP/1.1 200 OK\r\nSet-Cookie: session=someone-elses\r\nContent-Length: 0\r\n\r\n"
        )
        # By name: a cookie jar keeps no cookie from an IP address anyway.
        async with upstreams(host="localhost") as up:
            for _ in range(2):
                await up.send(caller(), Service.ORDERS)

        assert len(service.heads) == 2
        assert service.cookies_sent() == []


class TestBrokenExchange:
    @pytest.mark.parametrize(
        "answer",
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",  # cut short
            b"nonsense\r\n\r\n",  # not HTTP at all
        ],
        ids=["cut_body", "not_http"],
    )
    async def test_is_a_502(
        self, service: RawService, upstreams: Callable[..., Any], answer: bytes
    ) -> None:
        service.answer, service.close = answer, True
        async with upstreams() as up:
            problem = await unanswered(up, caller("POST", body=b'{"n": 1}'))

        assert problem.status_code == 502
        assert b"the orders service gave no valid answer" in problem.body
        assert len(service.heads) == 1


class TestWhatGoesOnAndComesBack:
    async def test_the_path_and_query_reach_the_service_as_the_caller_encoded_them(
        self, service: RawService, upstreams: Callable[..., Any]
    ) -> None:
        target = b"/api/admin/dead-letters/payments%3A7?type=a%2Fb+c%20d&x=%C3%A9"
        async with upstreams() as up:
            await up.send(caller(target=target), Service.ORDERS)

        assert service.heads[0].startswith(b"GET /orders" + target + b" HTTP/1.1\r\n")

    async def test_a_body_the_caller_sent_without_a_type_goes_on_without_one(
        self, service: RawService, upstreams: Callable[..., Any]
    ) -> None:
        async with upstreams() as up:
            await up.send(caller("POST", body=b"{}", content_type=None), Service.ORDERS)

        head = service.heads[0].lower()
        assert b"\r\ncontent-length: 2\r\n" in head
        assert b"content-type" not in head

    async def test_a_header_the_service_repeated_comes_back_as_one(
        self, service: RawService, upstreams: Callable[..., Any]
    ) -> None:
        service.answer = (
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\n"
            b'WWW-Authenticate: Basic realm="x"\r\nContent-Length: 0\r\n\r\n'
        )
        async with upstreams() as up:
            response = await up.forward(caller(), Service.ORDERS)

        assert response.status_code == 401
        assert response.headers["www-authenticate"] == 'Bearer, Basic realm="x"'


class TestAnswer:
    def test_reads_as_json_and_as_text_in_the_charset_it_names(self) -> None:
        def answer(content_type: str, content: bytes) -> Answer:
            return Answer(
                200, CIMultiDictProxy(CIMultiDict({"content-type": content_type})), content
            )

        assert answer("application/json", b'{"a": [1]}').json() == {"a": [1]}
        assert answer("text/plain; charset=iso-8859-1", "é".encode("latin-1")).text == "é"
        assert answer("text/plain", "é".encode()).text == "é"  # UTF-8 when none is named
        assert answer("text/plain; charset=nonesuch", "é".encode()).text == "é"
