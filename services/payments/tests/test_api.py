"""The Konnect webhook: never trusted, applied once under a row lock, anomalies raised."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from booking.contracts.http import WebhookResult

PROBLEM = "application/problem+json"


async def payment_row(db, order_id):
    return await db.fetchrow("SELECT * FROM payments.payments WHERE order_id = $1", order_id)


async def escrow_rows(db, order_id):
    return await db.fetch("SELECT * FROM payments.escrow_holds WHERE order_id = $1", order_id)


class TestPaid:
    async def test_paying_completes_the_payment_with_the_fee_and_escrow_exact(
        self, payments_service, sandbox, book, db
    ):
        event, ref = await book(payments_service, amount=33_333)

        await sandbox.complete(ref)  # Konnect calls the webhook before answering

        completed = await payments_service.one("PaymentCompleted", event.order_id)
        # 33333 x 0.15 = 4999.95: half-up to 5000 millimes; the mentor's escrow is the rest.
        assert completed["payment_ref"] == ref
        assert (completed["amount"], completed["amount_paid"]) == (33_333, 33_333)
        assert (completed["platform_fee"], completed["escrow_amount"]) == (5_000, 28_333)
        assert completed["platform_fee"] + completed["escrow_amount"] == completed["amount_paid"]
        assert completed["currency"] == "TND"
        [hold] = await escrow_rows(db, event.order_id)
        assert (hold["status"], hold["amount"], hold["mentor_id"]) == (
            "held",
            28_333,
            event.mentor_id,
        )
        assert hold["release_due_at"] == event.end_at + timedelta(days=1)
        row = await payment_row(db, event.order_id)
        assert (row["status"], row["amount_paid"], row["platform_fee"]) == (
            "completed",
            33_333,
            5_000,
        )
        assert row["paid_at"] == datetime.fromisoformat(completed["paid_at"])
        assert payments_service.published("PaymentAnomalyDetected", event.order_id) == []

    async def test_the_answer_is_the_contracts_webhook_result(
        self, payments_service, sandbox, book
    ):
        _, ref = await book(payments_service)
        await sandbox.complete(ref, webhook="none")

        response = await payments_service.webhook(ref)

        assert response.status_code == 200
        assert WebhookResult.model_validate(response.json()) == WebhookResult(
            payment_ref=ref, status="completed"
        )

    async def test_fifty_concurrent_identical_webhooks_complete_the_payment_once(
        self, payments_service, sandbox, book, db, status_changes
    ):
        event, ref = await book(payments_service)
        await sandbox.complete(ref, webhook="none")
        before = await status_changes()

        responses = await asyncio.gather(*(payments_service.webhook(ref) for _ in range(50)))

        assert [r.status_code for r in responses] == [200] * 50
        assert {r.json()["status"] for r in responses} == {"completed"}
        changes = (await status_changes())[len(before) :]
        assert changes == [("payments", event.order_id, "completed")]
        await payments_service.one("PaymentCompleted", event.order_id)
        assert len(await escrow_rows(db, event.order_id)) == 1

    async def test_konnects_own_duplicate_webhooks_complete_once(
        self, payments_service, sandbox, book, db
    ):
        event, ref = await book(payments_service)

        await sandbox.complete(ref, webhook="twice")

        await payments_service.one("PaymentCompleted", event.order_id)
        assert len(await escrow_rows(db, event.order_id)) == 1

    async def test_a_failed_attempt_leaves_the_payment_open_and_a_retry_completes_it(
        self, payments_service, sandbox, book, db
    ):
        event, ref = await book(payments_service)

        failed = await sandbox.fail(ref)

        assert [d["status_code"] for d in failed["webhooks"]] == [200]
        assert (await payment_row(db, event.order_id))["status"] == "pending"
        await sandbox.complete(ref)
        await payments_service.one("PaymentCompleted", event.order_id)
        assert payments_service.published("PaymentFailed", event.order_id) == []


class TestAlreadyApplied:
    async def test_a_completed_payment_answers_200_without_asking_konnect(
        self, payments_service, sandbox, book
    ):
        event, ref = await book(payments_service)
        await sandbox.complete(ref)
        await payments_service.one("PaymentCompleted", event.order_id)
        # Any read of a payment at Konnect would now fail: the switch shows whether one came.
        await sandbox.fault("http_500", count=1, endpoint="get")

        response = await payments_service.webhook(ref)

        assert response.status_code == 200 and response.json()["status"] == "completed"
        assert await sandbox.faults() == [{"kind": "http_500", "count": 1, "endpoint": "get"}]
        await payments_service.spy.settle()
        assert len(payments_service.published("PaymentCompleted", event.order_id)) == 1


class TestUnderpayment:
    async def test_a_partial_payment_waits_for_the_rest_then_completes_short(
        self, payments_service, sandbox, book, db
    ):
        event, ref = await book(payments_service, amount=120_000)

        await sandbox.complete(ref, amount=70_000)

        assert (await payment_row(db, event.order_id))["status"] == "pending"
        await sandbox.expire(ref)  # the payer never paid the rest
        # The webhook just asked Konnect: the sweeper asks again an interval later.
        interval = timedelta(seconds=payments_service.settings.reconciliation_interval_seconds)
        await payments_service.sweeper.run_once(datetime.now(UTC) + interval)

        completed = await payments_service.one("PaymentCompleted", event.order_id)
        assert (completed["amount"], completed["amount_paid"]) == (120_000, 70_000)
        assert (completed["platform_fee"], completed["escrow_amount"]) == (10_500, 59_500)
        anomaly = await payments_service.one("PaymentAnomalyDetected", event.order_id)
        assert anomaly["kind"] == "underpayment" and anomaly["payment_ref"] == ref
        [hold] = await escrow_rows(db, event.order_id)
        assert hold["status"] == "frozen" and hold["release_due_at"] is None
        assert payments_service.published("PaymentFailed", event.order_id) == []


class TestForged:
    async def test_a_ref_konnect_never_issued_changes_nothing_and_raises_one_anomaly(
        self, payments_service, sandbox, book, db
    ):
        event, _ = await book(payments_service)
        before = await payment_row(db, event.order_id)
        forged = "0123456789abcdef01234567"

        delivered = [
            await sandbox.forge_webhook(payments_service.webhook_url, forged) for _ in range(3)
        ]
        direct = await payments_service.webhook(forged)

        assert [d["status_code"] for d in delivered] == [404] * 3
        assert direct.status_code == 404
        assert direct.headers["content-type"] == PROBLEM
        assert forged in direct.json()["detail"]
        await payments_service.spy.settle()
        [anomaly] = payments_service.published("PaymentAnomalyDetected")
        assert anomaly["kind"] == "unknown_payment_ref" and anomaly["payment_ref"] == forged
        assert anomaly["order_id"] is None and "never issued" in anomaly["detail"]
        assert await payment_row(db, event.order_id) == before
        assert await db.fetchval("SELECT count(*) FROM payments.escrow_holds") == 0

    async def test_a_ref_konnect_knows_but_we_do_not_is_an_anomaly_too(
        self, payments_service, sandbox, book
    ):
        event, _ = await book(payments_service)
        # A second payment for the order, as a replica that crashed before recording it left.
        orphan = await sandbox.http.post(
            "/api/v2/payments/init-payment",
            headers={"x-api-key": payments_service.settings.konnect_api_key.get_secret_value()},
            json={
                "receiverWalletId": payments_service.settings.konnect_wallet_id,
                "amount": 1_000,
                "orderId": str(event.order_id),
            },
        )
        orphan_ref = orphan.json()["paymentRef"]

        response = await payments_service.webhook(orphan_ref)

        assert response.status_code == 404
        anomaly = await payments_service.one("PaymentAnomalyDetected", event.order_id)
        assert anomaly["kind"] == "unknown_payment_ref" and anomaly["payment_ref"] == orphan_ref
        assert "Konnect knows" in anomaly["detail"]

    @pytest.mark.parametrize("query", [None, "", "12345", "0123456789abcdef0123456z", "x" * 500])
    async def test_a_missing_or_malformed_ref_is_400_and_konnect_is_not_asked(
        self, payments_service, sandbox, query
    ):
        await sandbox.fault("http_500", count=1, endpoint="get")

        response = await payments_service.webhook(query)

        assert response.status_code == 400
        assert response.headers["content-type"] == PROBLEM
        assert "payment_ref" in response.json()["detail"]
        assert await sandbox.faults() == [{"kind": "http_500", "count": 1, "endpoint": "get"}]
        await payments_service.spy.settle()
        assert payments_service.published("PaymentAnomalyDetected") == []


class TestKonnectUnreachable:
    async def test_konnect_out_of_reach_is_503_and_nothing_changes(
        self, payments_service, sandbox, book, db
    ):
        event, ref = await book(payments_service)
        await sandbox.complete(ref, webhook="none")
        await sandbox.fault("http_503", count=10, endpoint="get")

        response = await payments_service.webhook(ref)

        assert response.status_code == 503
        assert response.headers["content-type"] == PROBLEM
        assert (await payment_row(db, event.order_id))["status"] == "pending"
        await sandbox.clear_faults()
        assert (await payments_service.webhook(ref)).json()["status"] == "completed"


class TestLateMoney:
    async def test_money_after_expiry_completes_late_with_a_frozen_hold_and_a_critical_anomaly(
        self, payments_service, sandbox, book, db
    ):
        event, ref = await book(payments_service)
        await sandbox.expire(ref)
        await payments_service.sweeper.run_once()
        failed = await payments_service.one("PaymentFailed", event.order_id)
        assert failed["reason"] == "expired"

        await sandbox.complete(ref)  # the payment that raced the expiry

        completed = await payments_service.one("PaymentCompleted", event.order_id)
        assert completed["amount_paid"] == event.amount
        anomaly = await payments_service.one("PaymentAnomalyDetected", event.order_id)
        assert anomaly["kind"] == "payment_for_ended_order"
        assert anomaly["detail"].startswith("Critical")
        [hold] = await escrow_rows(db, event.order_id)
        assert hold["status"] == "frozen" and hold["release_due_at"] is None
        assert (await payment_row(db, event.order_id))["status"] == "completed"
