"""The HTTP routes: Konnect's webhook (never trusted, applied once under a row lock, anomalies
raised, money never dropped) and an admin's view and settlement of an order's escrow."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from booking.contracts import PaymentAnomalyDetected
from booking.contracts.http import Escrow, WebhookResult
from booking.devtools.fixtures import eventually
from booking.notifications.domain import alert_for
from booking.runtime.auth import Role

PROBLEM = "application/problem+json"


async def payment_row(db, order_id):
    return await db.fetchrow("SELECT * FROM payments.payments WHERE order_id = $1", order_id)


async def escrow_rows(db, order_id):
    return await db.fetch("SELECT * FROM payments.escrow_holds WHERE order_id = $1", order_id)


async def unknown_ref_reports(db) -> list[dict]:
    """The unknown-ref anomalies recorded in the outbox (published or not), oldest first."""
    rows = await db.fetch(
        "SELECT body FROM payments.outbox WHERE event_type = 'PaymentAnomalyDetected' ORDER BY id"
    )
    payloads = [json.loads(row["body"])["payload"] for row in rows]
    return [p for p in payloads if p["kind"] == "unknown_payment_ref"]


def later() -> datetime:
    """A moment past any report interval the tests run with: every tally is due."""
    return datetime.now(UTC) + timedelta(days=1)


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
        # Released only once the session is known to be scheduled (OrderConfirmed).
        assert (hold["release_due_at"], hold["sequence"], hold["amount_paid"]) == (
            None,
            1,
            33_333,
        )
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
        # Duplicates share lookups: the one under way when they came, then one after it.
        assert 1 <= payments_service.konnect_reads(ref) <= 2

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
    async def test_a_short_payment_is_underpaid_and_completes_when_the_rest_comes(
        self, payments_service, sandbox, book, db
    ):
        event, ref = await book(payments_service, amount=120_000)

        await sandbox.complete(ref, amount=70_000)

        short = await payments_service.one("PaymentCompleted", event.order_id)
        assert (short["amount"], short["amount_paid"]) == (120_000, 70_000)
        assert (short["platform_fee"], short["escrow_amount"]) == (10_500, 59_500)
        anomaly = await payments_service.one("PaymentAnomalyDetected", event.order_id)
        assert anomaly["kind"] == "underpayment" and anomaly["payment_ref"] == ref
        row = await payment_row(db, event.order_id)
        assert (row["status"], row["amount_paid"]) == ("underpaid", 70_000)
        assert await escrow_rows(db, event.order_id) == []  # nothing held for a short payment

        await sandbox.complete(ref)  # the rest

        await eventually(
            lambda: len(payments_service.published("PaymentCompleted", event.order_id)) == 2,
            what="the second PaymentCompleted",
        )
        await payments_service.spy.settle()
        totals = [p["amount_paid"] for p in payments_service.published("PaymentCompleted")]
        assert totals == [70_000, 120_000]
        [hold] = await escrow_rows(db, event.order_id)
        assert (hold["status"], hold["amount"], hold["amount_paid"]) == ("held", 102_000, 120_000)
        assert (await payment_row(db, event.order_id))["status"] == "completed"
        assert payments_service.published("PaymentFailed", event.order_id) == []
        assert len(payments_service.published("PaymentAnomalyDetected", event.order_id)) == 1

    async def test_an_underpaid_payment_that_expires_fails_the_order_and_owes_the_money_back(
        self, payments_service, sandbox, book, db
    ):
        event, ref = await book(payments_service, amount=120_000)
        await sandbox.complete(ref, amount=70_000)
        await payments_service.one("PaymentCompleted", event.order_id)

        await sandbox.expire(ref)  # the payer never paid the rest
        await payments_service.webhook(ref)

        failed = await payments_service.one("PaymentFailed", event.order_id)
        assert failed == {"order_id": str(event.order_id), "payment_ref": ref, "reason": "expired"}
        owed = await payments_service.one("EscrowRefundDue", event.order_id)
        assert owed["refund_amount"] == 70_000  # all that was paid, the fee included
        assert (owed["escrow_amount"], owed["sequence"], owed["by"]) == (59_500, 1, None)
        assert owed["mentor_id"] == str(event.mentor_id) and "expired" in owed["reason"]
        kinds = [
            a["kind"] for a in payments_service.published("PaymentAnomalyDetected", event.order_id)
        ]
        assert kinds == ["underpayment", "underpaid_order_expired"]
        critical = payments_service.published("PaymentAnomalyDetected", event.order_id)[1]
        assert critical["detail"].startswith("Critical")
        [hold] = await escrow_rows(db, event.order_id)
        assert (hold["status"], hold["refund_amount"], hold["sequence"]) == (
            "refund_due",
            70_000,
            1,
        )
        assert (await payment_row(db, event.order_id))["status"] == "expired"
        assert len(payments_service.published("PaymentCompleted", event.order_id)) == 1

    async def test_an_overpayment_is_held_then_frozen_for_an_admin(
        self, payments_service, sandbox, book, db
    ):
        event, ref = await book(payments_service, amount=120_000)
        await sandbox.complete(ref, amount=70_000)
        await payments_service.one("PaymentCompleted", event.order_id)

        await sandbox.complete(ref, amount=60_000)  # 10 000 more than was due

        frozen = await payments_service.one("EscrowFrozen", event.order_id)
        assert (frozen["sequence"], frozen["escrow_amount"], frozen["by"]) == (2, 110_500, None)
        assert "overpaid" in frozen["reason"]
        totals = [p["amount_paid"] for p in payments_service.published("PaymentCompleted")]
        assert totals == [70_000, 130_000]
        kinds = [
            a["kind"] for a in payments_service.published("PaymentAnomalyDetected", event.order_id)
        ]
        assert kinds == ["underpayment", "amount_mismatch"]
        [hold] = await escrow_rows(db, event.order_id)
        assert (hold["status"], hold["frozen_reason"], hold["sequence"]) == (
            "frozen",
            "overpaid",
            2,
        )


class TestForged:
    async def test_a_ref_we_never_created_costs_no_konnect_call_and_the_admins_hear_at_once(
        self, payments_service, sandbox, book, db
    ):
        event, _ = await book(payments_service)
        before = await payment_row(db, event.order_id)
        forged = "0123456789abcdef01234567"

        direct = await payments_service.webhook(forged)

        assert direct.status_code == 404
        assert direct.headers["content-type"] == PROBLEM
        assert forged in direct.json()["detail"]
        # Reported in the webhook's own request: the admins hear of the first at once.
        [anomaly] = await unknown_ref_reports(db)
        assert anomaly["kind"] == "unknown_payment_ref" and anomaly["payment_ref"] == forged
        assert anomaly["occurrences"] == 1 and anomaly["payment_refs"] == [forged]
        assert anomaly["order_id"] is None and "not asked" in anomaly["detail"]
        assert payments_service.konnect_reads() == 0
        assert await payment_row(db, event.order_id) == before
        assert await db.fetchval("SELECT count(*) FROM payments.escrow_holds") == 0

    async def test_repeats_within_the_interval_come_in_one_report_and_cost_no_write(
        self, start_payments, sandbox
    ):
        # An interval no test outlasts: the sweeper's loop cannot report in between.
        payments_service = await start_payments(unknown_ref_report_interval_seconds=3600)
        forged = "0123456789abcdef01234567"
        first = await payments_service.webhook(forged)
        outbox = await payments_service.db.fetchval("SELECT count(*) FROM payments.outbox")

        delivered = [
            await sandbox.forge_webhook(payments_service.webhook_url, forged) for _ in range(3)
        ]
        another = await payments_service.webhook("f" * 24)

        assert first.status_code == another.status_code == 404
        assert [d["status_code"] for d in delivered] == [404] * 3
        assert await payments_service.db.fetchval("SELECT count(*) FROM payments.outbox") == outbox
        reported = await payments_service.service.report_unknown_refs(later())
        assert reported == 4
        [_, summary] = await unknown_ref_reports(payments_service.db)
        assert summary["occurrences"] == 4 and summary["payment_refs"] == [forged, "f" * 24]
        assert summary["payment_ref"] == forged and "4 webhooks" in summary["detail"]
        assert payments_service.konnect_reads() == 0

    async def test_a_ref_konnect_issued_that_no_payment_of_ours_has_is_not_asked_either(
        self, payments_service, sandbox, book, db
    ):
        event, _ = await book(payments_service)
        # A second payment for the order, as a replica that crashed before recording it left:
        # nobody was ever shown its link, so no webhook for it is Konnect's.
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
        [anomaly] = await unknown_ref_reports(db)
        assert anomaly["payment_ref"] == orphan_ref and anomaly["order_id"] is None
        assert payments_service.konnect_reads() == 0

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


FLOOD = 10_000
FLOOD_CONCURRENCY = 50


class TestAFloodOfForgedRefs:
    async def test_ten_thousand_forged_refs_ask_konnect_nothing_and_a_genuine_webhook_goes_through(
        self, payments_service, sandbox, book, db
    ):
        event, ref = await book(payments_service)
        await sandbox.complete(ref, webhook="none")
        forged = [uuid.uuid4().hex[:24] for _ in range(FLOOD)]
        assert ref not in forged
        limit = asyncio.Semaphore(FLOOD_CONCURRENCY)
        answered: list[int] = []
        transport = httpx.ASGITransport(app=payments_service.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://payments") as client:

            async def webhook(payment_ref: str) -> httpx.Response:
                response = await client.get(
                    "/api/payments/webhook", params={"payment_ref": payment_ref}
                )
                answered.append(response.status_code)
                return response

            async def forge(payment_ref: str) -> int:
                async with limit:
                    return (await webhook(payment_ref)).status_code

            async def genuine_amid_the_flood() -> tuple[httpx.Response, int]:
                await eventually(
                    lambda: len(answered) >= FLOOD // 2, timeout=60, what="half the flood"
                )
                response = await webhook(ref)  # alongside the flood, not queued behind it
                return response, len(answered)

            started = time.monotonic()
            first = await forge(forged[0])
            reported_at_once = await unknown_ref_reports(db)
            *statuses, (genuine, at) = await asyncio.gather(
                *(forge(r) for r in forged[1:]), genuine_amid_the_flood()
            )
            elapsed = time.monotonic() - started

        assert [first, *statuses] == [404] * FLOOD
        assert genuine.status_code == 200 and genuine.json()["status"] == "completed"
        assert at < FLOOD  # answered while forged webhooks were still coming
        assert payments_service.konnect_reads() == payments_service.konnect_reads(ref) == 1
        assert await payments_service.payment_status(event.order_id) == "completed"
        await payments_service.one("PaymentCompleted", event.order_id)
        assert elapsed < 60, f"the flood took {elapsed:.0f}s"
        # The first forged ref was reported in its own request: the admins heard at once.
        assert [r["payment_refs"] for r in reported_at_once] == [[forged[0]]]

        # What the sweeper's loop reports at its next round, the flood's tail.
        await payments_service.service.report_unknown_refs(later())
        reports = await unknown_ref_reports(db)
        interval = payments_service.settings.unknown_ref_report_interval_seconds
        assert sum(r["occurrences"] for r in reports) == FLOOD
        assert len(reports) <= 2 + elapsed / interval  # one per interval, not one per ref
        assert all(len(r["payment_refs"]) <= 40 for r in reports)
        assert {p for r in reports for p in r["payment_refs"]} <= set(forged)

        # The notifications service makes them one notification counting every webhook.
        alerts = [
            alert_for(PaymentAnomalyDetected.model_validate(r), datetime.now(UTC)) for r in reports
        ]
        assert len({a.fingerprint for a in alerts}) == 1
        notification, occurrences = alerts[0], alerts[0].occurrences
        for alert in alerts[1:]:
            notification = alert.counted_onto(
                notification.metadata, occurrences, alerts[0].occurred_at, alert.occurred_at
            )
            occurrences += alert.occurrences
        assert occurrences == notification.metadata["webhooks"] == FLOOD
        assert notification.metadata["first_payment_refs"][0] == forged[0]
        assert len(notification.metadata["first_payment_refs"]) == 20
        assert len(notification.metadata["last_payment_refs"]) == 20


class TestLookupBudget:
    async def test_a_webhook_over_budget_is_503_and_reconciliation_still_gets_its_lookups(
        self, start_payments, sandbox, book, db
    ):
        # Four lookups, two of them for webhooks; the clock stands still: nothing refills.
        running = await start_payments(
            konnect_lookups_per_minute=4, konnect_webhook_lookup_share=0.5
        )
        frozen = time.monotonic()
        running.service.clock = lambda: frozen
        booked = [await book(running) for _ in range(4)]
        for _, ref in booked:
            await sandbox.complete(ref, webhook="none")
        (_, ref_a), (_, ref_b), (c, ref_c), (d, _) = booked

        assert (await running.webhook(ref_a)).json()["status"] == "completed"
        assert (await running.webhook(ref_b)).json()["status"] == "completed"
        refused = await running.webhook(ref_c)

        assert refused.status_code == 503
        assert refused.headers["content-type"] == PROBLEM
        assert refused.headers["retry-after"] == "30"  # two a minute for webhooks
        assert "reconciled" in refused.json()["detail"]
        assert running.konnect_reads(ref_c) == 0
        assert await running.payment_status(c.order_id) == "pending"

        # Webhooks took their share; the sweeper's is intact.
        sweep = await running.sweeper.run_once()

        assert sweep.checked == 2
        assert await running.payment_status(c.order_id) == "completed"
        assert await running.payment_status(d.order_id) == "completed"
        assert running.konnect_reads() == 4
        assert (await running.webhook(ref_c)).json()["status"] == "completed"  # no lookup
        assert running.konnect_reads() == 4

    async def test_duplicate_webhooks_of_a_completed_payment_cost_no_lookup(
        self, payments_service, sandbox, book
    ):
        event, ref = await book(payments_service)
        await sandbox.complete(ref)
        await payments_service.one("PaymentCompleted", event.order_id)
        reads = payments_service.konnect_reads(ref)

        answers = [await payments_service.webhook(ref) for _ in range(20)]

        assert {a.json()["status"] for a in answers} == {"completed"}
        assert payments_service.konnect_reads(ref) == reads


class TestWebhooksOfOneRef:
    async def test_webhooks_during_a_lookup_share_one_that_starts_after_they_came(
        self, start_payments, sandbox, book
    ):
        # One attempt per lookup, and the first read hangs past the client's timeout.
        running = await start_payments(konnect_max_attempts=1)
        event, ref = await book(running)
        await sandbox.fault("timeout", count=1, endpoint="get")
        first = asyncio.create_task(running.webhook(ref))
        await eventually(lambda: running.konnect_reads(ref) == 1, what="the first lookup")
        # Paid while that lookup is under way: the webhooks that announce it come now.
        await sandbox.complete(ref, webhook="none")

        announcing = await asyncio.gather(*(running.webhook(ref) for _ in range(5)))

        assert (await first).status_code == 503  # its lookup failed
        assert [a.status_code for a in announcing] == [200] * 5
        assert {a.json()["status"] for a in announcing} == {"completed"}
        assert running.konnect_reads(ref) == 2  # the failed one, and one for the five
        await running.one("PaymentCompleted", event.order_id)


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
    async def test_money_after_expiry_is_recorded_and_owed_back_with_a_critical_anomaly(
        self, payments_service, sandbox, book, db
    ):
        event, ref = await book(payments_service)
        await sandbox.expire(ref)
        await payments_service.sweeper.run_once()
        failed = await payments_service.one("PaymentFailed", event.order_id)
        assert failed["reason"] == "expired"

        await sandbox.complete(ref)  # the payment that raced the expiry

        owed = await payments_service.one("EscrowRefundDue", event.order_id)
        assert (owed["refund_amount"], owed["escrow_amount"], owed["sequence"]) == (
            event.amount,
            102_000,
            1,
        )
        anomaly = await payments_service.one("PaymentAnomalyDetected", event.order_id)
        assert anomaly["kind"] == "payment_for_ended_order"
        assert anomaly["detail"].startswith("Critical")
        # It never confirms the order: no PaymentCompleted, nothing held for the mentor.
        assert payments_service.published("PaymentCompleted", event.order_id) == []
        hold = await payments_service.escrow(event.order_id)
        assert (hold["status"], hold["release_due_at"], hold["refund_amount"]) == (
            "refund_due",
            None,
            event.amount,
        )
        row = await payment_row(db, event.order_id)
        assert (row["status"], row["amount_paid"]) == ("completed", event.amount)
        # Another webhook for it changes nothing.
        assert (await payments_service.webhook(ref)).json()["status"] == "completed"
        await payments_service.spy.settle()
        assert len(payments_service.published("EscrowRefundDue", event.order_id)) == 1


def escrow_path(order_id) -> str:
    return f"/api/admin/orders/{order_id}/escrow"


async def settle(
    running, order_id, action: str, reason: str = "checked with both", *, by="admin-1", **fields
):
    """POST the settlement as admin `by` (the token says who, never the body)."""
    body = {"action": action, "reason": reason, **fields}
    return await running.admin("POST", escrow_path(order_id), json=body, sub=by)


class TestEscrowAccess:
    async def test_only_an_admin_sees_or_settles_an_escrow(self, payments_service, sandbox, pay):
        event = await pay(payments_service, sandbox)
        path = escrow_path(event.order_id)
        body = {"action": "release", "reason": "x"}

        anonymous = [
            await payments_service.http.get(path),
            await payments_service.http.post(path, json=body),
        ]
        mentee = [
            await payments_service.admin("GET", path, role=Role.MENTEE),
            await payments_service.admin("POST", path, json=body, role=Role.MENTEE),
        ]

        assert [r.status_code for r in anonymous] == [401, 401]
        assert [r.status_code for r in mentee] == [403, 403]
        assert all(r.headers["content-type"] == PROBLEM for r in anonymous + mentee)
        assert (await payments_service.escrow(event.order_id))["sequence"] == 1

    async def test_an_order_without_money_has_no_escrow(self, payments_service, book):
        unpaid, _ = await book(payments_service)
        for order_id in (unpaid.order_id, uuid.uuid4()):
            seen = await payments_service.admin("GET", escrow_path(order_id))
            settled = await settle(payments_service, order_id, "release")

            assert (seen.status_code, settled.status_code) == (404, 404)
            assert seen.headers["content-type"] == PROBLEM
            assert str(order_id) in seen.json()["detail"]
        assert await payments_service.audit(unpaid.order_id) == []

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"action": "refunded", "reason": "paid back"}, "reference"),
            ({"action": "release", "reason": "ok", "reference": "BT-1"}, "reference"),
            ({"action": "refund", "reason": "ok", "reference": "BT-1"}, "reference"),
            ({"action": "pay_mentor", "reason": "ok"}, "action"),
            ({"action": "release"}, "reason"),
            ({"action": "release", "reason": "   "}, "reason"),
            ({"action": "release", "reason": "ok", "amount": 5}, "amount"),
        ],
    )
    async def test_a_bad_settlement_is_422_and_changes_nothing(
        self, payments_service, sandbox, pay, body, field
    ):
        event = await pay(payments_service, sandbox)
        await payments_service.abandon_scheduling(event)
        before = await payments_service.escrow(event.order_id)

        response = await payments_service.admin("POST", escrow_path(event.order_id), json=body)

        assert response.status_code == 422
        assert response.headers["content-type"] == PROBLEM
        assert field in {e["field"] for e in response.json()["errors"]}
        assert await payments_service.escrow(event.order_id) == before
        assert await payments_service.audit(event.order_id) == []


def escrow_json(response) -> dict:
    assert response.status_code == 200, response.text
    return Escrow.model_validate(response.json()).model_dump(mode="json")


class TestEscrowSettlement:
    async def test_an_admin_sees_a_paid_orders_escrow_held(self, payments_service, sandbox, pay):
        event = await pay(payments_service, sandbox, amount=120_000)

        escrow = escrow_json(await payments_service.admin("GET", escrow_path(event.order_id)))

        hold = await payments_service.escrow(event.order_id)
        assert escrow == {
            "order_id": str(event.order_id),
            "status": "held",
            "escrow_amount": {"amount": 102_000, "currency": "TND"},
            "refund_amount": None,
            "reason": "paid in full",
            "reference": None,
            "release_due_at": None,
            "updated_at": hold["updated_at"].isoformat().replace("+00:00", "Z"),
        }

    async def test_an_admin_releases_a_frozen_escrow_once(self, payments_service, sandbox, pay):
        event = await pay(payments_service, sandbox)
        await payments_service.abandon_scheduling(event)

        first = await settle(payments_service, event.order_id, "release", "session held by phone")
        again = await settle(payments_service, event.order_id, "release", "session held by phone")
        refund = await settle(payments_service, event.order_id, "refund")

        released = escrow_json(first)
        assert released["status"] == "released"
        assert released["reason"] == "session held by phone"
        assert escrow_json(again) == released  # a repeat: 200, the same state
        assert refund.status_code == 409 and refund.headers["content-type"] == PROBLEM
        assert "released" in refund.json()["detail"]
        event_of_release = await payments_service.one("EscrowReleased", event.order_id)
        assert (event_of_release["sequence"], event_of_release["by"]) == (3, "admin-1")
        assert event_of_release["reason"] == "session held by phone"
        assert event_of_release["escrow_amount"] == 102_000
        [audit] = await payments_service.audit(event.order_id)
        assert (audit["action"], audit["by"], audit["reason"]) == (
            "release_escrow",
            "admin-1",
            "session held by phone",
        )
        assert audit["session_id"] == event.session_id and "frozen -> released" in audit["detail"]
        recorded = await payments_service.one("AdminActionRecorded", event.order_id)
        assert (recorded["action"], recorded["service"], recorded["by"]) == (
            "release_escrow",
            "payments",
            "admin-1",
        )
        hold = await payments_service.escrow(event.order_id)
        assert (hold["status"], hold["sequence"], hold["decided_by"]) == ("released", 3, "admin-1")

    async def test_an_admin_chooses_a_refund_then_records_it(self, payments_service, sandbox, pay):
        event = await pay(payments_service, sandbox, amount=120_000)
        await payments_service.cancel(event, by="admin-9")
        order = event.order_id

        refund = escrow_json(await settle(payments_service, order, "refund", "no session", by="a2"))
        refund_again = escrow_json(await settle(payments_service, order, "refund", "no session"))
        no_reference = await settle(payments_service, order, "refunded", "paid back")
        refunded = escrow_json(
            await settle(payments_service, order, "refunded", "paid back", reference="BT-1")
        )
        refunded_again = escrow_json(
            await settle(payments_service, order, "refunded", "paid back", reference="BT-1")
        )
        another = await settle(payments_service, order, "refunded", "paid back", reference="BT-2")

        assert (refund["status"], refund["refund_amount"]) == (
            "refund_due",
            {"amount": 120_000, "currency": "TND"},  # all that was paid, the fee included
        )
        assert refund_again == refund
        assert no_reference.status_code == 422
        assert (refunded["status"], refunded["reference"]) == ("refunded", "BT-1")
        assert refunded_again == refunded
        assert another.status_code == 409 and "BT-1" in another.json()["detail"]
        frozen = await payments_service.one("EscrowFrozen", order)
        owed = await payments_service.one("EscrowRefundDue", order)
        paid_back = await payments_service.one("EscrowRefunded", order)
        assert (frozen["sequence"], frozen["by"]) == (2, "admin-9")
        assert (owed["sequence"], owed["by"], owed["refund_amount"]) == (3, "a2", 120_000)
        assert (paid_back["sequence"], paid_back["reference"], paid_back["by"]) == (
            4,
            "BT-1",
            "admin-1",
        )
        audits = await payments_service.audit(order)
        assert [(a["action"], a["by"]) for a in audits] == [
            ("refund_escrow", "a2"),
            ("record_refund", "admin-1"),
        ]
        assert "BT-1" in audits[1]["detail"]
        await payments_service.spy.settle()
        assert len(payments_service.published("AdminActionRecorded", order)) == 2

    @pytest.mark.parametrize("action", ["release", "refund", "refunded"])
    async def test_a_held_escrow_is_not_the_admins_to_settle(
        self, payments_service, sandbox, pay, action
    ):
        event = await pay(payments_service, sandbox)
        fields = {"reference": "BT-1"} if action == "refunded" else {}

        response = await settle(payments_service, event.order_id, action, **fields)

        assert response.status_code == 409
        assert "held" in response.json()["detail"]
        hold = await payments_service.escrow(event.order_id)
        assert (hold["status"], hold["sequence"]) == ("held", 1)
        assert await payments_service.audit(event.order_id) == []
        await payments_service.spy.settle()
        assert payments_service.published("AdminActionRecorded") == []

    async def test_concurrent_identical_settlements_take_effect_once(
        self, payments_service, sandbox, pay
    ):
        event = await pay(payments_service, sandbox)
        await payments_service.abandon_scheduling(event)

        responses = await asyncio.gather(
            *(settle(payments_service, event.order_id, "release") for _ in range(10))
        )

        assert {escrow_json(r)["status"] for r in responses} == {"released"}
        assert len(await payments_service.audit(event.order_id)) == 1
        await payments_service.one("EscrowReleased", event.order_id)
        await payments_service.one("AdminActionRecorded", event.order_id)

    async def test_a_refund_owed_for_late_money_is_recorded_by_an_admin(
        self, payments_service, sandbox, book
    ):
        event, ref = await book(payments_service)
        await sandbox.expire(ref)
        await payments_service.sweeper.run_once()
        await sandbox.complete(ref)
        await payments_service.one("EscrowRefundDue", event.order_id)

        again = await settle(payments_service, event.order_id, "refund")
        done = await settle(payments_service, event.order_id, "refunded", reference="BT-7")

        assert escrow_json(again)["status"] == "refund_due"  # already due: 200, unchanged
        assert escrow_json(done)["status"] == "refunded"
        paid_back = await payments_service.one("EscrowRefunded", event.order_id)
        assert (paid_back["sequence"], paid_back["refund_amount"]) == (2, event.amount)
        assert [a["action"] for a in await payments_service.audit(event.order_id)] == [
            "record_refund"
        ]
