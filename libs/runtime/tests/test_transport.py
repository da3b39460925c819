"""CancelSafeTransport against a real HTTP server on loopback: cancelled callers, a full pool,
encoded bodies and closing. The churn test is the one that fails with httpx's own transport
(httpcore 1.0.9 leaks the slots and every later request gets PoolTimeout)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest

from booking.runtime.transport import CancelSafeTransport


@dataclass
class Server:
    """Answers every request after `delay` seconds; counts the requests it answered."""

    delay: float = 0.0
    answered: int = 0
    body: bytes = b'{"ok": true}'
    headers: dict[str, str] = field(default_factory=dict)
    port: int = 0
    connections: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(Exception):
            while True:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = await reader.read(4096)
                    if not chunk:
                        return
                    head += chunk
                await asyncio.sleep(self.delay or random.uniform(0, 0.01))
                extra = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
                writer.write(
                    f"HTTP/1.1 200 OK\r\nContent-Length: {len(self.body)}\r\n{extra}\r\n".encode()
                    + self.body
                )
                await writer.drain()
                self.answered += 1


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server()
    listening = await asyncio.start_server(state.serve, "127.0.0.1", 0)
    state.port = listening.sockets[0].getsockname()[1]
    yield state
    listening.close()


def client_of(server: Server, transport: httpx.AsyncBaseTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{server.port}",
        timeout=httpx.Timeout(2.0, pool=0.5),
        transport=transport,
        trust_env=False,
    )


async def test_callers_cancelled_under_contention_leave_every_connection_usable(server: Server):
    transport = CancelSafeTransport(4)
    async with client_of(server, transport) as client:
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.5

        async def churn() -> None:
            while loop.time() < end:
                request = asyncio.ensure_future(client.get("/"))
                await asyncio.sleep(random.uniform(0, 0.003))
                request.cancel()
                with contextlib.suppress(BaseException):
                    await request

        await asyncio.gather(*(churn() for _ in range(12)))

        answers = await asyncio.gather(*(client.get("/") for _ in range(8)))
        assert [a.status_code for a in answers] == [200] * 8
        assert answers[0].json() == {"ok": True}


async def test_a_caller_that_gives_up_lets_the_request_finish_and_free_its_slot(server: Server):
    server.delay = 0.3
    transport = CancelSafeTransport(1)
    async with client_of(server, transport) as client:
        abandoned = asyncio.ensure_future(client.get("/"))
        await asyncio.sleep(0.05)
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        server.delay = 0.001
        # The only slot is free again once the abandoned request has been answered.
        answer = await client.get("/", timeout=httpx.Timeout(2.0, pool=2.0))
        assert answer.status_code == 200
        assert server.answered == 2


async def test_a_full_pool_answers_pool_timeout_and_recovers(server: Server):
    server.delay = 1.0
    transport = CancelSafeTransport(2)
    async with client_of(server, transport) as client:
        busy = [asyncio.ensure_future(client.get("/")) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(httpx.PoolTimeout):
            await client.get("/", timeout=httpx.Timeout(2.0, pool=0.1))
        assert [(await b).status_code for b in busy] == [200, 200]
        server.delay = 0.001
        assert (await client.get("/")).status_code == 200


async def test_an_encoded_body_is_decoded_once(server: Server):
    server.body = gzip.compress(b'{"ok": "zipped"}')
    server.headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with client_of(server, CancelSafeTransport(2)) as client:
        answer = await client.get("/")
    assert answer.json() == {"ok": "zipped"}
    assert answer.headers["content-encoding"] == "gzip"


async def test_closing_stops_requests_still_running(server: Server):
    server.delay = 5.0
    transport = CancelSafeTransport(2)
    client = client_of(server, transport)
    pending = asyncio.ensure_future(client.get("/"))
    await asyncio.sleep(0.05)
    async with asyncio.timeout(2):
        await client.aclose()
    with pytest.raises((asyncio.CancelledError, httpx.HTTPError)):
        await pending
    assert server.answered == 0


async def test_a_mock_inner_transport_is_used_as_given():
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(201, json={"path": request.url.path})

    transport = CancelSafeTransport(1, inner=httpx.MockTransport(answer))
    async with httpx.AsyncClient(base_url="http://konnect.test", transport=transport) as client:
        answer_ = await client.post("/payments/init-payment", json={})
    assert answer_.status_code == 201
    assert answer_.json() == {"path": "/payments/init-payment"}
    assert seen == ["/payments/init-payment"]


async def test_a_connection_idle_past_its_expiry_is_not_sent_on_again(server: Server):
    # The server may close an idle connection at any moment past its own keep-alive timeout;
    # one idle longer than ours is never reused, so no request races that close.
    async with client_of(server, CancelSafeTransport(2, keepalive_expiry=0.2)) as client:
        assert (await client.get("/")).status_code == 200
        assert (await client.get("/")).status_code == 200
        assert server.connections == 1  # reused while fresh
        await asyncio.sleep(0.4)  # idle past the expiry: the subject of the test, not a wait
        assert (await client.get("/")).status_code == 200
        assert server.connections == 2
