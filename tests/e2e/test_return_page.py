"""The page Konnect sends the payer back to (`/pay/return/<order id>`), in a real browser
against the running system.

Debian's Chromium (`/usr/bin/chromium`), headless, driven by Playwright's Python API as in
test_dashboard.py; never a browser Playwright downloads. The payer pays (or fails) on the
sandbox Konnect's own page, in the browser, and the sandbox sends the browser on to the success
or fail URL payments gave the payment, as Konnect does. The page follows the order live; every
wait is Playwright's auto-waiting `expect`: no sleeps.

The browser runs in Tokyo (Asia/Tokyo, en-GB): the session's time must be shown in the viewer's
zone, named, not the mentor's (Africa/Tunis) nor UTC.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit
from zoneinfo import ZoneInfo

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect
from pydantic import SecretStr

from booking.runtime.auth import issue_order_token
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
FLOW_MS = 30_000  # a step of the flow through three services, on a loaded machine
VIEWER_ZONE = "Asia/Tokyo"
STRICT_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


# --- the browser -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the return page's tests drive Debian's Chromium "
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
    """A fresh browser context in Tokyo. An uncaught script error, or anything the page's
    Content-Security-Policy had to block, fails the test."""
    context = await browser.new_context(
        viewport={"width": 420, "height": 860}, timezone_id=VIEWER_ZONE, locale="en-GB"
    )
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


# --- the payer ---------------------------------------------------------------------------------


async def pay_url(market, order_id: str) -> str:
    order = await market.order_when(
        order_id, "the pay link", lambda o: o["payment"] and o["payment"]["pay_url"]
    )
    return order["payment"]["pay_url"]


async def at_konnect(market, order_id: str) -> dict[str, Any]:
    """The payment as the sandbox Konnect holds it (with the success and fail URLs it was
    given), once payments has opened it."""
    await pay_url(market, order_id)
    listed = await market.konnect.get("/_sandbox/payments", params={"order_id": order_id})
    assert listed.status_code == 200, listed.text
    [payment] = listed.json()["payments"]
    return payment


async def press_at_konnect(page: Page, market, order_id: str, button: str) -> dict[str, list[str]]:
    """On the sandbox Konnect's page, press Pay or Fail; Konnect sends the browser back to the
    return page. The query the browser arrived with."""
    await page.goto(await pay_url(market, order_id))
    await page.get_by_role("button", name=button, exact=True).click()
    await page.wait_for_url(re.compile(rf"/pay/return/{order_id}\?"))
    return parse_qs(urlsplit(page.url).query)


def order_link_key(running_system) -> bytes:
    """The key the running system signs order links with (derived from its JWT secret)."""
    env = running_system.env
    secret = env.get("AUTH_JWT_SECRET") or RuntimeSettings().auth_jwt_secret.get_secret_value()
    own = env.get("ORDER_LINK_SECRET")
    return RuntimeSettings(
        auth_jwt_secret=SecretStr(secret), order_link_secret=SecretStr(own) if own else None
    ).order_link_key


def bare(header: dict[str, str]) -> str:
    return header["Authorization"].removeprefix("Bearer ")


def return_page(running_system, order_id: str, **query: str) -> str:
    return f"{running_system.gateway}/pay/return/{order_id}?{urlencode(query)}"


headline = "#headline"


# --- the tests ---------------------------------------------------------------------------------


class TestServed:
    async def test_the_page_comes_from_the_gateway_under_a_strict_policy(self, api):
        page = await api.get(f"/pay/return/{uuid.uuid4()}", params={"outcome": "success"})
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == STRICT_CSP
        assert page.headers["referrer-policy"] == "no-referrer"
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "<script>" not in page.text and "http" not in page.text.replace("http-equiv", "")


class TestAfterPaying:
    async def test_the_payer_sees_the_payment_received_then_the_session_scheduled(
        self, page, market
    ):
        # The mentor has not connected Google yet: the session waits, paid, until they do.
        offering = await market.offering()
        mentor_id = offering["mentor_id"]
        order_id = await market.booked(offering)
        given = await at_konnect(market, order_id)

        query = await press_at_konnect(page, market, order_id, "Pay")

        # Where the browser landed is the success URL the payment was given, plus Konnect's ref.
        assert page.url.startswith(given["successUrl"])
        assert query["outcome"] == ["success"] and query["payment_ref"] == [given["id"]]
        await expect(page.locator(headline)).to_have_text("Payment received", timeout=FLOW_MS)
        await expect(page.locator("#payment-state")).to_have_text("Payment received")
        await expect(page.locator("#session-state")).to_have_text("Being scheduled")
        await expect(page.locator("#schedule")).to_be_hidden()
        await page.evaluate("window.sameDocument = true")

        await market.connect_calendar(mentor_id)

        await expect(page.locator(headline)).to_have_text(
            "Your session is scheduled", timeout=FLOW_MS
        )
        await expect(page.locator("#payment-state")).to_have_text("Payment received")
        await expect(page.locator("#session-state")).to_have_text("Scheduled")
        order = await market.order(order_id)
        session = order["session"]
        assert order["status"] == "confirmed"
        await expect(page.locator("#meet")).to_have_attribute("href", session["meet_link"])
        start = datetime.fromisoformat(session["start_at"]).astimezone(ZoneInfo(VIEWER_ZONE))
        end = datetime.fromisoformat(session["end_at"]).astimezone(ZoneInfo(VIEWER_ZONE))
        when = page.locator("#when")
        await expect(when).to_contain_text(f"{start:%H:%M}")
        await expect(when).to_contain_text(f"{end:%H:%M}")
        await expect(when).to_contain_text(str(start.day))
        await expect(page.locator("#zone")).to_have_text(f"({VIEWER_ZONE} time)")
        await expect(page.locator("time")).to_have_attribute(
            "datetime",
            re.compile(rf"^{datetime.fromisoformat(session['start_at']):%Y-%m-%dT%H:%M}"),
        )
        # Followed live, and the stream's end with the order is no trouble for the page.
        assert await page.evaluate("window.sameDocument") is True, "the page was reloaded"
        await expect(page.locator("#connection")).to_be_hidden()


class TestAPaymentThatFails:
    async def test_a_refused_card_offers_the_pay_link_and_paying_there_goes_through(
        self, page, market
    ):
        offering = await market.offering()
        order_id = await market.booked(offering)
        link = await pay_url(market, order_id)
        given = await at_konnect(market, order_id)

        query = await press_at_konnect(page, market, order_id, "Fail")

        assert page.url.startswith(given["failUrl"]) and query["outcome"] == ["failed"]
        await expect(page.locator(headline)).to_have_text(
            "Your payment did not go through", timeout=FLOW_MS
        )
        await expect(page.locator("#message")).to_contain_text("you can try again")
        await expect(page.locator("#pay-link")).to_have_attribute("href", link)

        # Konnect keeps the payment open: the payer tries again, from the page, and pays.
        await page.get_by_role("link", name="Try paying again").click()
        await page.get_by_role("button", name="Pay", exact=True).click()
        await page.wait_for_url(re.compile(rf"/pay/return/{order_id}\?.*outcome=success"))
        await expect(page.locator(headline)).not_to_have_text(
            re.compile("did not go through|Confirming"), timeout=FLOW_MS
        )
        await expect(page.locator("#payment-state")).to_have_text("Payment received")

    async def test_an_expired_payment_says_the_slot_was_freed_live(self, page, market, konnect):
        offering = await market.offering()
        order_id = await market.booked(offering)
        await press_at_konnect(page, market, order_id, "Fail")
        await expect(page.locator(headline)).to_have_text(
            "Your payment did not go through", timeout=FLOW_MS
        )

        # The payer gives up; the payment expires at Konnect, and its notification reaches us.
        ref = (await at_konnect(market, order_id))["id"]
        assert (await konnect.post(f"/_sandbox/payments/{ref}/expire")).status_code == 200
        webhook = f"{market.system.gateway}/api/payments/webhook"
        sent = await konnect.post(
            "/_sandbox/webhooks/send", json={"url": webhook, "payment_ref": ref}
        )
        assert sent.status_code == 200, sent.text

        await expect(page.locator(headline)).to_have_text("The payment failed", timeout=FLOW_MS)
        await expect(page.locator("#message")).to_contain_text("time slot was freed")
        await expect(page.locator("#message")).to_contain_text("Book the session again")
        await expect(page.locator("#retry")).to_be_hidden()
        await expect(page.locator("#connection")).to_be_hidden()


class TestABadLink:
    async def test_a_missing_forged_foreign_or_expired_token_says_the_link_is_invalid(
        self, page, market, running_system
    ):
        offering = await market.offering()
        order_id = await market.booked(offering)
        other_id = await market.booked(offering, market.next_week(hours=3))
        key = order_link_key(running_system)
        [genuine] = parse_qs(urlsplit((await at_konnect(market, order_id))["successUrl"]).query)[
            "token"
        ]
        bad = {
            "no token": None,
            "garbage": "not-a-token",
            "another key's": issue_order_token(b"k" * 32, uuid.UUID(order_id), 3600),
            "another order's": issue_order_token(key, uuid.UUID(other_id), 3600),
            "expired": issue_order_token(key, uuid.UUID(order_id), -3600),
            "another mentee's login token": bare(running_system.token("mentee")),
            "a mentor's login token": bare(running_system.token("mentor")),
        }
        for what, token in bad.items():
            query = {"outcome": "success"} | ({"token": token} if token else {})
            await page.goto(return_page(running_system, order_id, **query))
            await expect(page.locator(headline), what).to_have_text(
                "This link is invalid or has expired", timeout=FLOW_MS
            )
            await expect(page.locator("#steps"), what).to_be_hidden()

        # The same page with the token payments gave shows the booking.
        await page.goto(return_page(running_system, order_id, outcome="success", token=genuine))
        await expect(page.locator(headline)).to_have_text("Confirming your payment")
        await expect(page.locator("#payment-state")).to_have_text(
            "Waiting for Konnect's confirmation"
        )

    async def test_a_mangled_order_id_says_the_link_is_invalid(self, page, running_system):
        await page.goto(return_page(running_system, "not-an-order", token="x", outcome="failed"))
        await expect(page.locator(headline)).to_have_text("This link is invalid or has expired")
