"""Recovery through the real services: escrow follows the session, nothing holds a slot for ever,
and admins put things right through the gateway (docs/recovery.md).

The system runs with the scheduling retry schedule a thousand times faster than its default
(the same four delays, the same shape) and its calendar sweeper twice a second.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import aio_pika
import pytest

from booking.contracts import PaymentAnomalyDetected, PaymentAnomalyKind, wrap
from booking.devtools.fixtures import eventually

from .conftest import Marketplace

pytestmark = pytest.mark.e2e

SLOW_SECONDS = 60  # a flow that waits out the (shortened) retry schedule on a loaded machine


@pytest.fixture(scope="module")
def system_overrides() -> dict[str, str]:
    return {
        "SCHEDULING_RETRY_DELAYS_MINUTES": "0.001,0.005,0.015,0.06",  # 1, 5, 15, 60 min / 1000
        "SWEEPER_INTERVAL_SECONDS": "0.5",
        "GOOGLE_RETRY_BASE_SECONDS": "0.05",
        "CONSUMER_RETRY_BASE_DELAY_MS": "100",
    }


async def paid(market: Marketplace, offering: dict[str, Any]) -> dict[str, Any]:
    """A booking paid in full at the sandbox Konnect; its order once paid."""
    order_id = await market.booked(offering)
    await market.pay(await market.payment_ref(order_id))
    return await market.order_when(
        order_id, "the order paid", lambda o: o["status"] in ("paid", "confirmed")
    )


async def admin_post(market: Marketplace, path: str, body: dict[str, Any] | None = None):
    return await market.api.post(path, json=body, headers=market.admin)


async def notifications_about(market: Marketplace, order_id: str) -> list[dict[str, Any]]:
    page = await market.api.get(
        "/api/admin/notifications", params={"limit": 200}, headers=market.admin
    )
    assert page.status_code == 200, page.text
    return [n for n in page.json()["items"] if n["metadata"].get("order_id") == order_id]


class TestEscrowFollowsTheSession:
    async def test_an_abandoned_scheduling_freezes_the_escrow_and_a_retry_holds_it_again(
        self, market, google, events
    ):
        offering = await market.offering()
        mentor_id = offering["mentor_id"]
        await market.connect_calendar(mentor_id)
        # Google refuses every insert: each attempt of the schedule fails, the last for good.
        fault = {"kind": "http_503", "count": 100_000, "endpoint": "insert"}
        assert (await google.post("/_sandbox/faults", json=fault)).status_code == 200

        order = await paid(market, offering)
        order_id, session_id = order["id"], order["session"]["id"]
        order = await eventually(
            lambda: _when(
                market,
                order_id,
                lambda o: (
                    o["session"]["status"] == "scheduling_failed"
                    and (o["escrow"] or {}).get("status") == "frozen"
                ),
            ),
            timeout=SLOW_SECONDS,
            what="the scheduling abandoned and the escrow frozen",
        )
        assert order["status"] == "paid"  # paid for: never released on its own
        failures = events.payloads("CalendarBookingFailed", order_id=order_id)
        assert [f["final"] for f in failures] == [False] * 4 + [True]
        [abandoned] = await events.seen("SchedulingAbandoned", order_id=order_id)
        assert abandoned["reason"] == "calendar_api_error"
        [frozen] = await events.seen("EscrowFrozen", order_id=order_id)
        assert frozen["reason"]

        # Google is back; an admin retries the scheduling: the escrow is held again.
        await google.delete("/_sandbox/faults")
        retried = await admin_post(
            market,
            f"/api/admin/sessions/{session_id}/retry-scheduling",
            {"reason": "Google is back"},
        )
        assert retried.status_code == 200, retried.text
        assert retried.json()["session_id"] == session_id
        order = await market.order_when(
            order_id,
            "the order confirmed and its escrow held",
            lambda o: o["status"] == "confirmed" and o["escrow"]["status"] == "held",
        )
        assert order["session"]["meet_link"]
        [unfrozen] = await events.seen("EscrowUnfrozen", order_id=order_id)
        assert unfrozen["release_due_at"] > order["session"]["end_at"]
        # A second retry of a scheduling that succeeded changes nothing.
        again = await admin_post(market, f"/api/admin/sessions/{session_id}/retry-scheduling")
        assert again.status_code == 200
        assert again.json()["status"] == "confirmed"
        await events.settle()
        assert len(events.payloads("AdminActionRecorded", session_id=session_id)) == 1

        # The admins heard of the final failure and of the frozen escrow, not of each attempt.
        async def told() -> dict[str, str] | None:
            notes = await notifications_about(market, order_id)
            by_title = {n["title"].split(":")[0]: n["severity"] for n in notes}
            wanted = ("Calendar booking abandoned", "Escrow frozen", "Escrow held again")
            return by_title if all(t in by_title for t in wanted) else None

        severities = await eventually(told, what="the admins told")
        assert severities["Calendar booking abandoned"] == "Critical"
        assert severities["Escrow frozen"] == "Error"
        assert "Calendar booking failed" not in severities  # the retried attempts raised nothing

    async def test_an_underpaid_order_expires_frees_its_slot_and_owes_what_was_paid(
        self, market, konnect, events
    ):
        offering = await market.offering(price=120_000)
        start_at = market.next_week(hours=3)
        order_id = await market.booked(offering, start_at)
        ref = await market.payment_ref(order_id)
        await market.pay(ref, amount=50_000)
        order = await market.order_when(
            order_id, "the short money recorded", lambda o: o["amount_paid"]["amount"] == 50_000
        )
        assert order["status"] == "awaiting_payment"  # the payer may still pay the rest

        # The payment expires at Konnect, and its notification reaches us.
        assert (await konnect.post(f"/_sandbox/payments/{ref}/expire")).status_code == 200
        webhook = f"{market.system.gateway}/api/payments/webhook"
        sent = await konnect.post(
            "/_sandbox/webhooks/send", json={"url": webhook, "payment_ref": ref}
        )
        assert sent.status_code == 200, sent.text

        order = await market.order_when(
            order_id,
            "the order failed and what was paid owed back",
            lambda o: (
                o["status"] == "payment_failed"
                and (o["escrow"] or {}).get("status") == "refund_due"
            ),
        )
        assert order["session"]["status"] == "cancelled"
        [due] = await events.seen("EscrowRefundDue", order_id=order_id)
        assert due["refund_amount"] == 50_000
        # The slot is free again.
        assert (await market.book(offering, start_at)).status_code == 202

        async def told() -> list[dict[str, Any]]:
            notes = await notifications_about(market, order_id)
            return [n for n in notes if n["metadata"].get("reason") == "underpaid_order_expired"]

        [alert] = await eventually(told, what="the Critical alert")
        assert alert["severity"] == "Critical"


class TestAdminCancel:
    async def test_a_cancel_frees_the_slot_deletes_the_event_and_the_refund_is_settled(
        self, market, events
    ):
        offering = await market.offering()
        mentor_id = offering["mentor_id"]
        await market.connect_calendar(mentor_id)
        start_at = market.next_week(hours=5)
        order_id = await market.booked(offering, start_at)
        await market.pay(await market.payment_ref(order_id))
        order = await market.order_when(
            order_id, "the order confirmed", lambda o: o["status"] == "confirmed"
        )
        event_id = order["session"]["calendar_event_id"]

        reason = {"reason": "the mentor is ill"}
        cancelled = await admin_post(market, f"/api/admin/orders/{order_id}/cancel", reason)
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        assert cancelled.json()["session"]["status"] == "cancelled"
        again = await admin_post(market, f"/api/admin/orders/{order_id}/cancel", reason)
        assert again.status_code == 200
        assert (again.json()["status"], again.json()["session"]) == (
            "cancelled",
            cancelled.json()["session"],
        )

        # The slot is free, the Google event deleted, the escrow frozen for an admin.
        assert (await market.book(offering, start_at)).status_code == 202

        async def event_cancelled() -> bool:
            found = [e for e in await market.google_events(mentor_id) if e["id"] == event_id]
            return [e["status"] for e in found] == ["cancelled"]

        await eventually(event_cancelled, what="the session's Google event deleted")
        await market.order_when(
            order_id, "the escrow frozen", lambda o: o["escrow"]["status"] == "frozen"
        )

        escrow = f"/api/admin/orders/{order_id}/escrow"
        refund = {"action": "refund", "reason": "the session did not take place"}
        due = await admin_post(market, escrow, refund)
        assert due.status_code == 200, due.text
        assert due.json()["status"] == "refund_due"
        assert due.json()["refund_amount"] == {"amount": 120_000, "currency": "TND"}
        assert (await admin_post(market, escrow, refund)).json() == due.json()  # a repeat
        release = {"action": "release", "reason": "pay the mentor after all"}
        refused = await admin_post(market, escrow, release)
        assert refused.status_code == 409, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        no_reference = {"action": "refunded", "reason": "paid back"}
        assert (await admin_post(market, escrow, no_reference)).status_code == 422
        done = {**no_reference, "reference": "TRF-2026-0042"}
        refunded = await admin_post(market, escrow, done)
        assert refunded.status_code == 200, refunded.text
        assert (refunded.json()["status"], refunded.json()["reference"]) == (
            "refunded",
            "TRF-2026-0042",
        )
        assert (await admin_post(market, escrow, done)).json() == refunded.json()
        await market.order_when(
            order_id, "the order shows it refunded", lambda o: o["escrow"]["status"] == "refunded"
        )

        # Each action that took effect was audited once (the repeats were not).
        await events.settle()
        actions = [a["action"] for a in events.payloads("AdminActionRecorded", order_id=order_id)]
        assert sorted(actions) == ["cancel_order", "record_refund", "refund_escrow"]
        assert len(events.payloads("OrderCancelled", order_id=order_id)) == 1

    async def test_a_cancel_during_a_google_insert_in_flight_leaves_no_event(
        self, market, google, events
    ):
        offering = await market.offering()
        mentor_id = offering["mentor_id"]
        await market.connect_calendar(mentor_id)
        # The next insert stalls at Google: the booking is cancelled while it is in flight.
        slow = {"kind": "slow", "count": 1, "endpoint": "insert", "seconds": 4}
        assert (await google.post("/_sandbox/faults", json=slow)).status_code == 200
        order = await paid(market, offering)
        order_id = order["id"]

        async def insert_in_flight() -> bool:
            return (await google.get("/_sandbox/faults")).json()["faults"] == []

        await eventually(insert_in_flight, what="the insert taken by the slow fault")
        cancelled = await admin_post(
            market, f"/api/admin/orders/{order_id}/cancel", {"reason": "cancelled in a hurry"}
        )
        assert cancelled.status_code == 200, cancelled.text

        # The insert lands at Google after the cancel; the run that made it deletes it.
        async def only_a_cancelled_event() -> bool:
            found = await market.google_events(mentor_id)
            return bool(found) and all(e["status"] == "cancelled" for e in found)

        await eventually(
            only_a_cancelled_event, timeout=SLOW_SECONDS, what="the late event deleted"
        )
        await events.settle()
        assert events.payloads("CalendarBookingConfirmed", order_id=order_id) == []
        assert (await market.order(order_id))["status"] == "cancelled"

    async def test_an_order_whose_payment_failed_cannot_be_cancelled(self, market, konnect):
        offering = await market.offering()
        order_id = await market.booked(offering)
        ref = await market.payment_ref(order_id)
        await konnect.post(f"/_sandbox/payments/{ref}/expire")
        webhook = f"{market.system.gateway}/api/payments/webhook"
        await konnect.post("/_sandbox/webhooks/send", json={"url": webhook, "payment_ref": ref})
        await market.order_when(
            order_id, "the payment expired", lambda o: o["status"] == "payment_failed"
        )
        refused = await admin_post(
            market, f"/api/admin/orders/{order_id}/cancel", {"reason": "too late"}
        )
        assert refused.status_code == 409, refused.text
        mentee = await market.api.post(
            f"/api/admin/orders/{order_id}/cancel", json={"reason": "x"}, headers=market.mentee
        )
        assert mentee.status_code == 403


class TestDeadLettersThroughTheGateway:
    async def test_an_unreadable_message_is_listed_inspected_and_discarded(
        self, market, running_system
    ):
        body = json.dumps({"not": "an envelope", "marker": uuid.uuid4().hex}).encode()
        await _send_to_queue(running_system, "notifications", body)

        async def listed() -> list[dict[str, Any]]:
            page = await market.api.get(
                "/api/admin/dead-letters",
                params={"service": "notifications", "status": "kept"},
                headers=market.admin,
            )
            assert page.status_code == 200, page.text
            return [d for d in page.json()["items"] if d["type"] is None]

        [dead] = await eventually(listed, what="the dead letter listed")
        one = await market.api.get(f"/api/admin/dead-letters/{dead['id']}", headers=market.admin)
        assert one.status_code == 200, one.text
        assert one.json()["envelope"] == json.loads(body)  # JSON, though not an envelope
        assert one.json()["reason"] == "unreadable"

        discarded = await admin_post(
            market, f"/api/admin/dead-letters/{dead['id']}/discard", {"reason": "a test message"}
        )
        assert discarded.status_code == 200, discarded.text
        assert discarded.json()["status"] == "discarded"
        refused = await admin_post(market, f"/api/admin/dead-letters/{dead['id']}/replay")
        assert refused.status_code == 409

        every = await market.api.get("/api/admin/dead-letters", headers=market.admin)
        assert dead["id"] in [d["id"] for d in every.json()["items"]]

    async def test_a_replay_applies_a_message_the_broker_gave_up_on(self, market, running_system):
        # A valid alert the broker dead-lettered (its consumer kept dying on it): the replay
        # goes through the inbox and raises the notification it carried, once. An anomaly about
        # one payment: unknown refs would count up on the one open unknown-ref notification.
        order_id = uuid.uuid4()
        event = PaymentAnomalyDetected(
            payment_ref="f" * 24,
            order_id=order_id,
            kind=PaymentAnomalyKind.AMOUNT_MISMATCH,
            detail="replayed by an admin",
        )
        envelope = wrap(event, message_id=uuid.uuid4(), correlation_id=str(uuid.uuid4()))
        await _send_to_queue(
            running_system,
            "notifications.dlq",
            envelope.model_dump_json().encode(),
            headers={"x-death": [{"count": 10, "reason": "delivery_limit"}]},
        )

        async def kept() -> list[dict[str, Any]]:
            page = await market.api.get(
                "/api/admin/dead-letters",
                params={"type": "PaymentAnomalyDetected", "status": "kept"},
                headers=market.admin,
            )
            return [d for d in page.json()["items"] if d["message_id"] == str(envelope.message_id)]

        [dead] = await eventually(kept, what="the broker's dead letter kept")
        replayed = await admin_post(
            market, f"/api/admin/dead-letters/{dead['id']}/replay", {"reason": "fixed"}
        )
        assert replayed.status_code == 200, replayed.text
        await eventually(
            lambda: notifications_about(market, str(order_id)), what="the replayed alert raised"
        )
        again = await admin_post(market, f"/api/admin/dead-letters/{dead['id']}/replay")
        assert again.json()["replayed_at"] == replayed.json()["replayed_at"]


async def _when(market: Marketplace, order_id: str, predicate) -> dict[str, Any] | None:
    order = await market.order(order_id)
    return order if predicate(order) else None


async def _send_to_queue(
    system: Any, queue: str, body: bytes, headers: dict[str, Any] | None = None
) -> None:
    connection = await aio_pika.connect(system.rabbitmq_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        prefix = system.env.get("QUEUE_PREFIX", "")
        await channel.default_exchange.publish(
            aio_pika.Message(body=body, headers=headers or {}, message_id=str(uuid.uuid4())),
            routing_key=f"{prefix}{queue}",
        )
