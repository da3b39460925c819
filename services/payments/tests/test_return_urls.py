"""Where Konnect sends the payer back: each payment's success and fail URLs name its order and
carry an order link, a token that reads that order alone (booking.runtime.auth), so the page
there can follow the booking without a sign-in."""

from __future__ import annotations

import uuid
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest

from booking.payments.konnect import return_url
from booking.runtime.auth import InvalidToken, verify_order_token


def split(url: str) -> tuple[str, dict[str, list[str]]]:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}", parse_qs(parts.query)


class TestTheUrlsKonnectIsGiven:
    async def test_they_name_the_order_and_carry_a_token_that_reads_that_order(
        self, payments, sandbox
    ):
        event = await payments.request_booking()
        await payments.initiated(event.order_id)

        [at_konnect] = await sandbox.payments(event.order_id)
        page = f"{payments.settings.public_base_url}/pay/return/{event.order_id}"
        success, success_query = split(at_konnect["successUrl"])
        failed, failed_query = split(at_konnect["failUrl"])
        assert success == failed == page
        assert success_query["outcome"] == ["success"]
        assert failed_query["outcome"] == ["failed"]
        [token] = success_query["token"]
        assert failed_query["token"] == [token]

        key = payments.settings.order_link_key
        assert verify_order_token(key, token) == event.order_id
        # Valid as long as the settings say, and only under the order links' own key.
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == payments.settings.order_link_ttl_hours * 3600
        with pytest.raises(InvalidToken):
            verify_order_token(payments.settings.auth_jwt_secret.get_secret_value(), token)

    async def test_each_order_gets_a_token_of_its_own(self, payments, sandbox):
        first, second = payments.new_booking(), payments.new_booking()
        for event in (first, second):
            await payments.request_booking(event)
            await payments.initiated(event.order_id)

        key = payments.settings.order_link_key
        for event in (first, second):
            [at_konnect] = await sandbox.payments(event.order_id)
            [token] = split(at_konnect["successUrl"])[1]["token"]
            assert verify_order_token(key, token) == event.order_id

    async def test_explicit_urls_are_the_base_of_each_payments_own(self, start_in_process, sandbox):
        payments = await start_in_process(
            konnect_success_url="https://app.example/booked?from=konnect",
            konnect_fail_url="https://app.example/unpaid/",
        )
        event = await payments.request_booking()
        await payments.initiated(event.order_id)

        [at_konnect] = await sandbox.payments(event.order_id)
        success, success_query = split(at_konnect["successUrl"])
        failed, failed_query = split(at_konnect["failUrl"])
        assert success == f"https://app.example/booked/{event.order_id}"
        assert success_query["from"] == ["konnect"] and success_query["outcome"] == ["success"]
        assert failed == f"https://app.example/unpaid/{event.order_id}"
        assert failed_query["outcome"] == ["failed"]
        [token] = failed_query["token"]
        assert verify_order_token(payments.settings.order_link_key, token) == event.order_id


class TestReturnUrl:
    def test_the_token_is_query_safe_and_the_base_query_kept_first(self):
        order_id = uuid.UUID("6f1c8f0e-3b7a-4d1e-9c55-0d8a5e2b7f11")

        url = return_url("https://book.example/pay/return?lang=fr", order_id, "failed", "a.b+c/=")

        assert url == (
            f"https://book.example/pay/return/{order_id}?lang=fr&outcome=failed&token=a.b%2Bc%2F%3D"
        )
