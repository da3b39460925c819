"""The payer's return page at /pay/return/<order id>: served by the gateway alone, under the
dashboard's strict headers, whatever the link holds; its token never reaches an access log.
What the page shows is the whole system's business: tests/e2e/test_return_page.py."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from booking.gateway.app import create_app
from booking.gateway.settings import GatewaySettings

STRICT_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@pytest.fixture
async def gateway() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(GatewaySettings())  # connects to nothing: no lifespan here
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        yield client


def assert_strict(response: httpx.Response) -> None:
    assert response.headers["content-security-policy"] == STRICT_CSP
    assert response.headers["x-content-type-options"] == "nosniff"
    # The address holds the order link: no click on the Meet or pay link may carry it away.
    assert response.headers["referrer-policy"] == "no-referrer"


class TestServed:
    async def test_the_page_loads_for_any_token_under_the_strict_policy(self, gateway):
        order_id = uuid.uuid4()
        for query in ("?outcome=success&token=abc&payment_ref=0f0f", "?outcome=failed", ""):
            page = await gateway.get(f"/pay/return/{order_id}{query}")
            assert page.status_code == 200, query
            assert page.headers["content-type"] == "text/html; charset=utf-8"
            assert_strict(page)
        # Its script is a file of its own, nothing inline, nothing from elsewhere.
        scripts = re.findall(r"<script[^>]*>", page.text)
        assert scripts == ['<script type="module" src="assets/return.js">']
        assert "http" not in page.text.replace("http-equiv", "")
        assert "style=" not in page.text and "<style" not in page.text

    async def test_a_mangled_order_id_still_gets_the_page_as_a_404(self, gateway):
        page = await gateway.get("/pay/return/not-an-order?outcome=success&token=abc")
        assert page.status_code == 404
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert_strict(page)

    async def test_its_files_are_served_and_nothing_else(self, gateway):
        for name, media_type in [
            ("return.js", "text/javascript; charset=utf-8"),
            ("style.css", "text/css; charset=utf-8"),
            ("favicon.svg", "image/svg+xml"),
        ]:
            answer = await gateway.get(f"/pay/return/assets/{name}")
            assert answer.status_code == 200, name
            assert answer.headers["content-type"] == media_type
            assert_strict(answer)
        for missing in ("nope.js", "__init__.py", "index.html", "..%2f__init__.py"):
            answer = await gateway.get(f"/pay/return/assets/{missing}")
            assert answer.status_code == 404, missing
            assert answer.headers["content-type"] == "application/problem+json"


class TestAccessLogs:
    def test_the_order_links_token_is_redacted_and_the_rest_kept(
        self, caplog: pytest.LogCaptureFixture
    ):
        create_app(GatewaySettings())
        caplog.set_level(logging.INFO, logger="uvicorn.access")
        access = logging.getLogger("uvicorn.access")
        order_id = uuid.uuid4()

        access.info(
            '%s - "%s %s HTTP/%s" %d',
            "203.0.113.9:5123",
            "GET",
            f"/pay/return/{order_id}?outcome=success&token=eyJ.secret.sig&payment_ref=ab12",
            "1.1",
            200,
        )
        access.info(
            '%s - "%s %s HTTP/%s" %d',
            "203.0.113.9:5124",
            "GET",
            f"/api/orders/{order_id}/events?access_token=eyJ.secret.sig",
            "1.1",
            200,
        )

        lines = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
        assert lines == [
            f'203.0.113.9:5123 - "GET /pay/return/{order_id}?outcome=success&token=[redacted]'
            '&payment_ref=ab12 HTTP/1.1" 200',
            f'203.0.113.9:5124 - "GET /api/orders/{order_id}/events?access_token=[redacted] '
            'HTTP/1.1" 200',
        ]
