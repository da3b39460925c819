"""One admin's websocket: a bounded send queue drained by its own writer, a reader for the
client's messages, pings, and the resume (replay, then live with no gap and no duplicate).

The feed calls `offer()` for each alert and never waits: the frame goes into this connection's
send queue, or, when the queue is full (the client does not read fast enough), the connection is
closed with 4408 and the reason. Only this connection's writer ever awaits its socket.

Resume, and the start of every connection, work the same way: while the connection is not live,
the alerts the feed offers wait in `pending`; the replay (or the hello) is sent; then `pending` is
drained, skipping what was already sent, and the connection goes live. Draining and going live
are one synchronous step once `pending` is empty, so nothing slips between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass

from starlette.websockets import WebSocket, WebSocketDisconnect

from booking.gateway.alerts import frames
from booking.gateway.alerts.feed import HISTORY, AlertFeed
from booking.gateway.alerts.frames import Alert, BadMessage, Ping, Resume, Sent
from booking.gateway.alerts.notifications import Notifications, NotificationsUnavailable

log = logging.getLogger(__name__)

TOO_SLOW = 4408
"""Close code for a client that did not keep up: its send queue filled, or no pong came."""
TOKEN_EXPIRED = 4401
GOING_AWAY = 1001

REPLAY_MEMORY = 4096
"""While a replay runs, how many replayed ids it remembers to skip their live copies: the broker
can bring a notification after the replay read it from the store (the outbox relay lags)."""
RESUME_MEMORY = 128
"""Once live again, how many of them are still remembered: only the newest can still come late."""

CLOSE_REASON_BYTES = 123  # what a close frame can carry


@dataclass(frozen=True)
class Policy:
    queue_size: int
    ping_interval: float
    ping_timeout: float
    close_timeout: float = 5.0  # how long a dropped client's close frame may wait its turn


class SendQueue:
    """A bounded FIFO of frames. `offer` never waits (False when full); `put` waits while the
    queue holds `limit` frames or more, so a replay leaves room for pings and errors."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._frames: deque[str] = deque()
        self._nonempty = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return len(self._frames)

    def offer(self, frame: str) -> bool:
        if len(self._frames) >= self.capacity:
            return False
        self._frames.append(frame)
        self._nonempty.set()
        return True

    async def put(self, frame: str, *, limit: int) -> None:
        while len(self._frames) >= limit:
            self._room.clear()
            await self._room.wait()
        self._frames.append(frame)
        self._nonempty.set()

    async def get(self) -> str:
        while not self._frames:
            self._nonempty.clear()
            await self._nonempty.wait()
        frame = self._frames.popleft()
        self._room.set()
        return frame


class AdminConnection:
    def __init__(
        self,
        websocket: WebSocket,
        *,
        sub: str,
        token: str,
        expires_at: float | None,
        feed: AlertFeed,
        notifications: Notifications,
        policy: Policy,
    ) -> None:
        self.websocket = websocket
        self.sub = sub
        self.token = token
        self.expires_at = expires_at
        self.feed = feed
        self.notifications = notifications
        self.policy = policy
        self.queue = SendQueue(policy.queue_size)
        # Replay frames fill the queue only halfway: the rest is for live alerts, pings, errors.
        self.replay_limit = max(1, policy.queue_size // 2)
        self.live = False
        self.since = 0  # the feed's seq when this connection subscribed (set by the feed)
        self.pending: deque[Alert] = deque()
        self.replayed: Sent | None = None  # after a resume: the newest of what replays sent
        self.commands: asyncio.Queue[Resume] = asyncio.Queue()
        self.resuming = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed = asyncio.Event()  # asked to end
        self.finished = asyncio.Event()  # ended, and no longer in the feed
        self.client_gone = False
        self._heard = asyncio.Event()

    # --- called by the feed (never awaits) ----------------------------------------------------

    def offer(self, alert: Alert) -> None:
        if self.closed.is_set():
            return
        if not self.live:
            if len(self.pending) >= self.policy.queue_size:
                self.close(
                    TOO_SLOW,
                    f"more than {self.policy.queue_size} alerts waited while catching up; "
                    "resume from your last id",
                )
                return
            self.pending.append(alert)
            return
        if self.replayed is not None and not self.replayed.is_news(alert):
            return  # a replay sent it (or a newer count) already
        if not self.queue.offer(alert.frame):
            self.close(
                TOO_SLOW,
                f"too slow: {self.policy.queue_size} frames unread; reconnect and resume "
                "from your last id",
            )

    def close(self, code: int, reason: str) -> None:
        """Ask for this connection to end (the first reason wins); `run` does the closing.

        It leaves the feed at once: its close frame may have to wait behind what it has not read.
        """
        if not self.closed.is_set():
            self.close_code, self.close_reason = code, reason
            self.closed.set()
            self.feed.unsubscribe(self)

    # --- the connection's life ----------------------------------------------------------------

    async def run(self, *, after_id: int | None) -> None:
        """Serve until the client leaves or is dropped. The feed must already include this
        connection (not live): whatever arrives from now on is in `pending`."""
        if after_id is not None:
            self.commands.put_nowait(Resume(after_id))
        tasks = [
            asyncio.create_task(self._write(), name=f"admin-ws-write-{self.sub}"),
            asyncio.create_task(self._read(), name=f"admin-ws-read-{self.sub}"),
            asyncio.create_task(self._keep_alive(), name=f"admin-ws-ping-{self.sub}"),
            asyncio.create_task(self._control(), name=f"admin-ws-control-{self.sub}"),
        ]
        for task in tasks:
            task.add_done_callback(self._ended)
        try:
            await self.closed.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._close_socket()

    def _ended(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, WebSocketDisconnect):
            log.error("admin websocket of %s: %s failed", self.sub, task.get_name(), exc_info=exc)
            self.close(1011, "internal error")
        self.close(1000, "")  # a task only ends by itself when the client has gone

    async def _close_socket(self) -> None:
        if self.client_gone:
            return
        code = self.close_code or 1000
        if code == TOO_SLOW:
            log.warning("admin websocket of %s dropped: %s", self.sub, self.close_reason)
        # The close frame queues behind what the client has not read; a client that never reads
        # again is left to the server's own close timeout.
        reason = self.close_reason.encode()[:CLOSE_REASON_BYTES].decode(errors="ignore")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.websocket.close(code, reason), self.policy.close_timeout)

    async def _write(self) -> None:
        while True:
            frame = await self.queue.get()
            try:
                await self.websocket.send_text(frame)
            except (WebSocketDisconnect, RuntimeError, OSError):
                self.client_gone = True
                return

    async def _read(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                self.client_gone = True
                return
            self._heard.set()
            text = message.get("text")
            if text is None:
                self._reply(frames.error("bad_message", "messages are JSON text, not binary"))
                continue
            try:
                command = frames.parse_client_message(text)
            except BadMessage as exc:
                self._reply(frames.error("bad_message", str(exc)))
                continue
            if isinstance(command, Ping):
                self._reply(frames.PONG)
            elif isinstance(command, Resume):
                if self.resuming or not self.commands.empty():
                    self._reply(frames.error("resume_busy", "a resume is running; wait for it"))
                else:
                    self.commands.put_nowait(command)
            # Pong: hearing from the client is all a pong is for.

    def _reply(self, frame: str) -> None:
        if not self.queue.offer(frame):
            self.close(TOO_SLOW, f"too slow: {self.policy.queue_size} frames unread")

    async def _keep_alive(self) -> None:
        interval, timeout = self.policy.ping_interval, self.policy.ping_timeout
        while True:
            await asyncio.sleep(self._until_expiry(interval))
            if self.expires_at is not None and time.time() >= self.expires_at:
                self.close(TOKEN_EXPIRED, "the token has expired; connect again with a new one")
                return
            self._heard.clear()
            self._reply(frames.PING)
            try:
                await asyncio.wait_for(self._heard.wait(), self._until_expiry(timeout))
            except TimeoutError:
                if self.expires_at is None or time.time() < self.expires_at:
                    self.close(TOO_SLOW, f"no answer to a ping within {timeout:g}s")
                    return

    def _until_expiry(self, seconds: float) -> float:
        if self.expires_at is None:
            return seconds
        return max(0.0, min(seconds, self.expires_at - time.time()))

    # --- hello, resume, going live --------------------------------------------------------------

    async def _control(self) -> None:
        await self._hello()
        while True:
            if self.commands.empty():
                await self._go_live()
            command = await self.commands.get()
            await self._resume(command.after_id)

    async def _hello(self) -> None:
        try:
            last_id: int | None = await self.notifications.newest_id(self.token)
        except (NotificationsUnavailable, ValueError) as exc:
            log.warning("admin websocket hello without last_id: %s", exc)
            last_id = None
        await self.queue.put(frames.hello(last_id), limit=self.queue.capacity)

    async def _resume(self, after_id: int) -> None:
        """Every notification after `after_id`, oldest first; then `_go_live`.

        What this connection was already sent (live, or by an earlier replay) is not sent again:
        a client that waited for the hello before resuming may have had a live one meanwhile.
        """
        self.resuming = True
        self.live = False  # from here the feed's alerts wait in `pending`
        already = Sent(limit=HISTORY + RESUME_MEMORY)
        if self.replayed is not None:
            already.extend(self.replayed)
        for alert in self.feed.sent_since(self.since):
            already.record(alert)
        sent = Sent(limit=REPLAY_MEMORY)
        sent.extend(already)  # oldest first: a long replay forgets these before its own
        self.replayed = sent
        count = 0
        try:
            async for page in self.notifications.after(self.token, after_id):
                for alert in page:
                    if alert.id > after_id and already.is_news(alert) and sent.take(alert):
                        await self.queue.put(alert.frame, limit=self.replay_limit)
                        count += 1
        except NotificationsUnavailable as exc:
            log.warning("admin websocket resume after %d of %s failed: %s", after_id, self.sub, exc)
            self._reply(
                frames.error(
                    "resume_failed",
                    f"notifications after {after_id} could not all be replayed ({exc}); "
                    f"{count} were sent. Live notifications continue; resume again later.",
                )
            )
        else:
            self._reply(frames.resumed(after_id, count))

    async def _go_live(self) -> None:
        replayed = self.replayed
        while self.pending:
            alert = self.pending.popleft()
            if replayed is None or replayed.take(alert):
                await self.queue.put(alert.frame, limit=self.queue.capacity)
        # `pending` is empty and nothing awaits from here on: no alert can fall between the two.
        self.live = True
        self.resuming = False
        if replayed is not None:
            replayed.trim(RESUME_MEMORY)
