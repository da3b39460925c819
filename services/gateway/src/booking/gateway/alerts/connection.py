"""One admin's websocket: a bounded send queue drained by its own writer, a reader for the
client's messages, pings, and the resume (replay, then live with no gap and no duplicate).

The feed calls `offer()` for each alert and never waits: the frame goes into this connection's
send queue, or, when the queue is full (the client does not read fast enough), the connection is
closed with 4408 and the reason. Only this connection's writer ever awaits its socket.

Resume, and the start of every connection, work the same way: while the connection is not live,
the alerts the feed offers wait in `pending`; the hello (and the replay) are sent; then `pending`
is drained, skipping what was already sent, and the connection goes live. Going live happens
once `pending` is empty, with nothing awaited in between, so no alert slips between the two.

An idle connection costs two tasks (reader, writer) and a few timers: a thousand admins on a
replica is the expected load, so nothing here is allocated before it is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
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


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class SendQueue:
    """A bounded FIFO of frames for one writer. `offer` never waits (False when full); `put`
    (one caller at a time) waits while `limit` frames or more are queued, so that a replay
    leaves room for pings and errors.

    A list, not a deque: the queue is almost always empty, and an empty deque holds a 64-slot
    block (~600 bytes, for every admin); popping the front of a few hundred is cheap."""

    __slots__ = ("_frames", "_getter", "_putter", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._frames: list[str] = []
        self._getter: asyncio.Future[None] | None = None
        self._putter: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._frames)

    def offer(self, frame: str) -> bool:
        if len(self._frames) >= self.capacity:
            return False
        self._frames.append(frame)
        _wake(self._getter)
        return True

    async def put(self, frame: str, *, limit: int) -> None:
        while len(self._frames) >= limit:
            self._putter = asyncio.get_running_loop().create_future()
            await self._putter
        self._frames.append(frame)
        _wake(self._getter)

    async def get(self) -> str:
        while not self._frames:
            self._getter = asyncio.get_running_loop().create_future()
            await self._getter
        frame = self._frames.pop(0)
        _wake(self._putter)
        return frame


class AdminConnection:
    __slots__ = (
        "_closed",
        "_control",
        "_expiry_timer",
        "_finished",
        "_last_heard",
        "_resume_wanted",
        "_timers",
        "client_gone",
        "close_code",
        "close_reason",
        "expires_at",
        "feed",
        "last_id",
        "live",
        "notifications",
        "pending",
        "policy",
        "queue",
        "replay_limit",
        "replayed",
        "resuming",
        "since",
        "sub",
        "token",
        "websocket",
    )

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
        loop = asyncio.get_running_loop()
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
        self.pending: list[Alert] = []  # offered while not live
        self.replayed: Sent | None = None  # after a resume: the newest of what replays sent
        self.resuming = False
        self.last_id: int | None = None  # the highest id this client is known to have
        self.close_code: int | None = None
        self.close_reason = ""
        self.client_gone = False
        self._closed: asyncio.Future[None] = loop.create_future()  # asked to end
        self._finished: asyncio.Future[None] = loop.create_future()  # ended, out of the feed
        self._control: asyncio.Task | None = None  # hello, replays: only while catching up
        self._resume_wanted: int | None = None
        self._last_heard = loop.time()
        self._timers: list[asyncio.TimerHandle] = []
        self._expiry_timer = False  # scheduled once the token's end is within a ping interval

    # --- called by the feed (never awaits) ----------------------------------------------------

    def offer(self, alert: Alert) -> None:
        if self.close_code is not None:
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
            return
        self._sent(alert)

    def interrupted(self) -> None:
        """The feed missed what was published for a while: catch up from the last id sent."""
        if self.close_code is not None:
            return
        if self.last_id is None:
            self._reply(
                frames.error(
                    "feed_interrupted",
                    "the live feed was interrupted; resume from your last id to catch up",
                )
            )
            return
        self._want_resume(self.last_id, by_client=False)

    def _sent(self, alert: Alert) -> None:
        if self.last_id is None or alert.id > self.last_id:
            self.last_id = alert.id

    def close(self, code: int, reason: str) -> None:
        """Ask for this connection to end (the first reason wins); `run` does the closing.

        It leaves the feed at once: its close frame may have to wait behind what it has not read.
        """
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            _wake(self._closed)
            self.feed.unsubscribe(self)

    @property
    def finished(self) -> asyncio.Future[None]:
        """Done once the connection has ended."""
        return self._finished

    # --- the connection's life ----------------------------------------------------------------

    async def run(self, *, after_id: int | None) -> None:
        """Serve until the client leaves or is dropped. The feed must already include this
        connection (not live): whatever it offers from now on waits in `pending`."""
        self._resume_wanted = after_id
        tasks = [
            asyncio.create_task(self._write(), name=f"admin-ws-write-{self.sub}"),
            asyncio.create_task(self._read(), name=f"admin-ws-read-{self.sub}"),
        ]
        for task in tasks:
            task.add_done_callback(self._ended)
        self._catch_up(hello=True)
        self._start_timers()
        try:
            await self._closed
        finally:
            for timer in self._timers:
                timer.cancel()
            if self._control is not None:
                tasks.append(self._control)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._close_socket()
            _wake(self._finished)

    def _ended(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, WebSocketDisconnect):
            log.error("admin websocket of %s: %s failed", self.sub, task.get_name(), exc_info=exc)
            self.close(1011, "internal error")
        self.close(1000, "")  # the reader and writer end by themselves only when the client left

    async def _close_socket(self) -> None:
        if self.client_gone:
            return
        code = self.close_code or 1000
        if code == TOO_SLOW:
            log.warning("admin websocket of %s dropped: %s", self.sub, self.close_reason)
        # The close frame queues behind what the client has not read; a client that never reads
        # again is left to the server, which closes the connection when this handler returns.
        reason = self.close_reason.encode()[:CLOSE_REASON_BYTES].decode(errors="ignore")
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.policy.close_timeout):
                await self.websocket.close(code, reason)

    async def _write(self) -> None:
        while True:
            frame = await self.queue.get()
            try:
                await self.websocket.send_text(frame)
            except (WebSocketDisconnect, RuntimeError, OSError):
                self.client_gone = True
                return

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                self.client_gone = True
                return
            self._last_heard = loop.time()
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
                self._want_resume(command.after_id)
            # A pong: hearing from the client is all it is for.

    def _reply(self, frame: str) -> None:
        if self.close_code is None and not self.queue.offer(frame):
            self.close(TOO_SLOW, f"too slow: {self.policy.queue_size} frames unread")

    # --- pings and the token's end: timers, no task ---------------------------------------------

    def _start_timers(self) -> None:
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(self.policy.ping_interval, self._ping))
        self._watch_expiry()

    def _watch_expiry(self) -> None:
        # A token lives for an hour or more: rather than a timer per admin for all that time, each
        # ping looks whether the end falls before the next one, and only then sets the timer.
        if self.expires_at is None or self._expiry_timer:
            return
        left = self.expires_at - time.time()
        if left <= self.policy.ping_interval:
            self._expiry_timer = True
            self._timers.append(
                asyncio.get_running_loop().call_later(
                    max(0.0, left),
                    self.close,
                    TOKEN_EXPIRED,
                    "the token has expired; connect again with a new one",
                )
            )

    def _ping(self) -> None:
        if self.close_code is not None:
            return
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        self._reply(frames.PING)
        # Keep the list short: only the latest ping and pong timers matter.
        self._timers = [t for t in self._timers if not t.cancelled() and t.when() > sent_at]
        self._timers.append(loop.call_later(self.policy.ping_timeout, self._check_pong, sent_at))
        self._timers.append(loop.call_later(self.policy.ping_interval, self._ping))
        self._watch_expiry()

    def _check_pong(self, sent_at: float) -> None:
        # Any message from the client after the ping will do.
        if self._last_heard < sent_at:
            self.close(TOO_SLOW, f"no answer to a ping within {self.policy.ping_timeout:g}s")

    # --- hello, resume, going live --------------------------------------------------------------

    def _want_resume(self, after_id: int, *, by_client: bool = True) -> None:
        if self.resuming or self._resume_wanted is not None:
            if by_client:
                self._reply(frames.error("resume_busy", "a resume is running; wait for it"))
                return
            # The feed's own catch-up follows the running one, and goes back far enough.
            wanted = self._resume_wanted
            self._resume_wanted = after_id if wanted is None else min(wanted, after_id)
            return
        self._resume_wanted = after_id
        if self._control is None or self._control.done():
            self._catch_up(hello=False)
        # else: the hello is being prepared; the resume follows it, before anything live.

    def _catch_up(self, *, hello: bool) -> None:
        self._control = asyncio.create_task(
            self._catching_up(hello), name=f"admin-ws-catch-up-{self.sub}"
        )
        self._control.add_done_callback(self._ended_catching_up)

    def _ended_catching_up(self, task: asyncio.Task) -> None:
        if self._control is task:
            self._control = None  # not kept for the connection's life
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("admin websocket of %s: catching up failed", self.sub, exc_info=exc)
            self.close(1011, "internal error")

    async def _catching_up(self, hello: bool) -> None:
        if hello:
            await self._hello()
        while True:
            if self._resume_wanted is not None:
                after_id, self._resume_wanted = self._resume_wanted, None
                await self._resume(after_id)
            replayed = self.replayed
            while self.pending:
                alert = self.pending.pop(0)
                if replayed is None or replayed.take(alert):
                    await self.queue.put(alert.frame, limit=self.queue.capacity)
                    self._sent(alert)
            # Nothing was awaited since `pending` was last seen empty: no alert falls in between.
            if self._resume_wanted is None:
                self.live = True
                self.resuming = False
                if replayed is not None:
                    replayed.trim(RESUME_MEMORY)
                return

    async def _hello(self) -> None:
        try:
            last_id: int | None = await self.notifications.newest_id(self.token)
        except (NotificationsUnavailable, ValueError) as exc:
            log.warning("admin websocket hello without last_id: %s", exc)
            last_id = None
        await self.queue.put(frames.hello(last_id), limit=self.queue.capacity)
        if last_id is not None and (self.last_id is None or last_id > self.last_id):
            self.last_id = last_id  # the client is told it exists; it may resume from there

    async def _resume(self, after_id: int) -> None:
        """Every notification after `after_id`, oldest first, from the notifications service.

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
                        self._sent(alert)
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
