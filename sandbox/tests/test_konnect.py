"""The Konnect sandbox speaks Konnect's API v2, calls webhooks as Konnect does, and stages the
rest (partial payments, refused cards, expiry, lost or repeated webhooks, faults) on demand.

Webhooks go over real HTTP: the sandbox and the merchant's webhook endpoint are both served on
loopback. Tests without a webhook call the sandbox in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response

from booking.devtools.fixtures import eventually, free_port, serving
from booking.sandbox.control import ControlAuth
from booking.sandbox.konnect import create_app
from booking.sandbox.settings import SandboxSettings

API_KEY = "sandbox-api-key-id:sandbox-api-key-secret"
PUBLIC_URL = "http://konnect.test"
WALLET = "000000000000000000000001"


@dataclass
class Konnect:
    """A sandbox and a client for it (`init` and `payment` send the API key)."""

    http: httpx.AsyncClient

    async def init(self, **fields: Any) -> dict[str, Any]:
        body = {"receiverWalletId": WALLET, "amount": 120_000, **fields}
        response = await self.http.post(
            "/api/v2/payments/init-payment", json=body, headers={"x-api-key": API_KEY}
        )
        assert response.status_code == 200, response.text
        return response.json()

    async def payment(self, ref: str) -> dict[str, Any]:
        response = await self.http.get(f"/api/v2/payments/{ref}", headers={"x-api-key": API_KEY})
        assert response.status_code == 200, response.text
        return response.json()["payment"]

    async def control(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = await self.http.post(f"/_sandbox/{path}", json=body)
        assert response.status_code == 200, response.text
        return response.json()


def sandbox_settings() -> SandboxSettings:
    return SandboxSettings(
        konnect_public_url=PUBLIC_URL,
        konnect_timeout_fault_seconds=0.2,
        konnect_webhook_timeout_seconds=5,
    )


@pytest.fixture
async def konnect(request: pytest.FixtureRequest) -> AsyncIterator[Konnect]:
    """A fresh sandbox. Tests with a webhook receiver get it served over real HTTP, so the
    whole round trip is on the wire as in a run; the others call it in-process, which is faster.
    """
    app = create_app(sandbox_settings())
    if "receiver" not in request.fixturenames:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://sandbox", auth=ControlAuth()
        ) as http:
            yield Konnect(http)
        return
    async with (
        serving(app) as url,
        httpx.AsyncClient(base_url=url, timeout=10, trust_env=False, auth=ControlAuth()) as http,
    ):
        yield Konnect(http)


@pytest.fixture
async def served_konnect() -> AsyncIterator[Konnect]:
    """A fresh sandbox over real HTTP, for tests about the wire itself (client timeouts)."""
    async with (
        serving(create_app(sandbox_settings())) as url,
        httpx.AsyncClient(base_url=url, timeout=10, trust_env=False, auth=ControlAuth()) as http,
    ):
        yield Konnect(http)


@dataclass
class Call:
    method: str
    path: str
    query: list[tuple[str, str]]
    body: bytes


@dataclass
class Receiver:
    """A merchant's webhook endpoint: every request that reached this test's URL."""

    url: str
    path: str
    everything: list[Call]

    @property
    def calls(self) -> list[Call]:
        return [call for call in self.everything if call.path == self.path]

    def refs(self) -> list[str | None]:
        return [dict(call.query).get("payment_ref") for call in self.calls]


@pytest.fixture(scope="module")
async def receiver_server() -> AsyncIterator[tuple[str, list[Call]]]:
    """One recording web server for the module; each test gets a path of its own on it."""
    app = FastAPI()
    recorded: list[Call] = []

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def record(request: Request) -> Response:
        query = list(request.query_params.multi_items())
        recorded.append(Call(request.method, request.url.path, query, await request.body()))
        return Response(status_code=200)

    async with serving(app) as url:
        yield url, recorded


@pytest.fixture
def receiver(receiver_server: tuple[str, list[Call]]) -> Receiver:
    url, recorded = receiver_server
    path = f"/{uuid.uuid4().hex}/api/payments/webhook"
    return Receiver(f"{url}{path}", path, recorded)


class TestAuth:
    @pytest.mark.parametrize("headers", [{}, {"x-api-key": "someone:else"}])
    async def test_init_without_the_right_key_is_401_in_konnect_errors_form(self, konnect, headers):
        response = await konnect.http.post(
            "/api/v2/payments/init-payment",
            json={"receiverWalletId": WALLET, "amount": 1000},
            headers=headers,
        )
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/json"
        [error] = response.json()["errors"]
        assert error["code"] == "unauthorized"
        assert error["target"] == "x-api-key"
        assert error["message"]

    async def test_reading_a_payment_needs_the_key_too(self, konnect):
        ref = (await konnect.init())["paymentRef"]
        response = await konnect.http.get(f"/api/v2/payments/{ref}")
        assert response.status_code == 401
        assert response.json()["errors"][0]["code"] == "unauthorized"


class TestInitValidation:
    @pytest.mark.parametrize(
        ("change", "target"),
        [
            ({"receiverWalletId": None}, "receiverWalletId"),
            ({"receiverWalletId": ""}, "receiverWalletId"),
            ({"amount": 120.5}, "amount"),
            ({"amount": 120000.0}, "amount"),
            ({"amount": "120000"}, "amount"),
            ({"amount": -5}, "amount"),
            ({"amount": 0}, "amount"),
            ({"token": "GBP"}, "token"),
            ({"type": "later"}, "type"),
            ({"lifespan": 0}, "lifespan"),
            ({"webhook": "not a url"}, "webhook"),
            ({"acceptedPaymentMethods": ["cash"]}, "acceptedPaymentMethods.0"),
        ],
    )
    async def test_bad_input_is_422_naming_the_field(self, konnect, change, target):
        body = {"receiverWalletId": WALLET, "amount": 120_000, **change}
        body = {key: value for key, value in body.items() if value is not None}
        response = await konnect.http.post(
            "/api/v2/payments/init-payment", json=body, headers={"x-api-key": API_KEY}
        )
        assert response.status_code == 422
        errors = response.json()["errors"]
        assert [e["target"] for e in errors] == [target]
        assert set(errors[0]) == {"code", "target", "message"}

    async def test_a_missing_field_is_reported_as_required(self, konnect):
        response = await konnect.http.post(
            "/api/v2/payments/init-payment", json={}, headers={"x-api-key": API_KEY}
        )
        assert response.status_code == 422
        assert {(e["code"], e["target"]) for e in response.json()["errors"]} == {
            ("required", "receiverWalletId"),
            ("required", "amount"),
        }

    async def test_a_body_that_is_not_json_is_400(self, konnect):
        response = await konnect.http.post(
            "/api/v2/payments/init-payment",
            content=b"amount=1000",
            headers={"x-api-key": API_KEY, "content-type": "application/json"},
        )
        assert response.status_code == 400
        assert response.json()["errors"][0]["target"] == "body"

    async def test_unknown_fields_are_ignored(self, konnect):
        answer = await konnect.init(somethingNew=True, feesIncluded=False)
        assert "paymentRef" in answer


class TestInitAndRead:
    async def test_init_answers_a_24_hex_ref_and_a_pay_url(self, konnect):
        answer = await konnect.init()
        assert set(answer) == {"payUrl", "paymentRef"}
        assert re.fullmatch(r"[0-9a-f]{24}", answer["paymentRef"])
        assert answer["payUrl"] == f"{PUBLIC_URL}/pay/{answer['paymentRef']}"

    async def test_the_payment_reads_back_as_konnect_shapes_it(self, konnect):
        order_id = str(uuid.uuid4())
        webhook = "https://merchant.example/api/payments/webhook"
        before = datetime.now(UTC)
        answer = await konnect.init(
            amount=75_500,
            orderId=order_id,
            description="Mentoring, 1 hour",
            webhook=webhook,
            silentWebhook=True,
            lifespan=30,
        )
        payment = await konnect.payment(answer["paymentRef"])

        assert payment["id"] == answer["paymentRef"]
        assert payment["status"] == "pending"
        assert payment["amount"] == 75_500
        assert payment["amountDue"] == 75_500
        assert payment["reachedAmount"] == 0
        assert payment["token"] == "TND"
        assert payment["type"] == "immediate"
        assert payment["orderId"] == order_id
        assert payment["description"] == "Mentoring, 1 hour"
        assert payment["webhook"] == webhook
        assert payment["link"] == answer["payUrl"]
        assert payment["acceptedPaymentMethods"] == ["wallet", "bank_card", "e-DINAR", "flouci"]
        assert payment["successfulTransactions"] == 0
        assert payment["failedTransactions"] == 0
        assert payment["transactions"] == []
        for stamp in ("createdAt", "updatedAt", "expirationDate"):
            assert payment[stamp].endswith("Z")
        expires = datetime.fromisoformat(payment["expirationDate"])
        created = datetime.fromisoformat(payment["createdAt"])
        assert created >= before.replace(microsecond=0)
        assert (expires - created).total_seconds() == 30 * 60

    async def test_each_init_makes_a_new_payment(self, konnect):
        order_id = str(uuid.uuid4())
        first = await konnect.init(orderId=order_id)
        second = await konnect.init(orderId=order_id)
        await konnect.init(orderId=str(uuid.uuid4()))

        assert first["paymentRef"] != second["paymentRef"]
        listed = await konnect.http.get("/_sandbox/payments", params={"order_id": order_id})
        assert [p["id"] for p in listed.json()["payments"]] == [
            first["paymentRef"],
            second["paymentRef"],
        ]
        everything = (await konnect.http.get("/_sandbox/payments")).json()["payments"]
        assert len(everything) == 3

    @pytest.mark.parametrize("ref", ["0123456789abcdef01234567", "not-a-ref"])
    async def test_an_unknown_ref_is_404_in_konnect_errors_form(self, konnect, ref):
        response = await konnect.http.get(f"/api/v2/payments/{ref}", headers={"x-api-key": API_KEY})
        assert response.status_code == 404
        assert response.json()["errors"][0]["code"] == "not_found"


class TestOutcomes:
    async def test_a_full_payment_completes_it(self, konnect):
        ref = (await konnect.init(amount=50_000))["paymentRef"]
        answer = await konnect.control(f"payments/{ref}/complete")
        payment = await konnect.payment(ref)

        assert answer["payment"] == payment
        assert payment["status"] == "completed"
        assert payment["reachedAmount"] == 50_000
        assert payment["amountDue"] == 0
        assert payment["successfulTransactions"] == 1
        [transaction] = payment["transactions"]
        assert transaction["status"] == "success"
        assert transaction["method"] == "bank_card"
        assert transaction["amount"] == 50_000

    async def test_a_partial_payment_stays_pending_until_the_rest_arrives(self, konnect):
        ref = (await konnect.init(amount=50_000))["paymentRef"]

        await konnect.control(f"payments/{ref}/complete", {"amount": 20_000})
        partly = await konnect.payment(ref)
        assert partly["status"] == "pending"
        assert partly["type"] == "partial"
        assert partly["reachedAmount"] == 20_000
        assert partly["amountDue"] == 30_000

        await konnect.control(f"payments/{ref}/complete")
        paid = await konnect.payment(ref)
        assert paid["status"] == "completed"
        assert paid["reachedAmount"] == 50_000
        assert paid["successfulTransactions"] == 2

    async def test_fees_added_to_the_amount_show_in_the_transaction_not_the_payment(self, konnect):
        ref = (await konnect.init(amount=100_000, addPaymentFeesToAmount=True))["paymentRef"]
        await konnect.control(f"payments/{ref}/complete")
        payment = await konnect.payment(ref)
        [transaction] = payment["transactions"]
        assert payment["reachedAmount"] == 100_000
        assert transaction["amount"] == 100_000 + transaction["fees"]
        assert transaction["fees"] > 0

    async def test_a_failed_attempt_leaves_it_pending_for_another_try(self, konnect):
        ref = (await konnect.init())["paymentRef"]
        await konnect.control(f"payments/{ref}/fail")
        failed = await konnect.payment(ref)
        assert failed["status"] == "pending"
        assert failed["failedTransactions"] == 1
        assert failed["transactions"][0]["status"] == "failed"

        await konnect.control(f"payments/{ref}/complete")
        assert (await konnect.payment(ref))["status"] == "completed"

    async def test_an_expired_payment_reads_expired(self, konnect):
        ref = (await konnect.init())["paymentRef"]
        await konnect.control(f"payments/{ref}/expire")
        payment = await konnect.payment(ref)
        assert payment["status"] == "expired"
        assert datetime.fromisoformat(payment["expirationDate"]) < datetime.now(UTC)

    async def test_money_can_still_arrive_after_expiry(self, konnect):
        # The late payment that raced the expiry: the control API can stage it.
        ref = (await konnect.init())["paymentRef"]
        await konnect.control(f"payments/{ref}/expire")
        await konnect.control(f"payments/{ref}/complete")
        assert (await konnect.payment(ref))["status"] == "completed"

    async def test_a_completed_payment_takes_no_more_attempts(self, konnect):
        ref = (await konnect.init())["paymentRef"]
        await konnect.control(f"payments/{ref}/complete")
        response = await konnect.http.post(f"/_sandbox/payments/{ref}/complete")
        assert response.status_code == 409
        assert response.headers["content-type"] == "application/problem+json"

    async def test_reset_forgets_every_payment(self, konnect):
        ref = (await konnect.init())["paymentRef"]
        await konnect.control("reset")
        response = await konnect.http.get(f"/api/v2/payments/{ref}", headers={"x-api-key": API_KEY})
        assert response.status_code == 404
        assert (await konnect.http.get("/_sandbox/payments")).json() == {"payments": []}


class TestWebhooks:
    async def test_once_is_a_get_with_the_ref_appended_to_the_query(self, konnect, receiver):
        webhook = f"{receiver.url}?source=konnect"
        ref = (await konnect.init(webhook=webhook, silentWebhook=True))["paymentRef"]

        answer = await konnect.control(f"payments/{ref}/complete")

        [call] = receiver.calls
        assert call.method == "GET"
        assert call.path == receiver.path
        assert call.query == [("source", "konnect"), ("payment_ref", ref)]
        assert call.body == b""
        [delivery] = answer["webhooks"]
        assert delivery["status_code"] == 200
        assert delivery["url"] == f"{webhook}&payment_ref={ref}"
        log = (await konnect.http.get("/_sandbox/webhooks")).json()["deliveries"]
        assert log == [delivery]

    async def test_twice_calls_it_two_times(self, konnect, receiver):
        ref = (await konnect.init(webhook=receiver.url))["paymentRef"]
        answer = await konnect.control(f"payments/{ref}/complete", {"webhook": "twice"})
        assert receiver.refs() == [ref, ref]
        assert [d["status_code"] for d in answer["webhooks"]] == [200, 200]

    async def test_none_is_a_lost_webhook(self, konnect, receiver):
        ref = (await konnect.init(webhook=receiver.url))["paymentRef"]
        answer = await konnect.control(f"payments/{ref}/complete", {"webhook": "none"})
        assert answer["webhooks"] == []
        assert answer["payment"]["status"] == "completed"
        assert receiver.calls == []
        assert (await konnect.http.get("/_sandbox/webhooks")).json() == {"deliveries": []}

    async def test_late_calls_it_after_answering(self, konnect, receiver):
        ref = (await konnect.init(webhook=receiver.url))["paymentRef"]
        answer = await konnect.control(
            f"payments/{ref}/complete", {"webhook": "late", "delay_seconds": 0.1}
        )
        assert answer["webhooks"] == []
        await eventually(lambda: receiver.refs() == [ref], what="the late webhook")

    async def test_a_failed_attempt_calls_the_webhook_too(self, konnect, receiver):
        ref = (await konnect.init(webhook=receiver.url))["paymentRef"]
        answer = await konnect.control(f"payments/{ref}/fail")
        assert receiver.refs() == [ref]
        assert answer["payment"]["status"] == "pending"

    async def test_a_forged_webhook_goes_out_for_any_ref(self, konnect, receiver):
        forged = "ffffffffffffffffffffffff"
        response = await konnect.http.post(
            "/_sandbox/webhooks/send", json={"url": receiver.url, "payment_ref": forged}
        )
        assert response.status_code == 200
        assert response.json()["status_code"] == 200
        assert response.json()["payment_ref"] == forged
        assert receiver.refs() == [forged]

    async def test_an_unreachable_endpoint_is_logged_as_an_error(self, konnect):
        closed = f"http://127.0.0.1:{free_port()}/webhook"
        response = await konnect.http.post(
            "/_sandbox/webhooks/send", json={"url": closed, "payment_ref": "a" * 24}
        )
        delivery = response.json()
        assert delivery["status_code"] is None
        assert "ConnectError" in delivery["error"]


DEPLOYED_TOKEN = "a-staging-token-from-the-secret-manager-0123456789"


@pytest.fixture
async def deployed_konnect() -> AsyncIterator[Callable[..., Awaitable[Konnect]]]:
    """`await deployed_konnect(**settings)`: a sandbox as a deployment runs it (no development
    mode, a token of its own), served over real HTTP."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(**settings: Any) -> Konnect:
            values = {
                "development_mode": False,
                "control_token": DEPLOYED_TOKEN,
                "konnect_webhook_timeout_seconds": 5,
                **settings,
            }
            url = await stack.enter_async_context(serving(create_app(SandboxSettings(**values))))
            http = httpx.AsyncClient(
                base_url=url, timeout=10, trust_env=False, auth=ControlAuth(DEPLOYED_TOKEN)
            )
            await stack.enter_async_context(http)
            return Konnect(http)

        yield make


class TestForgedWebhooks:
    """/_sandbox/webhooks/send calls only a payment's webhook URL or an allowed host: never a
    relay to whatever address the sandbox's network reaches."""

    @pytest.mark.parametrize(
        ("url", "host"),
        [
            ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
            ("http://10.0.0.5:8080/admin", "10.0.0.5"),
            ("https://internal.example/hook", "internal.example"),
            # What the URL says before the @ is a user name, not the host.
            ("http://127.0.0.1@internal.example/hook", "internal.example"),
            # Loopback spelled so that a resolver, not an address parser, would say so.
            ("http://127.1:8000/hook", "127.1"),
        ],
    )
    async def test_an_arbitrary_address_is_refused_and_nothing_is_sent(self, konnect, url, host):
        response = await konnect.http.post(
            "/_sandbox/webhooks/send", json={"url": url, "payment_ref": "a" * 24}
        )
        assert response.status_code == 403, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert f"{host} is neither" in response.json()["detail"]
        assert (await konnect.http.get("/_sandbox/webhooks")).json() == {"deliveries": []}

    async def test_outside_development_mode_only_a_payments_webhook_url_is_called(
        self, deployed_konnect, receiver
    ):
        konnect = await deployed_konnect()
        ref = (await konnect.init(webhook=receiver.url))["paymentRef"]
        sent = await konnect.http.post(
            "/_sandbox/webhooks/send", json={"url": receiver.url, "payment_ref": ref}
        )
        assert sent.status_code == 200, sent.text
        assert receiver.refs() == [ref]
        # Loopback, but no payment's webhook: development mode alone allows it.
        elsewhere = receiver.url.replace("/api/payments/webhook", "/elsewhere")
        refused = await konnect.http.post(
            "/_sandbox/webhooks/send", json={"url": elsewhere, "payment_ref": ref}
        )
        assert refused.status_code == 403, refused.text
        assert [c.path for c in receiver.everything if "elsewhere" in c.path] == []

    async def test_a_host_in_the_allowlist_may_be_called(self, deployed_konnect, receiver):
        konnect = await deployed_konnect(konnect_forged_webhook_hosts=["127.0.0.1"])
        forged = "f" * 24
        sent = await konnect.http.post(
            "/_sandbox/webhooks/send", json={"url": receiver.url, "payment_ref": forged}
        )
        assert sent.status_code == 200, sent.text
        assert receiver.refs() == [forged]

    async def test_without_the_token_nothing_is_sent(self, deployed_konnect, receiver):
        konnect = await deployed_konnect()
        ref = (await konnect.init(webhook=receiver.url))["paymentRef"]
        response = await konnect.http.post(
            "/_sandbox/webhooks/send",
            json={"url": receiver.url, "payment_ref": ref},
            headers={"Authorization": "Bearer not-the-token"},
        )
        assert response.status_code == 401
        assert receiver.calls == []


class TestFaults:
    async def test_two_503s_then_normal_service(self, konnect):
        await konnect.control("faults", {"kind": "http_503", "count": 2, "endpoint": "init"})
        body = {"receiverWalletId": WALLET, "amount": 1000}
        headers = {"x-api-key": API_KEY}
        statuses = []
        for _ in range(3):
            response = await konnect.http.post(
                "/api/v2/payments/init-payment", json=body, headers=headers
            )
            statuses.append(response.status_code)
        assert statuses == [503, 503, 200]
        assert response.json()["paymentRef"]
        assert (await konnect.http.get("/_sandbox/faults")).json() == {"faults": []}

    async def test_a_fault_for_one_endpoint_leaves_the_other_alone(self, konnect):
        ref = (await konnect.init())["paymentRef"]
        await konnect.control("faults", {"kind": "http_500", "count": 1, "endpoint": "init"})
        assert (await konnect.payment(ref))["id"] == ref
        listed = (await konnect.http.get("/_sandbox/faults")).json()["faults"]
        assert listed == [{"kind": "http_500", "count": 1, "endpoint": "init"}]
        await konnect.http.delete("/_sandbox/faults")
        assert (await konnect.init())["paymentRef"]

    async def test_other_api_paths_never_use_a_fault_up(self, konnect):
        # A health probe's ping must not steal the fault a test set for the payments client.
        await konnect.control("faults", {"kind": "http_503", "count": 1})
        ping = await konnect.http.get("/api/v2/")
        assert ping.status_code == 401
        listed = (await konnect.http.get("/_sandbox/faults")).json()["faults"]
        assert listed == [{"kind": "http_503", "count": 1, "endpoint": "any"}]

    async def test_429_says_when_to_retry(self, konnect):
        ref = (await konnect.init())["paymentRef"]
        await konnect.control("faults", {"kind": "http_429", "count": 1})
        response = await konnect.http.get(f"/api/v2/payments/{ref}", headers={"x-api-key": API_KEY})
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        assert response.json()["errors"][0]["code"] == "too_many_requests"

    async def test_switches_queue_up_in_order(self, konnect):
        await konnect.control("faults", {"kind": "http_500", "count": 1})
        await konnect.control("faults", {"kind": "http_429", "count": 1})
        headers = {"x-api-key": API_KEY}
        statuses = [
            (await konnect.http.get(f"/api/v2/payments/{'0' * 24}", headers=headers)).status_code
            for _ in range(3)
        ]
        assert statuses == [500, 429, 404]

    async def test_timeout_hangs_then_answers_504(self, served_konnect):
        konnect = served_konnect
        await konnect.control("faults", {"kind": "timeout", "count": 1})
        # A client that waits less than the hang (0.2 s here) gives up, as a payments client would.
        with pytest.raises(httpx.ReadTimeout):
            await konnect.http.post(
                "/api/v2/payments/init-payment",
                json={"receiverWalletId": WALLET, "amount": 1000},
                headers={"x-api-key": API_KEY},
                timeout=httpx.Timeout(5, read=0.05),
            )

        async def used_up() -> bool:
            return (await konnect.http.get("/_sandbox/faults")).json() == {"faults": []}

        await eventually(used_up, what="the timeout fault to be used up")
        await konnect.control("faults", {"kind": "timeout", "count": 1})
        patient = await konnect.http.get(f"/api/v2/payments/{'0' * 24}")
        assert patient.status_code == 504
        assert patient.json()["errors"][0]["code"] == "gateway_timeout"
        assert (await konnect.init())["paymentRef"]


class TestPayPage:
    async def test_it_shows_the_amount_description_and_both_buttons(self, konnect):
        ref = (await konnect.init(amount=120_000, description="Mentoring <1h>"))["paymentRef"]
        response = await konnect.http.get(f"/pay/{ref}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        page = response.text
        assert "120.000 TND" in page
        assert "Mentoring &lt;1h&gt;" in page
        assert "pending" in page
        assert f'action="/pay/{ref}/pay"' in page
        assert f'action="/pay/{ref}/fail"' in page
        # No external assets: the page works offline.
        assert "src=" not in page
        assert "<link" not in page

    async def test_pay_completes_calls_the_webhook_and_goes_to_the_success_url(
        self, konnect, receiver
    ):
        ref = (
            await konnect.init(
                webhook=receiver.url,
                silentWebhook=True,
                successUrl="https://shop.example/paid?order=7",
                failUrl="https://shop.example/failed",
            )
        )["paymentRef"]
        response = await konnect.http.post(f"/pay/{ref}/pay")
        assert response.status_code == 303
        assert (
            response.headers["location"] == f"https://shop.example/paid?order=7&payment_ref={ref}"
        )
        assert receiver.refs() == [ref]
        assert (await konnect.payment(ref))["status"] == "completed"

        again = await konnect.http.get(f"/pay/{ref}")
        assert "already completed" in again.text
        assert "<form" not in again.text

    async def test_fail_records_a_failed_attempt_and_goes_to_the_fail_url(self, konnect, receiver):
        ref = (
            await konnect.init(
                webhook=receiver.url, silentWebhook=True, failUrl="https://shop.example/failed"
            )
        )["paymentRef"]
        response = await konnect.http.post(f"/pay/{ref}/fail")
        assert response.status_code == 303
        assert response.headers["location"] == f"https://shop.example/failed?payment_ref={ref}"
        assert receiver.refs() == [ref]
        payment = await konnect.payment(ref)
        assert (payment["status"], payment["failedTransactions"]) == ("pending", 1)

    async def test_without_a_success_url_it_shows_the_result(self, konnect):
        ref = (await konnect.init())["paymentRef"]
        response = await konnect.http.post(f"/pay/{ref}/pay")
        assert response.status_code == 200
        assert "Payment completed" in response.text

    async def test_a_webhook_that_is_not_silent_is_where_the_browser_goes(self, konnect, receiver):
        ref = (await konnect.init(webhook=receiver.url, silentWebhook=False))["paymentRef"]
        response = await konnect.http.post(f"/pay/{ref}/pay")
        assert response.status_code == 303
        assert response.headers["location"] == f"{receiver.url}?payment_ref={ref}"
        assert receiver.calls == []

    async def test_an_expired_payment_cannot_be_paid(self, konnect):
        ref = (await konnect.init())["paymentRef"]
        await konnect.control(f"payments/{ref}/expire")
        assert "expired" in (await konnect.http.get(f"/pay/{ref}")).text
        response = await konnect.http.post(f"/pay/{ref}/pay")
        assert response.status_code == 409
        assert (await konnect.payment(ref))["status"] == "expired"


class TestServeCommand:
    async def test_python_m_booking_sandbox_konnect_serve(self):
        port = free_port()
        env = {**os.environ, "SANDBOX_KONNECT_PORT": str(port), "LOG_LEVEL": "WARNING"}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "booking.sandbox", "konnect", "serve", env=env
        )
        url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(base_url=url, trust_env=False) as http:

                async def live() -> bool:
                    assert process.returncode is None, "the sandbox exited"
                    try:
                        return (await http.get("/health/live")).status_code == 200
                    except httpx.TransportError:
                        return False

                await eventually(live, what="the sandbox to serve", timeout=30)
                response = await http.post(
                    "/api/v2/payments/init-payment",
                    json={"receiverWalletId": WALLET, "amount": 1000},
                    headers={"x-api-key": API_KEY},
                )
            assert response.json()["payUrl"].startswith(f"{url}/pay/")
        finally:
            process.terminate()
            await process.wait()
