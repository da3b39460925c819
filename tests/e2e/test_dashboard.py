"""The admin dashboard at `/admin`, in a real browser against the running system.

Debian's Chromium (`/usr/bin/chromium`), headless, driven by Playwright's Python API; never a
browser Playwright downloads. Every wait is Playwright's auto-waiting `expect` or the runtime's
`eventually`: no sleeps.

The admins' actions (docs/recovery.md section 7) are driven on the page, each through its
confirmation dialog, on what the running system really holds: dead letters made by publishing an
unreadable message straight to the notifications service's queue, orders booked (and paid) at
the sandbox Konnect, a scheduling failed by faults at the sandbox Google.

Two tests need more than the shared system offers:
- the websocket cut: the page is opened through a loopback TCP proxy in front of the gateway,
  and the test cuts the proxy (every open connection dropped, new ones refused), then restores
  it. That is a real network outage for the page, HTTP and websocket alike.
- a stopped service: `make run`'s supervisor treats a child that dies as fatal and stops the
  whole system, so the test does not stop one of its children. It starts its own calendar
  replica (a real `python -m booking.calendar serve` on the same database and broker) and a
  second gateway (in this process) whose CALENDAR_URL is that replica, opens the page on that
  gateway, sees calendar pass, stops the replica with SIGTERM, and sees calendar fail. The rest of
  that gateway's view is the shared system's: its orders, payments and notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from booking.contracts import PaymentAnomalyDetected, PaymentAnomalyKind, wrap
from booking.devtools.devrun import child_environment
from booking.devtools.fixtures import TcpProxy, eventually, free_port, serving
from booking.gateway.app import create_app
from booking.gateway.settings import GatewaySettings
from booking.runtime.auth import issue_token
from booking.runtime.settings import RuntimeSettings

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FLOW_MS = 30_000  # an alert travels through four services on a loaded machine
FLOW_SECONDS = FLOW_MS / 1000
# The page retries its websocket with a backoff capped at 10 s (and some jitter).
RECONNECT_MS = 30_000
SERVICE_READY_SECONDS = 90

ROWS = "#notifications > li"


# --- the browser -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the dashboard's tests drive Debian's Chromium "
            "(apt-get install -y chromium)"
        )
    return CHROMIUM


@pytest.fixture(scope="module")
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh browser context (its own sessionStorage). An uncaught script error, or anything
    the page's Content-Security-Policy had to block, fails the test."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "console",
        lambda message: (
            errors.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    try:
        yield page
    finally:
        await context.close()
    assert not errors, f"the page failed: {errors}"


def bare(header: dict[str, str]) -> str:
    return header["Authorization"].removeprefix("Bearer ")


async def sign_in(page: Page, base_url: str, token: str, query: str = "") -> None:
    await page.goto(f"{base_url}/admin/{query}")
    await page.locator("#token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#dashboard")).to_be_visible()
    await expect(page.locator("#live")).to_have_attribute("data-state", "live", timeout=FLOW_MS)


def row_about(page: Page, text: str):
    return page.locator(ROWS, has_text=text)


def unread_count(page: Page, severity: str):
    return page.locator(f'#unread-counts li[data-severity="{severity}"] .number')


# --- raising alerts in the system --------------------------------------------------------------


async def unschedulable_booking(market) -> str:
    """A paid booking whose mentor never connected Google: calendar fails it, an Error alert."""
    offering = await market.offering()
    order_id = await market.booked(offering)
    await market.pay(await market.payment_ref(order_id))
    return order_id


async def forged_webhook(market) -> str:
    """A webhook for a ref no payment has: a Warning alert (PaymentAnomaly). Every such webhook
    counts up on one notification per window, whose message names the latest ref."""
    ref = uuid.uuid4().hex[:24]
    await market.api.get("/api/payments/webhook", params={"payment_ref": ref})
    return ref


async def payment_anomaly(
    running_system, again: PaymentAnomalyDetected | None = None
) -> PaymentAnomalyDetected:
    """An Error alert (PaymentAnomaly) about a payment of its own, published as payments would:
    one notification per payment. `again`: the same anomaly once more (it counts up)."""
    event = again or PaymentAnomalyDetected(
        payment_ref=uuid.uuid4().hex[:24],
        order_id=uuid.uuid4(),
        kind=PaymentAnomalyKind.AMOUNT_MISMATCH,
        detail="more than the amount due arrived",
    )
    await publish_event(running_system, event)
    return event


async def stored_or_none(market, text: str) -> dict[str, Any] | None:
    listed = await market.api.get(
        "/api/admin/notifications", params={"limit": 200}, headers=market.admin
    )
    assert listed.status_code == 200, listed.text
    found = [n for n in listed.json()["items"] if text in n["message"]]
    return found[0] if found else None


async def stored(market, text: str) -> dict[str, Any]:
    """The stored notification whose message mentions `text` (waits until there is one)."""

    found: dict[str, Any] | None = await eventually(
        lambda: stored_or_none(market, text),
        timeout=FLOW_SECONDS,
        interval=0.2,
        what=f"an alert on {text}",
    )
    assert found is not None  # eventually returns only a truthy answer
    return found


async def unread(market, severity: str, **filters: str) -> int:
    listed = await market.api.get(
        "/api/admin/notifications",
        params={"unreadOnly": "true", "severity": severity, "limit": 200, **filters},
        headers=market.admin,
    )
    assert listed.status_code == 200, listed.text
    assert listed.json()["next_cursor"] is None, "more than a page of unread: counts read N+"
    return len(listed.json()["items"])


async def publish_event(running_system, event: PaymentAnomalyDetected) -> None:
    """Publish `event` on the system's events exchange, as payments would (a new message)."""
    envelope = wrap(event, message_id=uuid.uuid4(), correlation_id=str(uuid.uuid4()))
    connection = await aio_pika.connect(running_system.rabbitmq_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(running_system.events_exchange)
        await exchange.publish(
            aio_pika.Message(
                body=envelope.model_dump_json().encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=str(envelope.message_id),
                correlation_id=envelope.correlation_id,
                type=envelope.type,
            ),
            event.routing_key(),
        )


# --- the tests ---------------------------------------------------------------------------------


class TestServedByTheGateway:
    async def test_the_page_and_its_files_come_from_the_gateway_alone(self, api):
        moved = await api.get("/admin")
        assert moved.status_code == 308 and moved.headers["location"] == "/admin/"

        index = await api.get("/admin/")
        assert index.status_code == 200
        assert index.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in index.headers["content-security-policy"]
        assert "http" not in index.text.replace("http-equiv", "")  # nothing from elsewhere

        script = await api.get("/admin/app.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")

        for missing in ("/admin/nope.js", "/admin/__init__.py", "/admin/..%2f__init__.py"):
            answer = await api.get(missing)
            assert answer.status_code == 404, missing
            assert answer.headers["content-type"] == "application/problem+json"


class TestSigningIn:
    async def test_a_missing_expired_or_non_admin_token_is_refused_and_an_admins_accepted(
        self, page, running_system
    ):
        secret = running_system.env.get("AUTH_JWT_SECRET") or (
            RuntimeSettings().auth_jwt_secret.get_secret_value()
        )
        message = page.locator("#sign-in-message")
        sign_in_button = page.get_by_role("button", name="Sign in")
        await page.goto(f"{running_system.gateway}/admin")
        assert page.url.endswith("/admin/")

        await sign_in_button.click()
        await expect(message).to_contain_text("No token")

        await page.locator("#token").fill(bare(running_system.token("mentee")))
        await sign_in_button.click()
        await expect(message).to_contain_text("not an admin's")

        await page.locator("#token").fill(issue_token(secret, "admin-x", "admin", ttl_seconds=-60))
        await sign_in_button.click()
        await expect(message).to_contain_text("expired")

        forged = issue_token("not-the-system-secret-0123456789abcdef", "admin-x", "admin")
        await page.locator("#token").fill(forged)
        await sign_in_button.click()
        await expect(message).to_contain_text("refused this token (401")
        await expect(page.locator("#dashboard")).to_be_hidden()

        # The keyboard alone: the field has the focus, Enter signs in.
        await page.locator("#token").focus()
        await page.keyboard.type(bare(running_system.token("admin", "admin-ops")))
        await page.keyboard.press("Enter")
        await expect(page.locator("#dashboard")).to_be_visible()
        await expect(page.locator("#sign-in")).to_be_hidden()
        await expect(page.locator("#who")).to_contain_text("admin-ops")
        await expect(page.locator("#live")).to_have_attribute("data-state", "live", timeout=FLOW_MS)

        # Kept for the browser session: a reload stays signed in; signing out forgets it.
        await page.reload()
        await expect(page.locator("#dashboard")).to_be_visible()
        await page.get_by_role("button", name="Sign out").click()
        await expect(page.locator("#sign-in")).to_be_visible()
        await page.reload()
        await expect(page.locator("#sign-in")).to_be_visible()


class TestTheLiveFeed:
    async def test_an_alert_raised_in_the_system_appears_on_the_open_page(
        self, page, running_system, market
    ):
        await sign_in(page, running_system.gateway, bare(market.admin))
        await page.evaluate("window.sameDocument = true")

        order_id = await unschedulable_booking(market)

        row = row_about(page, order_id)
        await expect(row).to_have_count(1, timeout=FLOW_MS)
        await expect(row.locator(".badge")).to_have_text("Error")
        await expect(row.locator(".type")).to_have_text("IntegrationFailure")
        assert await page.evaluate("window.sameDocument") is True, "the page was reloaded"

        # The metadata on demand.
        details = row.locator("details")
        await expect(details.locator("dl")).to_be_hidden()
        await details.locator("summary").click()
        await expect(details.locator("dl")).to_contain_text("mentor_not_integrated")


class TestReadingAndFiltering:
    async def test_mark_read_lowers_the_unread_count_and_a_severity_filter_shows_only_it(
        self, page, running_system, market
    ):
        await sign_in(page, running_system.gateway, bare(market.admin))
        order_id = await unschedulable_booking(market)
        ref = await forged_webhook(market)
        await expect(row_about(page, order_id)).to_have_count(1, timeout=FLOW_MS)
        await expect(row_about(page, ref)).to_have_count(1, timeout=FLOW_MS)
        errors = await unread(market, "Error")
        await expect(unread_count(page, "Error")).to_have_text(str(errors), timeout=FLOW_MS)

        await row_about(page, order_id).get_by_role("button", name="Mark read").click()

        await expect(unread_count(page, "Error")).to_have_text(str(errors - 1), timeout=FLOW_MS)
        await expect(row_about(page, order_id)).to_have_attribute("data-read", "true")
        assert await unread(market, "Error") == errors - 1

        await page.get_by_label("Severity", exact=True).select_option("Warning")

        await expect(row_about(page, ref)).to_have_count(1)
        await expect(row_about(page, order_id)).to_have_count(0)
        await expect(page.locator(f'{ROWS}:not([data-severity="Warning"])')).to_have_count(0)

    async def test_mark_all_read_and_delete(self, page, running_system, market):
        await sign_in(page, running_system.gateway, bare(market.admin))
        kept, removed = [(await payment_anomaly(running_system)).payment_ref for _ in range(2)]
        await expect(row_about(page, removed)).to_have_count(1, timeout=FLOW_MS)
        await expect(row_about(page, kept)).to_have_count(1, timeout=FLOW_MS)

        await row_about(page, removed).get_by_role("button", name="Delete").click()

        await expect(row_about(page, removed)).to_have_count(0)
        gone = await stored_or_none(market, removed)
        assert gone is None, gone

        # Read-all marks what the filters show: here every PaymentAnomaly.
        await page.get_by_label("Type", exact=True).select_option("PaymentAnomaly")
        await expect(page.locator(f'{ROWS}:not([data-type="PaymentAnomaly"])')).to_have_count(0)
        await page.get_by_role("button", name="Mark all read").click()

        await expect(row_about(page, kept)).to_have_attribute("data-read", "true")
        await expect(page.locator(f'{ROWS}[data-read="false"]')).to_have_count(0)
        assert await unread(market, "Error", type="PaymentAnomaly") == 0
        errors = await unread(market, "Error")
        await expect(unread_count(page, "Error")).to_have_text(str(errors), timeout=FLOW_MS)

    async def test_load_more_pages_on_with_the_cursor(self, page, running_system, market):
        refs = []
        for _ in range(3):  # one at a time: newest first is the order they were raised in
            refs.append((await payment_anomaly(running_system)).payment_ref)
            await stored(market, refs[-1])
        await sign_in(page, running_system.gateway, bare(market.admin), "?limit=2")
        rows = page.locator(ROWS)
        await expect(rows).to_have_count(2)
        await expect(row_about(page, refs[2])).to_have_count(1)  # newest first

        await page.get_by_role("button", name="Load more").click()

        await expect(rows).to_have_count(4)
        await expect(row_about(page, refs[0])).to_have_count(1)
        ids = [int(i) for i in await rows.evaluate_all("rows => rows.map(r => r.dataset.id)")]
        assert ids == sorted(ids, reverse=True) and len(set(ids)) == 4, ids


class TestReconnecting:
    async def test_alerts_raised_while_the_socket_is_cut_appear_once_each(
        self, page, running_system, market
    ):
        gateway_port = int(running_system.env["GATEWAY_PORT"])
        proxy = TcpProxy("127.0.0.1", gateway_port)
        await proxy.start()
        try:
            await sign_in(page, f"http://127.0.0.1:{proxy.port}", bare(market.admin))
            anomaly = await payment_anomaly(running_system)
            repeated = anomaly.payment_ref
            await expect(row_about(page, repeated)).to_have_count(1, timeout=FLOW_MS)

            await proxy.cut()
            await expect(page.locator("#live")).not_to_have_attribute("data-state", "live")

            missed = [await unschedulable_booking(market), await unschedulable_booking(market)]
            missed.append((await payment_anomaly(running_system)).payment_ref)
            await payment_anomaly(running_system, again=anomaly)
            for text in missed:
                await stored(market, text)

            async def counted_up() -> bool:
                return (await stored(market, repeated))["occurrences"] == 2

            await eventually(counted_up, timeout=FLOW_SECONDS, what="the repeat counted up")
            for text in missed:  # nothing reached the page while it was cut off
                await expect(row_about(page, text)).to_have_count(0)

            await proxy.restore()

            await expect(page.locator("#live")).to_have_attribute(
                "data-state", "live", timeout=RECONNECT_MS
            )
            for text in missed:
                await expect(row_about(page, text)).to_have_count(1, timeout=FLOW_MS)
            # The one counted up meanwhile is updated in its row, not added again.
            await expect(row_about(page, repeated)).to_have_count(1)
            await expect(row_about(page, repeated).locator(".occurrences")).to_have_text(
                "\N{MULTIPLICATION SIGN}2", timeout=FLOW_MS
            )
            ids = await page.locator(ROWS).evaluate_all("rows => rows.map(r => r.dataset.id)")
            assert len(ids) == len(set(ids)), f"a notification is shown twice: {ids}"
        finally:
            await proxy.stop()


# --- a stopped service -------------------------------------------------------------------------


@dataclass
class Replica:
    process: asyncio.subprocess.Process
    url: str


@contextlib.asynccontextmanager
async def calendar_replica(env: dict[str, str], logs: Path) -> AsyncIterator[Replica]:
    """One more calendar service, as `make run` starts one, on a port of its own."""
    port = free_port()
    log_path = logs / "calendar-replica.log"
    with log_path.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "booking.calendar",
            "serve",
            env={**env, "CALENDAR_PORT": str(port)},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    replica = Replica(process, f"http://127.0.0.1:{port}")
    try:
        async with httpx.AsyncClient(timeout=5, trust_env=False) as http:

            async def ready() -> bool:
                if process.returncode is not None:
                    pytest.fail(f"the calendar replica exited; its log: {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    return (await http.get(f"{replica.url}/health/ready")).status_code == 200
                return False

            await eventually(
                ready, timeout=SERVICE_READY_SECONDS, interval=0.2, what="the calendar replica"
            )
        yield replica
    finally:
        if process.returncode is None:
            process.kill()
        async with asyncio.timeout(30):
            await process.wait()


def gateway_settings(env: dict[str, str], **overrides: Any) -> GatewaySettings:
    fields = GatewaySettings.model_fields
    values: dict[str, Any] = {k.lower(): v for k, v in env.items() if k.lower() in fields}
    values.update(overrides)
    return GatewaySettings.model_validate(values)


class TestHealth:
    async def test_a_stopped_service_shows_as_failing_in_the_health_grid(
        self, page, running_system, market, tmp_path
    ):
        env = child_environment(running_system.env)  # the addresses `make run` derives
        async with calendar_replica(env, tmp_path) as calendar:
            settings = gateway_settings(
                env,
                calendar_url=calendar.url,
                health_monitor_interval_seconds=1.0,
                health_monitor_failures_to_alert=2,
                health_upstream_timeout_seconds=5.0,
            )
            async with serving(create_app(settings)) as gateway:
                await sign_in(page, gateway, bare(market.admin))
                tile = page.locator('#health-grid li[data-key="calendar:health"]')
                await expect(tile).to_have_attribute("data-status", "pass", timeout=FLOW_MS)
                # The grid reads the admins' report: the public /health has no checks to show.
                async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
                    public = await http.get(f"{gateway}/health")
                assert set(public.json()) == {"status"}, public.text

                calendar.process.send_signal(signal.SIGTERM)
                async with asyncio.timeout(30):
                    await calendar.process.wait()

                await expect(tile).to_have_attribute("data-status", "fail", timeout=FLOW_MS)
                await expect(tile).to_contain_text("FAILING")
                await expect(page.locator("#health-overall")).to_have_text("FAILING")
                await expect(page.locator("#health-note")).to_contain_text("calendar:health")
                # The gateway's monitor tells the admins too, and the page shows it live.
                alert = page.locator(f'{ROWS}[data-type="HealthCheckFailure"]', has_text="calendar")
                await expect(alert.first).to_be_visible(timeout=FLOW_MS)

                desktop = tmp_path / "dashboard-desktop.png"
                await page.screenshot(path=str(desktop), full_page=True)
                # A phone's width: one column, nothing wider than the screen.
                await page.set_viewport_size({"width": 390, "height": 844})
                await expect(page.locator(ROWS).first).to_be_visible()
                overflow = await page.evaluate(
                    "document.documentElement.scrollWidth - window.innerWidth"
                )
                assert overflow <= 0, f"the page is {overflow}px wider than a phone's screen"
                phone = tmp_path / "dashboard-phone.png"
                await page.screenshot(path=str(phone), full_page=True)
                print(f"dashboard screenshots: {desktop} {phone}")


# --- admin actions ---------------------------------------------------------------------------

DEAD_LETTERS = "#dead-letter-list > li"
DESK_ADMIN = "admin-desk"  # the admin acting in these tests, as the audit records them


@pytest.fixture(scope="module")
def system_overrides() -> dict[str, str]:
    # Google's failures are retried in the call after 0.1 s, 0.2 s ... rather than 1 s, 2 s ...:
    # a shorter delay, the same five attempts.
    return {"GOOGLE_RETRY_BASE_SECONDS": "0.1"}


def desk_admin(running_system) -> str:
    return bare(running_system.token("admin", DESK_ADMIN))


def dead_letter_row(page: Page, dead_letter_id: str):
    return page.locator(f'{DEAD_LETTERS}[data-id="{dead_letter_id}"]')


async def unreadable_message(running_system, queue: str = "notifications") -> str:
    """A message that is no envelope, straight to `queue`: its consumer dead-letters it at once.
    Its AMQP message id (what the dead letter lists it by when there is no envelope)."""
    message_id = str(uuid.uuid4())
    connection = await aio_pika.connect(running_system.rabbitmq_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(
            aio_pika.Message(
                body=f"not an envelope: {message_id}".encode(),
                content_type="text/plain",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message_id,
            ),
            queue,
        )
    return message_id


async def dead_lettered_by_the_broker(running_system, event: Any) -> str:
    """`event` where the broker puts a message delivered `x-delivery-limit` times without an
    ack (its consumer kept dying on it): the notifications service's dead-letter queue. Never
    handled, it raised no alert; its message id."""
    envelope = wrap(event, message_id=uuid.uuid4(), correlation_id=str(uuid.uuid4()))
    connection = await aio_pika.connect(running_system.rabbitmq_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(
            aio_pika.Message(
                body=envelope.model_dump_json().encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=str(envelope.message_id),
                correlation_id=envelope.correlation_id,
                type=envelope.type,
                headers={"x-delivery-count": 10},
            ),
            "notifications.dlq",
        )
    return str(envelope.message_id)


async def kept_dead_letter(market, message_id: str) -> dict[str, Any]:
    """The notifications service's dead letter of `message_id`, once kept (waits for it)."""

    async def find() -> dict[str, Any] | None:
        listed = await market.api.get(
            "/api/admin/dead-letters",
            params={"service": "notifications", "limit": 200},
            headers=market.admin,
        )
        assert listed.status_code == 200, listed.text
        return next((d for d in listed.json()["items"] if d["message_id"] == message_id), None)

    found: dict[str, Any] | None = await eventually(
        find, timeout=FLOW_SECONDS, interval=0.2, what=f"a dead letter of {message_id}"
    )
    assert found is not None  # eventually returns only a truthy answer
    return found


async def dead_letter_detail(market, dead_letter_id: str) -> dict[str, Any]:
    shown = await market.api.get(f"/api/admin/dead-letters/{dead_letter_id}", headers=market.admin)
    assert shown.status_code == 200, shown.text
    return shown.json()


async def confirm(page: Page, button: str, *, reason: str | None = None) -> None:
    """In the open confirmation dialog: type the reason (when given), press `button`, and see
    the dialog close (the action took effect)."""
    dialog = page.get_by_role("dialog")
    await expect(dialog).to_be_visible()
    if reason is not None:
        await dialog.locator("#confirm-reason").fill(reason)
    await dialog.get_by_role("button", name=button, exact=True).click()
    await expect(dialog).to_be_hidden(timeout=FLOW_MS)


async def look_up(page: Page, order_id: str) -> None:
    await page.get_by_label("Order id").fill(order_id)
    await page.get_by_role("button", name="Look up").click()
    await expect(page.locator(f'#order-view [data-order-id="{order_id}"]')).to_be_visible(
        timeout=FLOW_MS
    )


def desk(page: Page, what: str):
    """The order desk's `what` (order, session or escrow) status."""
    return page.locator(f"#order-view .{what}-status")


def desk_button(page: Page, name: str):
    return page.locator("#order-view").get_by_role("button", name=name, exact=True)


async def escrow(market, order_id: str) -> dict[str, Any]:
    shown = await market.api.get(f"/api/admin/orders/{order_id}/escrow", headers=market.admin)
    assert shown.status_code == 200, shown.text
    return shown.json()


class TestDeadLetters:
    async def test_a_new_dead_letter_appears_and_is_replayed_after_the_confirmation(
        self, page, running_system, market, events
    ):
        await sign_in(page, running_system.gateway, desk_admin(running_system))
        ref = uuid.uuid4().hex[:24]
        anomaly = PaymentAnomalyDetected(
            payment_ref=ref,
            order_id=None,
            kind=PaymentAnomalyKind.UNKNOWN_PAYMENT_REF,
            detail=f"a webhook named {ref}",
        )
        dead = await kept_dead_letter(
            market, await dead_lettered_by_the_broker(running_system, anomaly)
        )
        row = dead_letter_row(page, dead["id"])

        # On the open page: the dead letter is reported, and the list shows it.
        await expect(row).to_have_count(1, timeout=FLOW_MS)
        await expect(row).to_have_attribute("data-status", "kept")
        await expect(row.locator(".badge.service")).to_have_text("notifications")
        await expect(row.locator(".type")).to_have_text("PaymentAnomalyDetected")
        await expect(row.locator(".error-summary")).to_contain_text("delivered 10 times")
        await expect(row.locator(".when")).to_contain_text("attempt")

        # Its envelope on demand.
        await row.locator("summary").click()
        await expect(row.locator(".envelope-json")).to_contain_text(ref)
        await expect(row.locator(".detail-body")).to_contain_text("delivery_limit")

        # Replay: nothing happens until the dialog is confirmed.
        await row.get_by_role("button", name="Replay").click()
        dialog = page.get_by_role("dialog")
        await expect(dialog).to_contain_text(f"Replay dead letter {dead['id']}?")
        await dialog.get_by_role("button", name="Go back").click()
        await expect(dialog).to_be_hidden()
        await expect(row).to_have_attribute("data-status", "kept")
        assert (await dead_letter_detail(market, dead["id"]))["replayed_at"] is None
        await expect(row_about(page, ref)).to_have_count(0)  # never handled: no alert

        await row.get_by_role("button", name="Replay").click()
        await confirm(page, "Replay", reason="the notifications consumer is fixed")

        await expect(row).to_have_attribute("data-status", "replayed")
        await expect(row.locator(".state")).to_have_text("replayed")
        await expect(row.get_by_role("button", name="Replay")).to_have_count(0)
        await expect(page.locator("#dead-letters-message")).to_contain_text(
            f"{dead['id']} replayed"
        )
        # Handled at last: the alert it carried reaches the page.
        await expect(row_about(page, ref)).to_have_count(1, timeout=FLOW_MS)
        shown = await dead_letter_detail(market, dead["id"])
        assert (shown["status"], shown["decided_by"], shown["decision_reason"]) == (
            "replayed",
            DESK_ADMIN,
            "the notifications consumer is fixed",
        )
        [audit] = await events.seen(
            "AdminActionRecorded", action="replay_dead_letter", dead_letter_id=dead["id"]
        )
        assert (audit["by"], audit["reason"]) == (DESK_ADMIN, "the notifications consumer is fixed")

    async def test_a_discard_needs_a_reason_and_the_filters_show_it_discarded(
        self, page, running_system, market
    ):
        message_id = await unreadable_message(running_system)
        dead = await kept_dead_letter(market, message_id)
        await sign_in(page, running_system.gateway, desk_admin(running_system))
        row = dead_letter_row(page, dead["id"])
        await expect(row).to_have_count(1, timeout=FLOW_MS)

        await row.get_by_role("button", name="Discard").click()
        dialog = page.get_by_role("dialog")
        await dialog.get_by_role("button", name="Discard", exact=True).click()
        # No reason, no discard: the dialog says so and stays open.
        await expect(dialog.locator("#confirm-message")).to_contain_text("Say why")
        await expect(dialog).to_be_visible()
        assert (await dead_letter_detail(market, dead["id"]))["status"] == "kept"

        await confirm(page, "Discard", reason="a test message, nothing to handle")

        await expect(row).to_have_attribute("data-status", "discarded")
        await expect(row.get_by_role("button")).to_have_count(0)
        shown = await dead_letter_detail(market, dead["id"])
        assert (shown["status"], shown["decided_by"], shown["decision_reason"]) == (
            "discarded",
            DESK_ADMIN,
            "a test message, nothing to handle",
        )

        # The filters: only discarded ones of notifications, then only kept ones.
        await page.get_by_label("Service", exact=True).select_option("notifications")
        await page.get_by_label("Status", exact=True).select_option("discarded")
        await expect(row).to_have_count(1)
        await expect(page.locator(f'{DEAD_LETTERS}:not([data-status="discarded"])')).to_have_count(
            0
        )
        await expect(
            page.locator(f'{DEAD_LETTERS}:not([data-service="notifications"])')
        ).to_have_count(0)
        await page.get_by_label("Status", exact=True).select_option("kept")
        await expect(row).to_have_count(0)

    async def test_replay_all_kept_of_one_service(self, page, running_system, market, events):
        ids = []
        for _ in range(2):
            ids.append(
                (await kept_dead_letter(market, await unreadable_message(running_system)))["id"]
            )
        await sign_in(page, running_system.gateway, desk_admin(running_system))
        await page.get_by_label("Service", exact=True).select_option("notifications")
        await page.get_by_label("Status", exact=True).select_option("kept")
        for dead_letter_id in ids:
            await expect(dead_letter_row(page, dead_letter_id)).to_have_count(1, timeout=FLOW_MS)

        await page.get_by_role("button", name="Replay all kept (notifications)").click()
        await expect(page.get_by_role("dialog")).to_contain_text("of notifications")
        await confirm(page, "Replay all")

        await expect(page.locator("#dead-letters-message")).to_have_text(
            re.compile(r"^\d+ replayed\.$")
        )
        replayed = int(
            (await page.locator("#dead-letters-message").text_content() or "0").split()[0]
        )
        assert replayed >= len(ids)
        for dead_letter_id in ids:
            await events.seen(
                "AdminActionRecorded", action="replay_dead_letter", dead_letter_id=dead_letter_id
            )


class TestOrderDesk:
    async def test_an_order_is_cancelled_through_the_confirmation_and_its_slot_freed(
        self, page, running_system, market, events
    ):
        offering = await market.offering()
        start_at = market.next_week(hours=3)
        order_id = await market.booked(offering, start_at)
        await market.payment_ref(order_id)  # awaiting payment
        await sign_in(page, running_system.gateway, desk_admin(running_system))

        # An order that does not exist: the server's own words.
        await page.get_by_label("Order id").fill(str(uuid.uuid4()))
        await page.get_by_role("button", name="Look up").click()
        await expect(page.locator("#order-message")).to_contain_text("no order")

        await look_up(page, order_id)
        await expect(desk(page, "order")).to_have_text("awaiting_payment")
        await expect(desk_button(page, "Retry scheduling")).to_have_count(0)
        await expect(desk_button(page, "Release escrow")).to_have_count(0)

        await desk_button(page, "Cancel order").click()
        await expect(page.get_by_role("dialog")).to_contain_text(f"Cancel order {order_id}?")
        await confirm(page, "Cancel order", reason="the mentee asked by phone")

        await expect(desk(page, "order")).to_have_text("cancelled")
        await expect(desk(page, "session")).to_have_text("cancelled", timeout=FLOW_MS)
        await expect(desk_button(page, "Cancel order")).to_have_count(0)
        assert (await market.order(order_id))["status"] == "cancelled"
        [cancelled] = await events.seen("OrderCancelled", order_id=order_id)
        assert cancelled["by"] == DESK_ADMIN
        # The slot is free again.
        again = await market.book(offering, start_at)
        assert again.status_code == 202, again.text

    async def test_a_frozen_escrow_is_refunded_and_the_refund_recorded(
        self, page, running_system, market
    ):
        order_id = await unschedulable_booking(market)  # paid; the mentor never connected Google
        await market.order_when(order_id, "paid", lambda o: o["status"] == "paid")
        cancelled = await market.api.post(
            f"/api/admin/orders/{order_id}/cancel",
            json={"reason": "the mentor left the platform"},
            headers=market.admin,
        )
        assert cancelled.status_code == 200, cancelled.text
        await sign_in(page, running_system.gateway, desk_admin(running_system))
        # Opened from the alert about its scheduling (the mentor had no Google calendar).
        alert = page.locator(f'{ROWS}[data-type="IntegrationFailure"]', has_text=order_id)
        await alert.get_by_role("button", name="Open order").click()
        await expect(page.locator(f'#order-view [data-order-id="{order_id}"]')).to_be_visible(
            timeout=FLOW_MS
        )
        await expect(page.get_by_label("Order id")).to_have_value(order_id)

        # Frozen, as payments says: release or refund; nothing to record yet.
        await expect(desk(page, "escrow")).to_have_text("frozen", timeout=FLOW_MS)
        await expect(desk_button(page, "Release escrow")).to_be_visible()
        await expect(desk_button(page, "Record refund")).to_have_count(0)

        await desk_button(page, "Refund mentee").click()
        await confirm(page, "Refund", reason="the session will not take place")

        await expect(desk(page, "escrow")).to_have_text("refund_due")
        await expect(desk_button(page, "Release escrow")).to_have_count(0)
        await expect(desk_button(page, "Refund mentee")).to_have_count(0)

        # Recording the refund takes its reference.
        await desk_button(page, "Record refund").click()
        dialog = page.get_by_role("dialog")
        await dialog.locator("#confirm-reason").fill("paid back by bank transfer")
        await dialog.get_by_role("button", name="Record refund", exact=True).click()
        await expect(dialog.locator("#confirm-message")).to_contain_text("reference is required")
        await dialog.get_by_label("Refund reference").fill("VIR-2030-0042")
        await dialog.get_by_role("button", name="Record refund", exact=True).click()
        await expect(dialog).to_be_hidden(timeout=FLOW_MS)

        await expect(desk(page, "escrow")).to_have_text("refunded")
        await expect(page.locator("#order-view")).to_contain_text("paid back to the mentee")
        await expect(page.locator("#order-view")).to_contain_text("VIR-2030-0042")
        await expect(page.locator("#order-view .actions")).to_have_count(0)
        settled = await escrow(market, order_id)
        assert (settled["status"], settled["reference"]) == ("refunded", "VIR-2030-0042")
        # Orders hears of it too (EscrowRefunded), and the order shows it.
        await market.order_when(
            order_id, "the refund on the order", lambda o: o["escrow"]["status"] == "refunded"
        )

    async def test_a_frozen_escrow_is_released_to_the_mentor(self, page, running_system, market):
        order_id = await unschedulable_booking(market)
        await market.order_when(order_id, "paid", lambda o: o["status"] == "paid")
        cancelled = await market.api.post(
            f"/api/admin/orders/{order_id}/cancel",
            json={"reason": "the mentee did not come; the mentor is paid anyway"},
            headers=market.admin,
        )
        assert cancelled.status_code == 200, cancelled.text
        await sign_in(page, running_system.gateway, desk_admin(running_system))
        await look_up(page, order_id)
        await expect(desk(page, "escrow")).to_have_text("frozen", timeout=FLOW_MS)

        await desk_button(page, "Release escrow").click()
        await expect(page.get_by_role("dialog")).to_contain_text("102.000 TND")
        await confirm(page, "Release", reason="the session took place by phone")

        await expect(desk(page, "escrow")).to_have_text("released")
        await expect(page.locator("#order-view")).to_contain_text("released to the mentor")
        await expect(page.locator("#order-view .actions")).to_have_count(0)
        settled = await escrow(market, order_id)
        assert (settled["status"], settled["reason"]) == (
            "released",
            "the session took place by phone",
        )

    async def test_a_failed_scheduling_is_retried_and_the_session_scheduled(
        self, page, running_system, market, google, events
    ):
        offering = await market.offering()
        mentor_id = offering["mentor_id"]
        await market.connect_calendar(mentor_id)
        # Google fails every insert until told otherwise: the booking fails (retried later).
        faulted = await google.post(
            "/_sandbox/faults", json={"kind": "http_500", "count": 1000, "endpoint": "insert"}
        )
        assert faulted.status_code == 200, faulted.text
        order_id = await market.booked(offering)
        await market.pay(await market.payment_ref(order_id))
        [failed] = await events.seen(
            "CalendarBookingFailed", order_id=order_id, reason="calendar_api_error"
        )
        assert failed["final"] is False and failed["next_attempt_at"]
        cleared = await google.delete("/_sandbox/faults")
        assert cleared.status_code == 200, cleared.text

        await sign_in(page, running_system.gateway, desk_admin(running_system))
        await look_up(page, order_id)
        await expect(desk(page, "session")).to_have_text("awaiting_calendar")
        await desk_button(page, "Retry scheduling").click()
        await confirm(page, "Retry now", reason="Google is answering again")

        await expect(page.locator("#order-view .scheduling")).to_be_visible()
        await expect(desk(page, "session")).to_have_text("scheduled", timeout=FLOW_MS)
        await expect(desk(page, "order")).to_have_text("confirmed", timeout=FLOW_MS)
        await expect(desk_button(page, "Retry scheduling")).to_have_count(0)
        session_id = (await market.order(order_id))["session"]["id"]
        [audit] = await events.seen(
            "AdminActionRecorded", action="retry_scheduling", session_id=session_id
        )
        assert (audit["by"], audit["reason"]) == (DESK_ADMIN, "Google is answering again")
        assert [e["id"] for e in await market.google_events(mentor_id)]
