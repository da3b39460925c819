"""KonnectClient against the Konnect sandbox over real HTTP: auth, errors, bounded retries."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from booking.devtools.fixtures import free_port
from booking.payments.konnect import (
    KonnectClient,
    KonnectRefused,
    KonnectUnauthorized,
    KonnectUnavailable,
    PaymentNotFound,
    PaymentRequest,
)
from booking.runtime.transport import CancelSafeTransport

KEY = "sandbox-api-key-id:sandbox-api-key-secret"


class Calls:
    """Every request the client sent, as (method, path)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    async def __call__(self, request: httpx.Request) -> None:
        self.sent.append((request.method, request.url.path))


@pytest.fixture
async def make_client(sandbox) -> AsyncIterator[Callable[..., Any]]:
    clients: list[KonnectClient] = []

    async def make(**overrides: Any) -> tuple[KonnectClient, Calls]:
        calls = Calls()
        options: dict[str, Any] = {
            "api_url": sandbox.api_url,
            "api_key": SecretStr(KEY),
            "wallet_id": "5f7a209aeb3f76490ac4a3d1",
            "timeout": 2.0,
            "max_attempts": 3,
            "retry_base": 0.01,
            "retry_after_max": 1.5,
            "event_hooks": {"request": [calls]},
        }
        options.update(overrides)
        client = KonnectClient(**options)
        await client.open()
        clients.append(client)
        return client, calls

    yield make
    for client in clients:
        await client.aclose()


def request(order_id: uuid.UUID | None = None, amount: int = 33_333) -> PaymentRequest:
    return PaymentRequest(
        order_id=order_id or uuid.uuid4(),
        amount=amount,
        currency="TND",
        description="Career chat",
        first_name="Amira",
        last_name="Ben Salah",
        email="amira@example.com",
        phone="+21620123456",
        lifespan_minutes=30,
        webhook_url="http://127.0.0.1:9/api/payments/webhook",
        success_url="http://127.0.0.1:9/payments/success",
        fail_url="http://127.0.0.1:9/payments/failed",
    )


class TestCalls:
    async def test_init_opens_one_payment_for_our_order_in_millimes(self, make_client, sandbox):
        client, calls = await make_client()
        order = request()

        opened = await client.init_payment(order)

        assert len(opened.payment_ref) == 24 and int(opened.payment_ref, 16) >= 0
        assert opened.pay_url.startswith("http")
        [payment] = await sandbox.payments(order.order_id)
        assert payment["id"] == opened.payment_ref
        assert (payment["amount"], payment["token"], payment["type"]) == (
            33_333,
            "TND",
            "immediate",
        )
        assert payment["webhook"] == order.webhook_url and payment["silentWebhook"] is True
        assert payment["successUrl"] == order.success_url and payment["failUrl"] == order.fail_url
        assert calls.sent == [("POST", "/api/v2/payments/init-payment")]

    async def test_get_returns_the_payment_object(self, make_client):
        client, _ = await make_client()
        order = request()
        opened = await client.init_payment(order)

        payment = await client.get_payment(opened.payment_ref)

        assert payment["id"] == opened.payment_ref
        assert payment["orderId"] == str(order.order_id) and payment["status"] == "pending"


class TestErrors:
    async def test_the_api_key_is_sent_and_a_wrong_one_is_unauthorized(self, make_client):
        client, calls = await make_client(api_key=SecretStr("someone:else"))

        with pytest.raises(KonnectUnauthorized) as refused:
            await client.init_payment(request())

        assert refused.value.status == 401
        assert refused.value.errors[0]["target"] == "x-api-key"
        assert len(calls.sent) == 1  # a 4xx is an answer, not retried

    async def test_a_refused_request_says_what_konnect_said_and_is_not_retried(self, make_client):
        client, calls = await make_client()

        with pytest.raises(KonnectRefused) as refused:
            await client.init_payment(request(amount=0))

        assert refused.value.status in (400, 422)
        assert any(e.get("target") == "amount" for e in refused.value.errors)
        assert "amount" in refused.value.message and "amount" in str(refused.value)
        assert len(calls.sent) == 1

    async def test_an_unknown_ref_is_payment_not_found(self, make_client):
        client, calls = await make_client()

        with pytest.raises(PaymentNotFound) as missing:
            await client.get_payment("0123456789abcdef01234567")

        assert missing.value.status == 404 and missing.value.errors
        assert len(calls.sent) == 1


class TestRetries:
    async def test_503_twice_then_success_makes_one_payment(self, make_client, sandbox):
        client, calls = await make_client()
        await sandbox.fault("http_503", count=2, endpoint="init")
        order = request()

        opened = await client.init_payment(order)

        assert [p["id"] for p in await sandbox.payments(order.order_id)] == [opened.payment_ref]
        assert len(calls.sent) == 3

    async def test_429_is_retried_after_the_retry_after(self, make_client, sandbox):
        client, calls = await make_client()
        opened = await client.init_payment(request())
        await sandbox.fault("http_429", count=1, endpoint="get")

        payment = await client.get_payment(opened.payment_ref)

        assert payment["id"] == opened.payment_ref
        assert len(calls.sent) == 3  # the init, the 429, the retry

    async def test_a_retry_after_longer_than_we_wait_ends_the_retries(self, make_client, sandbox):
        client, calls = await make_client(retry_after_max=0.5)
        await sandbox.fault("http_429", count=3, endpoint="init")

        with pytest.raises(KonnectUnavailable) as down:
            await client.init_payment(request())

        assert down.value.attempts == 1 and len(calls.sent) == 1

    async def test_a_timeout_is_retried(self, make_client, sandbox):
        # Well under the sandbox's hang (SANDBOX_HANG_SECONDS), and long enough that the retry's
        # own connect and read do not time out on a busy machine.
        client, calls = await make_client(timeout=1.5)
        opened = await client.init_payment(request())
        await sandbox.fault("timeout", count=1, endpoint="get")

        payment = await client.get_payment(opened.payment_ref)

        assert payment["id"] == opened.payment_ref
        assert len(calls.sent) == 3

    async def test_down_beyond_the_retries_is_unavailable(self, make_client, sandbox):
        client, calls = await make_client(max_attempts=3)
        await sandbox.fault("http_500", count=5, endpoint="init")
        order = request()

        with pytest.raises(KonnectUnavailable) as down:
            await client.init_payment(order)

        assert down.value.attempts == 3 and len(calls.sent) == 3
        assert "500" in str(down.value)
        assert await sandbox.payments(order.order_id) == []

    async def test_unreachable_is_unavailable(self, make_client):
        client, calls = await make_client(api_url=f"http://127.0.0.1:{free_port()}/api/v2")

        with pytest.raises(KonnectUnavailable) as down:
            await client.get_payment("0123456789abcdef01234567")

        assert down.value.attempts == 3 and len(calls.sent) == 3
        assert "unreachable" in str(down.value)


class TestSecrets:
    async def test_the_api_key_never_reaches_a_log_or_an_error(
        self, make_client, sandbox, caplog: pytest.LogCaptureFixture
    ):
        caplog.set_level(logging.DEBUG)
        client, _ = await make_client()
        await sandbox.fault("http_503", count=1, endpoint="init")
        opened = await client.init_payment(request())
        errors: list[Exception] = []
        await sandbox.fault("http_500", count=3, endpoint="get")
        with pytest.raises(KonnectUnavailable) as down:
            await client.get_payment(opened.payment_ref)
        errors.append(down.value)
        wrong, _ = await make_client(api_key=SecretStr(f"{KEY}-wrong"))
        with pytest.raises(KonnectUnauthorized) as refused:
            await wrong.get_payment(opened.payment_ref)
        errors.append(refused.value)

        assert "retrying" in caplog.text  # the retries were logged...
        for text in [caplog.text, *map(str, errors), *map(repr, errors), repr(client)]:
            assert "sandbox-api-key-secret" not in text  # ...and the key never


async def test_the_client_sends_through_the_cancel_safe_transport(make_client):
    # httpx's own pool leaks a slot per request cancelled under contention (httpcore #1093):
    # payments then answered PoolTimeout to every Konnect call after an overload.
    client, _ = await make_client()
    assert isinstance(client.http._transport, CancelSafeTransport)
