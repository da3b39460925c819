"""Alerts that reach people: the notifications service on the real Postgres and RabbitMQ, its
webhook answered by a receiver of the test's own (aiohttp, on a free port) and its email by a
local SMTP server (aiosmtpd), both of which the test can take down and bring back.

Time is the test's: the app runs on a clock the test sets (`FakeClock`), which dates the
deliveries and drives the dispatcher, and a test that follows the retry schedule or the quiet
period stops the dispatcher's loop and runs each round itself, at the time it chooses. The
settings are the defaults (10 s doubling to an hour, a day before giving up, 15 quiet minutes,
3 failures before a channel is failing): only the channels' addresses are the test's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from fastapi import FastAPI

from booking.contracts import (
    Event,
    PaymentAnomalyDetected,
    PaymentAnomalyKind,
    PaymentInitiationFailed,
    SessionIssueDetected,
    SessionIssueKind,
)
from booking.devtools.fixtures import eventually, free_port, health_checks, serving_with_client
from booking.notifications.app import create_app
from booking.notifications.dispatcher import Dispatcher
from booking.notifications.domain import Channel, delivery_key
from booking.notifications.settings import NotificationsSettings
from booking.notifications.tables import SCHEMA
from booking.runtime import metrics

from .conftest import Notifications, notifications_baseline, watch_alerts

DELIVERIES = f"{SCHEMA}.alert_deliveries"
SENDER = "alerts@example.com"
RECIPIENTS = "ops@example.com, Night Shift <night@example.com>"


class FakeClock:
    """The app's clock, set by the test."""

    def __init__(self) -> None:
        self.start = datetime.now(UTC)
        self.now = self.start

    def __call__(self) -> datetime:
        return self.now

    def at(self, seconds: float) -> datetime:
        """Set the clock `seconds` after the test's start."""
        self.now = self.start + timedelta(seconds=seconds)
        return self.now


@dataclass
class Request:
    """One POST the webhook receiver got, and what it answered."""

    headers: dict[str, str]
    body: dict[str, Any]
    status: int

    @property
    def key(self) -> str:
        return self.headers["idempotency-key"]


@dataclass
class Receiver:
    """The webhook's receiver: answers `status`, holds each request while `held`, and refuses
    connections while stopped."""

    port: int = field(default_factory=free_port)
    status: int = 200
    requests: list[Request] = field(default_factory=list)
    held: asyncio.Event | None = None
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        # The path is a Slack webhook's secret: it must never show.
        return f"http://127.0.0.1:{self.port}/services/T0/B0/secret-path"

    async def _answer(self, request: web.Request) -> web.Response:
        headers = {name.lower(): value for name, value in request.headers.items()}
        self.requests.append(Request(headers, await request.json(), self.status))
        if self.held is not None:
            await self.held.wait()
        return web.Response(status=self.status, text="ok" if self.status < 300 else "down")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/services/T0/B0/secret-path", self._answer)
        self._runner = web.AppRunner(app, shutdown_timeout=1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def hold(self) -> None:
        self.held = asyncio.Event()

    def release(self) -> None:
        if self.held is not None:
            self.held.set()
            self.held = None

    def taken(self, key: str | None = None) -> list[Request]:
        """The requests answered 2xx (with `key`)."""
        return [r for r in self.requests if r.status < 300 and key in (None, r.key)]


@dataclass
class Mailbox:
    """The SMTP server: keeps what it takes, answers 451 while `refusing`, and refuses
    connections while stopped."""

    port: int = field(default_factory=free_port)
    refusing: bool = False
    messages: list[EmailMessage] = field(default_factory=list)
    _controller: Controller | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.refusing:
            return "451 4.3.0 Try again later"
        message = message_from_bytes(envelope.original_content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        message["X-Envelope-To"] = ", ".join(envelope.rcpt_tos)
        self.messages.append(message)
        return "250 Message accepted"

    async def start(self) -> None:
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        await asyncio.to_thread(self._controller.start)

    async def stop(self) -> None:
        if self._controller is not None:
            await asyncio.to_thread(self._controller.stop)
            self._controller = None

    def with_key(self, key: str) -> list[EmailMessage]:
        return [m for m in self.messages if m["X-Idempotency-Key"] == key]


@dataclass
class Routed:
    """A notifications service routing alerts to the test's receiver and mailbox."""

    feed: Notifications
    app: FastAPI
    dispatcher: Dispatcher
    clock: FakeClock
    hook: Receiver
    mail: Mailbox

    async def round(self, seconds: float) -> None:
        """One round of the dispatcher, `seconds` after the test's start."""
        self.clock.at(seconds)
        await self.dispatcher.run_once()

    async def raise_(self, event: Event) -> dict[str, Any]:
        return await self.feed.raise_(event)

    async def deliveries(self, notification_id: int | None = None) -> list[asyncpg.Record]:
        """This test's deliveries (of one notification), oldest first."""
        return await self.feed.conn.fetch(
            f"SELECT * FROM {DELIVERIES} WHERE notification_id > $1 "
            "AND ($2::bigint IS NULL OR notification_id = $2) ORDER BY id",
            self.feed.baseline,
            notification_id,
        )

    async def channels_of(self, notification_id: int) -> set[str]:
        return {d["channel"] for d in await self.deliveries(notification_id)}

    async def about_channel(self, reason: str) -> list[dict[str, Any]]:
        return await self.feed.rows("metadata->>'reason' = $1", reason)


@pytest.fixture
async def route_alerts(
    migrated: str,
    db: asyncpg.Connection,
    make_settings: Callable[..., NotificationsSettings],
    spy_on: Callable[..., Any],
) -> AsyncIterator[Callable[..., Awaitable[Routed]]]:
    """`await route_alerts(webhook=True, email=True, drive=True, **settings)`: the service
    served with both channels pointed at the test's receiver and mailbox (running). With
    `drive`, the dispatcher's loop is stopped: the test runs each round (`Routed.round`)."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            *, webhook: bool = True, email: bool = True, drive: bool = True, **overrides: Any
        ) -> Routed:
            hook, mail = Receiver(), Mailbox()
            await hook.start()
            stack.push_async_callback(hook.stop)
            await mail.start()
            stack.push_async_callback(mail.stop)
            values: dict[str, Any] = {}
            if webhook:
                values["alert_webhook_url"] = hook.url
            if email:
                values |= {
                    "alert_smtp_host": "127.0.0.1",
                    "alert_smtp_port": mail.port,
                    "alert_smtp_starttls": False,  # aiosmtpd here speaks plain SMTP
                    "alert_smtp_from": SENDER,
                    "alert_smtp_to": RECIPIENTS,
                }
            settings = make_settings(NotificationsSettings, **values, **overrides)
            spy = await spy_on(settings)
            alerts = await watch_alerts(spy, settings)
            # Another test's deliveries still to send would go to this test's receivers.
            await db.execute(f"DELETE FROM {DELIVERIES} WHERE status IN ('pending', 'sending')")
            baseline = await notifications_baseline(db)
            clock = FakeClock()
            app = create_app(settings, clock=clock)
            _, client = await stack.enter_async_context(serving_with_client(app))
            await app.state.runtime.broker.wait_ready(timeout=15)
            dispatcher: Dispatcher = app.state.dispatcher
            if drive:
                await dispatcher.stop()
            feed = Notifications(
                settings=settings,
                runtime=app.state.runtime,
                conn=db,
                baseline=baseline,
                started_at=datetime.now(UTC),
                client=client,
                spy=spy,
                alerts=alerts,
            )
            # Before the service stops: no unsent row for a later test's relay.
            stack.push_async_callback(
                eventually, feed.outbox_drained, what="the outbox relay at teardown"
            )
            return Routed(feed, app, dispatcher, clock, hook, mail)

        yield start
        await db.execute(f"DELETE FROM {DELIVERIES} WHERE status IN ('pending', 'sending')")


def initiation_failed() -> PaymentInitiationFailed:
    """An Error (PaymentAnomaly) about an order of its own."""
    return PaymentInitiationFailed(order_id=uuid.uuid4(), reason="refused", detail="HTTP 401")


def session_issue(kind: SessionIssueKind) -> SessionIssueDetected:
    return SessionIssueDetected(order_id=uuid.uuid4(), session_id=None, kind=kind, detail="d")


def anomaly(kind: PaymentAnomalyKind) -> PaymentAnomalyDetected:
    return PaymentAnomalyDetected(
        payment_ref=uuid.uuid4().hex[:24], order_id=uuid.uuid4(), kind=kind, detail="d"
    )


async def test_an_error_alert_reaches_the_webhook_and_the_mailbox_once_with_its_key(
    route_alerts,
) -> None:
    routed = await route_alerts(drive=False)  # the dispatcher's own loop sends it
    raised = await routed.raise_(initiation_failed())

    hook_key = delivery_key(raised["id"], 1, Channel.webhook)
    mail_key = delivery_key(raised["id"], 1, Channel.email)
    await eventually(lambda: routed.hook.taken() and routed.mail.messages, what="both channels")

    [request] = routed.hook.requests
    assert request.key == hook_key
    assert request.headers["content-type"] == "application/json"
    body = request.body
    assert body["text"].startswith("[Error] Payment could not be opened at Konnect\n")
    assert {k: body[k] for k in ("id", "type", "severity", "title", "occurrences")} == {
        "id": raised["id"],
        "type": "PaymentAnomaly",
        "severity": "Error",
        "title": raised["title"],
        "occurrences": 1,
    }
    assert body["detail"] == raised["message"] and body["idempotency_key"] == hook_key
    assert body["metadata"]["order_id"] == raised["metadata"]["order_id"]

    [mail] = routed.mail.messages
    assert mail["X-Idempotency-Key"] == mail_key and mail_key in mail["Message-ID"]
    assert mail["From"] == SENDER and mail["To"] == RECIPIENTS
    assert mail["X-Envelope-To"] == "ops@example.com, night@example.com"
    assert mail["Subject"] == f"[booking Error] {raised['title']}"
    content = mail.get_body(preferencelist=("plain",))
    assert content is not None and raised["message"] in content.get_content()

    # Once: later rounds, the loop's and another an hour on, find nothing more to send.
    await routed.round(3600)
    await routed.feed.quiet()
    assert (len(routed.hook.requests), len(routed.mail.messages)) == (1, 1)
    deliveries = await routed.deliveries(raised["id"])
    assert [(d["channel"], d["status"], d["attempts"], d["occurrence"]) for d in deliveries] == [
        ("webhook", "sent", 1, 1),
        ("email", "sent", 1, 1),
    ]
    assert {d["idempotency_key"] for d in deliveries} == {hook_key, mail_key}


async def test_below_the_minimum_severity_or_of_a_type_not_chosen_goes_nowhere(
    route_alerts,
) -> None:
    routed = await route_alerts(
        alert_webhook_types="PaymentAnomaly", alert_email_min_severity="Critical"
    )
    warning = await routed.raise_(  # PaymentAnomaly, Warning: below both
        PaymentAnomalyDetected(
            payment_ref="f" * 24,
            order_id=None,
            kind=PaymentAnomalyKind.UNKNOWN_PAYMENT_REF,
            detail="d",
        )
    )
    other_type = await routed.raise_(session_issue(SessionIssueKind.CURRENCY_MISMATCH))  # Error
    to_webhook = await routed.raise_(anomaly(PaymentAnomalyKind.AMOUNT_MISMATCH))  # Error
    to_email = await routed.raise_(session_issue(SessionIssueKind.PAYMENT_FOR_UNKNOWN_ORDER))
    assert (warning["severity"], other_type["severity"], to_email["severity"]) == (1, 2, 3)

    assert await routed.channels_of(warning["id"]) == set()
    assert await routed.channels_of(other_type["id"]) == set()
    assert await routed.channels_of(to_webhook["id"]) == {"webhook"}
    assert await routed.channels_of(to_email["id"]) == {"email"}

    await routed.round(0)
    assert [r.body["id"] for r in routed.hook.requests] == [to_webhook["id"]]
    assert [m["X-Idempotency-Key"] for m in routed.mail.messages] == [
        delivery_key(to_email["id"], 1, Channel.email)
    ]


async def test_a_counted_up_alert_waits_out_the_quiet_period_then_goes_with_its_count(
    route_alerts,
) -> None:
    routed = await route_alerts(email=False)
    event = initiation_failed()
    first = await routed.raise_(event)
    await routed.round(0)
    assert [r.body["occurrences"] for r in routed.hook.taken()] == [1]

    routed.clock.at(60)
    await routed.raise_(event)  # counted up: 2
    [_, second] = await routed.deliveries(first["id"])
    assert second["next_attempt_at"] == routed.clock.start + timedelta(seconds=900)
    await routed.round(60)
    routed.clock.at(120)
    await routed.raise_(event)  # 3
    await routed.round(899)
    assert len(routed.hook.requests) == 1, "a count-up went within the quiet period"

    await routed.round(900)  # the period is over: the latest count goes, once
    assert [r.body["occurrences"] for r in routed.hook.taken()] == [1, 3]
    assert routed.hook.requests[-1].key == delivery_key(first["id"], 3, Channel.webhook)
    assert [d["status"] for d in await routed.deliveries(first["id"])] == [
        "sent",
        "superseded",
        "sent",
    ]

    routed.clock.at(2000)  # past the period after the last send: a count-up goes at once
    await routed.raise_(event)
    await routed.round(2000)
    assert [r.body["occurrences"] for r in routed.hook.taken()] == [1, 3, 4]
    await routed.round(5000)
    assert len(routed.hook.requests) == 3


async def test_a_count_up_queued_while_the_last_send_is_in_flight_still_waits_its_turn(
    route_alerts,
) -> None:
    routed = await route_alerts(email=False)
    event = initiation_failed()
    first = await routed.raise_(event)
    routed.hook.hold()
    routed.clock.at(0)
    sending = asyncio.create_task(routed.dispatcher.run_once())
    await eventually(lambda: routed.hook.requests, what="the first send")

    routed.clock.at(1)
    await routed.raise_(event)  # counted up while the first occurrence is on its way
    await routed.dispatcher.run_once()  # another replica's round: it waits for that send
    assert len(routed.hook.requests) == 1
    routed.hook.release()
    assert (await sending).sent == 1

    await routed.round(40)  # the first one's lease is over; the quiet period is not
    assert len(routed.hook.requests) == 1
    await routed.round(901)
    assert [r.body["occurrences"] for r in routed.hook.taken()] == [1, 2]
    assert [d["status"] for d in await routed.deliveries(first["id"])] == ["sent", "sent"]


async def test_a_channel_that_is_down_gets_every_alert_once_it_is_back_and_nothing_dead_letters(
    route_alerts,
) -> None:
    routed = await route_alerts()
    runtime = routed.feed.runtime
    assert runtime.consumer is not None
    dead_letters = await routed.feed.conn.fetchval(
        f"SELECT coalesce(max(id), 0) FROM {SCHEMA}.dead_letters"
    )
    routed.hook.status = 503
    await routed.mail.stop()  # connections refused
    raised = [await routed.raise_(initiation_failed()) for _ in range(2)]

    # Down for ten minutes: six attempts each (10 s doubling), every one failed.
    for seconds in (0, 10, 30, 70, 150, 310, 600):
        await routed.round(seconds)
    assert routed.hook.taken() == [] and routed.mail.messages == []
    waiting = await routed.deliveries()
    assert {d["status"] for d in waiting} == {"pending"}

    routed.hook.status = 200
    await routed.mail.start()
    await routed.round(1300)  # every retry due by now

    for notification in raised:
        hook_key = delivery_key(notification["id"], 1, Channel.webhook)
        mail_key = delivery_key(notification["id"], 1, Channel.email)
        assert len(routed.hook.taken(hook_key)) == 1
        assert len(routed.mail.with_key(mail_key)) == 1
        failed = [r for r in routed.hook.requests if r.key == hook_key and r.status == 503]
        assert len(failed) == 6  # each attempt of the outage carried the same key
    assert {d["status"] for d in await routed.deliveries()} == {"sent"}

    # Nothing of it ever touched the messages: handled once, nothing dead-lettered.
    ready, _ = await runtime.broker.queue_stats(runtime.consumer.queues.dead_letter)
    assert ready == 0
    kept = await routed.feed.conn.fetchval(
        f"SELECT count(*) FROM {SCHEMA}.dead_letters WHERE id > $1", dead_letters
    )
    assert kept == 0
    assert routed.feed.reported() == []


async def test_a_dispatcher_stopped_mid_send_leaves_it_to_the_next_with_the_same_key(
    route_alerts,
) -> None:
    routed = await route_alerts(email=False)
    raised = await routed.raise_(initiation_failed())
    key = delivery_key(raised["id"], 1, Channel.webhook)
    routed.hook.hold()  # the receiver takes the request and does not answer yet

    routed.clock.at(0)
    stopped = asyncio.create_task(routed.dispatcher.run_once())
    await eventually(lambda: routed.hook.requests, what="the first attempt")
    stopped.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stopped
    [claimed] = await routed.deliveries(raised["id"])
    assert (claimed["status"], claimed["attempts"]) == ("sending", 1)

    # A new dispatcher (a new process: its own app on the same database).
    app = create_app(routed.feed.settings, clock=routed.clock)
    successor: Dispatcher = app.state.dispatcher
    for sender in successor.senders.values():
        await sender.open()
    try:
        routed.hook.release()
        await routed.round(5)
        assert (await successor.run_once()).sent == 0  # the first one's claim still holds
        routed.clock.at(41)  # its lease (the 10 s send timeout and 30 s) has ended
        assert (await successor.run_once()).sent == 1
        assert [r.key for r in routed.hook.requests] == [key, key]

        routed.clock.at(7200)  # sent: neither sends it again
        assert (await successor.run_once()).sent == 0
        assert (await routed.dispatcher.run_once()).sent == 0
        assert len(routed.hook.requests) == 2
        [sent] = await routed.deliveries(raised["id"])
        assert (sent["status"], sent["attempts"]) == ("sent", 2)
    finally:
        for sender in successor.senders.values():
            await sender.aclose()
        runtime = app.state.runtime
        await runtime.verifier.aclose()
        await runtime.db.engine.dispose()


async def test_a_failing_channel_is_news_on_the_other_channel_and_never_on_itself(
    route_alerts,
) -> None:
    routed = await route_alerts()
    routed.hook.status = 503
    first = await routed.raise_(initiation_failed())
    for seconds in (0, 10):
        await routed.round(seconds)
    assert await routed.about_channel("alert_channel_failing") == []
    await routed.round(30)  # the third failure in a row

    [failing] = await routed.about_channel("alert_channel_failing")
    assert (failing["type"], failing["severity"], failing["is_open"]) == (3, 2, True)
    assert failing["title"] == "Alerts cannot reach people by webhook"
    assert failing["metadata"]["alert_channel"] == "webhook"
    assert failing["metadata"]["target"] == f"http://127.0.0.1:{routed.hook.port}"
    assert "secret-path" not in failing["message"] + str(failing["metadata"])
    assert "HTTP 503" in failing["metadata"]["error"]
    # In the feed and fanned out to the dashboards like any other.
    [listed] = [n for n in await routed.feed.mine() if n["id"] == failing["id"]]
    assert listed["type"] == "SystemError" and listed["severity"] == "Error"
    await routed.feed.quiet()
    assert routed.feed.alerts.payloads(failing["id"])
    # By email only.
    assert await routed.channels_of(failing["id"]) == {"email"}
    await routed.round(30)
    mail = routed.mail.with_key(delivery_key(failing["id"], 1, Channel.email))
    assert [m["Subject"] for m in mail] == ["[booking Error] Alerts cannot reach people by webhook"]

    # More failures while it is failing: the same incident, not another.
    routed.clock.at(40)
    second = await routed.raise_(initiation_failed())
    for seconds in (40, 50, 70):
        await routed.round(seconds)
    [still] = await routed.about_channel("alert_channel_failing")
    assert (still["id"], still["occurrences"]) == (failing["id"], 1)

    routed.hook.status = 200  # it answers again: what waited goes, and the failure ends
    await routed.round(200)
    for notification in (first, second):
        assert routed.hook.taken(delivery_key(notification["id"], 1, Channel.webhook))
    [ended] = await routed.about_channel("alert_channel_failing")
    assert ended["is_open"] is False
    [recovered] = await routed.about_channel("alert_channel_recovered")
    assert (recovered["severity"], recovered["metadata"]["alert_channel"]) == (0, "webhook")
    assert await routed.channels_of(recovered["id"]) == set()  # Info: below both
    assert all(r.body["id"] != failing["id"] for r in routed.hook.requests)


async def test_the_backlog_shows_in_health_and_a_delivery_is_given_up_after_a_day(
    route_alerts,
) -> None:
    routed = await route_alerts(email=False)
    routed.hook.status = 503
    raised = await routed.raise_(initiation_failed())
    given_up = metrics.ALERT_DELIVERIES.labels("webhook", "given_up")._value.get()

    async def backlog() -> dict[str, Any]:
        report = (await routed.feed.client.get("/health")).json()
        check: dict[str, Any] = health_checks(report, "alertDeliveries")["alertDeliveries:backlog"]
        return check

    await routed.round(0)
    seen: dict[float, str] = {}
    attempts = 1
    while True:  # follow the retry schedule to its end
        [delivery] = await routed.deliveries(raised["id"])
        if delivery["status"] != "pending":
            break
        routed.clock.now = delivery["next_attempt_at"]
        seen[(routed.clock.now - routed.clock.start).total_seconds()] = (await backlog())["status"]
        await routed.dispatcher.run_once()
        attempts += 1
    # Health warns once the oldest delivery still to send is more than 10 minutes old.
    assert (seen[310], seen[630]) == ("pass", "warn")
    assert delivery["status"] == "failed"
    assert delivery["attempts"] == attempts and 25 <= attempts <= 35
    assert delivery["last_attempt_at"] == routed.clock.start + timedelta(hours=24)
    assert delivery["last_error"] == "HTTP 503: down"
    assert {r.key for r in routed.hook.requests} == {delivery["idempotency_key"]}
    assert metrics.ALERT_DELIVERIES.labels("webhook", "given_up")._value.get() == given_up + 1
    # Visible: the channel's failure stays open, and given up is no longer backlog.
    [failing] = await routed.about_channel("alert_channel_failing")
    assert failing["is_open"]
    routed.clock.at(90_000)
    assert (await backlog())["status"] == "pass"


def test_bad_settings_stop_the_service_as_it_starts_saying_which() -> None:
    secret = "ftp://hooks.example.com/services/secret-path"
    env = {**os.environ, "ALERT_WEBHOOK_URL": secret, "ALERT_SMTP_TO": "ops@example.com"}
    done = subprocess.run(
        [sys.executable, "-m", "booking.notifications", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "booking.notifications will not start: alert routing: ALERT_WEBHOOK_URL must be an "
        "http:// or https:// URL with a host; ALERT_SMTP_TO set but ALERT_SMTP_HOST is not"
    )
    assert "secret-path" not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
