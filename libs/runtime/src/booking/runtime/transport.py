"""An httpx transport that a cancelled caller cannot break.

httpcore 1.0.9 (the last release httpx 0.28 uses) leaks a pool slot when a request is cancelled
while it waits for a connection, or just after the pool handed it a new one (encode/httpcore
#1093, #830; unfixed upstream). The pool times out waiting itself by cancellation, so under load
the leaked slots pile up until every later request gets PoolTimeout against a healthy server,
until the process restarts. Payments met exactly that after an overload.

`CancelSafeTransport` keeps both conditions away from the pool:
- no request ever waits inside the pool: a semaphore of the pool's size admits requests first,
  and waiting on a semaphore is safe to cancel (it answers `httpx.PoolTimeout` itself);
- no cancellation ever reaches httpcore: each admitted request runs in its own task, shielded,
  and reads its body there. A caller that gives up stops waiting; the request still ends within
  its own timeouts and gives its connection back.
The bodies are read whole, so this is for JSON APIs, not for streaming.

It also lets an idle connection go sooner than the server does. httpx keeps one 5 s, exactly
uvicorn's keep-alive timeout, so a request sent on a connection idle for nearly 5 s could meet
the server's close: "Server disconnected without sending a response" (the gateway answered 502
to a booking so under load). Two seconds leaves any server's usual 5 s or more a wide margin.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx

# How long an idle connection is kept: under the 5 s keep-alive of uvicorn (and most servers).
KEEPALIVE_EXPIRY_SECONDS = 2.0


class CancelSafeTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        max_connections: int = 100,
        max_keepalive_connections: int = 20,
        *,
        keepalive_expiry: float = KEEPALIVE_EXPIRY_SECONDS,
        inner: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`inner` (tests pass a MockTransport) defaults to httpx's own pool of that size."""
        self.max_connections = max_connections
        self._inner = inner or httpx.AsyncHTTPTransport(
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=min(max_keepalive_connections, max_connections),
                keepalive_expiry=keepalive_expiry,
            )
        )
        self._slots = asyncio.Semaphore(max_connections)
        self._sending: set[asyncio.Task[httpx.Response]] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        pool_timeout = request.extensions.get("timeout", {}).get("pool")
        try:
            async with asyncio.timeout(pool_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout(
                f"all {self.max_connections} connections stayed busy", request=request
            ) from None
        sending = asyncio.ensure_future(self._send(request))
        self._sending.add(sending)
        sending.add_done_callback(self._sent)
        return await asyncio.shield(sending)

    async def _send(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self._inner.handle_async_request(request)
            try:
                # The stream itself: the bytes as sent (still encoded as the headers say, for the
                # client to decode as usual), and readable even if a mock has read it already.
                stream = response.stream
                assert isinstance(stream, httpx.AsyncByteStream)
                body = b"".join([chunk async for chunk in stream])
            finally:
                await response.aclose()
            return httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=httpx.ByteStream(body),
                extensions=response.extensions,
            )
        finally:
            self._slots.release()

    def _sent(self, task: asyncio.Task[httpx.Response]) -> None:
        self._sending.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that gave up must not leave a warning behind

    async def aclose(self) -> None:
        for task in list(self._sending):
            task.cancel()
        for task in list(self._sending):
            with contextlib.suppress(BaseException):
                await task
        await self._inner.aclose()
