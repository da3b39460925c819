"""The money path through the gateway, against the running services and the Konnect sandbox.

A mentee books through the gateway, payments opens a Konnect payment, the sandbox plays the
payer and calls the webhook (or does not), and the order ends as it must: paid with the fee and
the escrow in millimes, unpaid with an anomaly, failed with its slot freed. Every service runs as
a process, started by `make run`'s supervisor against a fresh database and vhost.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

pytestmark = pytest.mark.e2e

PROBLEM_JSON = "application/problem+json"


@pytest.fixture(scope="module")
def system_overrides() -> dict[str, str]:
    return {
        "PLATFORM_FEE_RATE": "0.15",
        # Fast reconciliation, so a lost webhook or an abandoned payment is seen in seconds.
        "RECONCILIATION_GRACE_SECONDS": "1",
        "RECONCILIATION_INTERVAL_SECONDS": "0.5",
        "KONNECT_MAX_ATTEMPTS": "3",
        "KONNECT_RETRY_BASE_SECONDS": "0.05",
    }


class TestPayingForABooking:
    async def test_a_paid_booking_ends_paid_with_the_fee_and_escrow_in_millimes(
        self, market, konnect
    ):
        offering = await market.offering(price=33_333)
        order_id = await market.booked(offering)
        ref = await market.payment_ref(order_id)

        await market.pay(ref)

        order = await market.order_when(order_id, "the order paid", lambda o: o["status"] == "paid")
        # 15% of 33.333 TND is 4.99995 TND: half-up to the millime, 5.000 TND.
        assert order["amount"] == {"amount": 33_333, "currency": "TND"}
        assert order["amount_paid"] == {"amount": 33_333, "currency": "TND"}
        assert order["escrow"] == {
            "platform_fee": {"amount": 5_000, "currency": "TND"},
            "escrow_amount": {"amount": 28_333, "currency": "TND"},
            "status": "held",
        }
        # Paid, the session goes on to the calendar; this mentor never connected Google.
        assert order["session"]["status"] in ("awaiting_calendar", "scheduling_failed")
        assert order["payment"]["status"] == "completed"

    async def test_fifty_concurrent_duplicate_webhooks_complete_the_payment_once(
        self, market, konnect, api, events
    ):
        offering = await market.offering()
        order_id = await market.booked(offering)
        ref = await market.payment_ref(order_id)
        await market.pay(ref, webhook="none")

        answers = await asyncio.gather(
            *(api.get("/api/payments/webhook", params={"payment_ref": ref}) for _ in range(50))
        )

        assert {a.status_code for a in answers} == {200}, {a.text for a in answers}
        await market.order_when(order_id, "the order paid", lambda o: o["status"] == "paid")
        await events.settle()
        assert len(events.payloads("PaymentCompleted", order_id=order_id)) == 1
        assert len(events.payloads("OrderPaid", order_id=order_id)) == 1

    async def test_a_failed_attempt_then_a_successful_one_ends_paid(self, market, konnect):
        offering = await market.offering()
        order_id = await market.booked(offering)
        ref = await market.payment_ref(order_id)

        failed = await konnect.post(f"/_sandbox/payments/{ref}/fail", json={})
        assert failed.status_code == 200, failed.text
        order = await market.order(order_id)
        assert order["status"] == "awaiting_payment"  # the payer may try again

        await market.pay(ref)
        await market.order_when(order_id, "the order paid", lambda o: o["status"] == "paid")

    async def test_a_lost_webhook_is_caught_by_reconciliation(self, market, konnect):
        offering = await market.offering()
        order_id = await market.booked(offering)
        ref = await market.payment_ref(order_id)

        await market.pay(ref, webhook="none")

        await market.order_when(order_id, "the reconciled payment", lambda o: o["status"] == "paid")


class TestWhenMoneyDoesNotAddUp:
    async def test_a_forged_webhook_changes_nothing_and_raises_an_anomaly(self, api, events):
        forged = uuid.uuid4().hex[:24]

        answer = await api.get("/api/payments/webhook", params={"payment_ref": forged})

        assert answer.status_code in (200, 404), answer.text
        anomalies = await events.seen("PaymentAnomalyDetected", payment_ref=forged)
        assert anomalies[0]["kind"] == "unknown_payment_ref"
        await events.settle()
        assert events.of_type("PaymentCompleted") == []

    async def test_an_underpayment_leaves_the_order_unpaid_and_tells_the_admins(
        self, market, konnect, events
    ):
        offering = await market.offering(price=100_000)
        order_id = await market.booked(offering)
        ref = await market.payment_ref(order_id)

        # Konnect keeps a part-paid payment open (the payer may pay the rest) until it expires;
        # only then is what arrived applied, short.
        await market.pay(ref, amount=60_000)
        assert (await konnect.post(f"/_sandbox/payments/{ref}/expire")).status_code == 200

        order = await market.order_when(
            order_id, "the short payment recorded", lambda o: o["amount_paid"]["amount"] > 0
        )
        assert order["status"] == "awaiting_payment"
        assert order["amount_paid"] == {"amount": 60_000, "currency": "TND"}
        assert order["session"]["status"] == "pending_payment"
        anomaly = await events.seen("PaymentAnomalyDetected", payment_ref=ref)
        assert anomaly[0]["kind"] == "underpayment"
        issue = await events.seen("SessionIssueDetected", order_id=order_id)
        assert issue[0]["kind"] == "underpayment"
        await events.settle()
        assert events.payloads("OrderPaid", order_id=order_id) == []


class TestWhenAPaymentNeverHappens:
    async def test_konnect_failing_twice_then_answering_makes_one_payment(self, market, konnect):
        offering = await market.offering()
        fault = await konnect.post(
            "/_sandbox/faults", json={"kind": "http_503", "count": 2, "endpoint": "init"}
        )
        assert fault.status_code in (200, 201, 204), fault.text

        order_id = await market.booked(offering)
        await market.payment_ref(order_id)

        made = await konnect.get("/_sandbox/payments", params={"order_id": order_id})
        assert len(made.json()["payments"]) == 1

    async def test_konnect_down_beyond_the_retries_cancels_the_order_and_frees_the_slot(
        self, market, konnect, events
    ):
        offering = await market.offering()
        start_at = market.next_week(hours=3)
        await konnect.post(
            "/_sandbox/faults", json={"kind": "http_503", "count": 50, "endpoint": "init"}
        )

        order_id = await market.booked(offering, start_at)

        order = await market.order_when(
            order_id, "the order cancelled", lambda o: o["status"] == "cancelled"
        )
        assert order["session"]["status"] == "cancelled"
        assert events.payloads("PaymentInitiationFailed", order_id=order_id)
        await konnect.delete("/_sandbox/faults")
        assert (await market.book(offering, start_at)).status_code == 202  # the slot is free

    async def test_an_abandoned_payment_expires_and_frees_the_slot(self, market, konnect):
        offering = await market.offering()
        start_at = market.next_week(hours=5)
        order_id = await market.booked(offering, start_at)
        ref = await market.payment_ref(order_id)
        assert (await market.book(offering, start_at)).status_code == 409  # held while unpaid

        expired = await konnect.post(f"/_sandbox/payments/{ref}/expire")
        assert expired.status_code == 200, expired.text

        order = await market.order_when(
            order_id, "the order payment_failed", lambda o: o["status"] == "payment_failed"
        )
        assert order["session"]["status"] == "cancelled"
        assert order["payment"]["status"] == "expired"
        assert (await market.book(offering, start_at)).status_code == 202


class TestBookingRules:
    async def test_overlapping_bookings_sent_at_once_one_wins_the_rest_are_told_409(self, market):
        offering = await market.offering()
        start_at = market.next_week(hours=8)
        starts = [start_at + timedelta(minutes=10 * i) for i in range(6)]  # all overlap

        answers = await asyncio.gather(*(market.book(offering, s) for s in starts))

        codes = sorted(a.status_code for a in answers)
        assert codes == [202, 409, 409, 409, 409, 409], [a.text for a in answers]
        for answer in answers:
            if answer.status_code == 409:
                assert answer.headers["content-type"].startswith(PROBLEM_JSON)

    async def test_a_retried_booking_with_its_idempotency_key_returns_the_first_order(
        self, market, events
    ):
        offering = await market.offering()
        key = {"Idempotency-Key": f"retry-{uuid.uuid4()}", **market.mentee}

        first = await market.book(offering, market.next_week(hours=10), headers=key)
        again = await market.book(offering, market.next_week(hours=10), headers=key)
        other = await market.book(offering, market.next_week(hours=12), headers=key)

        assert first.status_code == again.status_code == 202
        assert again.json() == first.json()
        assert other.status_code == 422
        await events.settle()
        order_id = first.json()["order_id"]
        assert len(events.payloads("BookingRequested", order_id=order_id)) == 1
        assert len(events.payloads("BookingRequested")) == 1

    @pytest.mark.parametrize(
        ("change", "status"),
        [
            ({"offering_id": str(uuid.uuid4())}, 404),
            ({"start_at": (datetime.now(UTC) - timedelta(hours=1)).isoformat()}, 422),
            ({"mentee": {"first_name": "Y", "last_name": "T", "email": "not-an-email"}}, 422),
            ({"coupon": "FREE"}, 422),
        ],
        ids=["unknown offering", "start in the past", "malformed email", "extra field"],
    )
    async def test_bad_input_is_refused_with_a_problem_and_stores_nothing(
        self, market, events, change, status
    ):
        offering = await market.offering()
        body = {
            "offering_id": offering["id"],
            "start_at": market.next_week(hours=14).isoformat(),
            "mentee": {"first_name": "Y", "last_name": "T", "email": "y@example.com"},
            **change,
        }

        answer = await market.api.post("/api/bookings", json=body, headers=market.mentee)

        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"].startswith(PROBLEM_JSON)
        assert answer.json()["detail"]
        await events.settle()
        assert events.of_type("BookingRequested") == []

    @pytest.mark.parametrize("price", [-1, 12.5, "120000"], ids=["negative", "float", "string"])
    async def test_money_that_is_not_whole_millimes_is_refused(self, market, price):
        mentor = await market.api.post(
            "/api/mentors",
            json={"name": "Sami", "email": "sami@example.com", "timezone": "Africa/Tunis"},
            headers=market.admin,
        )
        mentor_id = mentor.json()["id"]

        answer = await market.api.post(
            f"/api/mentors/{mentor_id}/offerings",
            json={
                "title": "Intro",
                "duration_minutes": 30,
                "price": {"amount": price, "currency": "TND"},
            },
            headers=market.admin,
        )

        assert answer.status_code == 422, answer.text
        listed = await market.api.get(f"/api/mentors/{mentor_id}/offerings", headers=market.admin)
        assert listed.json() == []
