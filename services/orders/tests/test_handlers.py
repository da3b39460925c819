"""What orders does with payments' and calendar's events.

Events arrive at least once and in any order: each test says what one arrival, a repeat or a
late one does, and that none of them is dead-lettered. The broker is not the point here: the
service runs in process, events reach its consumer on FastStream's TestRabbitBroker, and what it
emits is read from its outbox (the delivery guarantees are tested in libs/runtime on RabbitMQ).
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from booking.contracts import (
    CalendarBookingFailed,
    CalendarFailureReason,
    PaymentInitiationFailed,
)
from booking.devtools.fixtures import eventually

REF = "5f0c1e2d3a4b5c6d7e8f9a0b"


@pytest.fixture
def orders(orders_in_process):
    """Here the service runs in process, on the test broker (conftest.OrdersInProcess)."""
    return orders_in_process


async def assert_nothing_dead_lettered(orders) -> None:
    """No delivery retried or dead-lettered: none counted so, no dead letter kept, no
    SystemErrorReported recorded."""
    await orders.quiet()
    assert orders.events("SystemErrorReported") == []
    assert await orders.dead_letters() == 0
    counts = await orders.consumer_counts()
    failed = {key: n for key, n in counts.items() if key[1] in ("retried", "dead_lettered") and n}
    assert failed == {}


class TestPaymentInitiated:
    async def test_the_order_awaits_payment_at_the_pay_url(self, orders) -> None:
        booked = await orders.booked()
        await orders.handled(await orders.publish(booked.initiated(REF)))

        order = await orders.order(booked)
        assert order["status"] == "awaiting_payment"
        assert order["session"]["status"] == "pending_payment"
        assert order["payment"] == {
            "ref": REF,
            "pay_url": f"https://pay.example/pay?payment_ref={REF}",
            "status": "pending",
        }
        assert order["escrow"] is None


class TestPaymentCompleted:
    async def test_payment_in_full_pays_the_order_and_asks_the_calendar_for_the_session(
        self, orders
    ) -> None:
        start = orders.future(days=40, hour=15)
        booked = await orders.booked(start)
        await orders.handled(await orders.publish(booked.initiated(REF)))
        await orders.quiet(await orders.publish(booked.completed(REF)))

        assert await orders.order_status(booked.order_id) == ("paid", "awaiting_calendar")
        assert orders.events("OrderPaid", order_id=booked.order_id) == [
            {
                "order_id": booked.order_id,
                "session_id": booked.session_id,
                "mentor_id": booked.mentor_id,
                "mentee_email": "sami@example.com",
                "title": "Career chat",
                "start_at": start.isoformat().replace("+00:00", "Z"),
                "end_at": (start + timedelta(hours=1)).isoformat().replace("+00:00", "Z"),
            }
        ]
        order = await orders.order(booked)
        assert order["amount_paid"] == {"amount": orders.PRICE, "currency": "TND"}
        assert order["escrow"] == {
            "platform_fee": {"amount": orders.FEE, "currency": "TND"},
            "escrow_amount": {"amount": orders.ESCROW, "currency": "TND"},
            "status": "held",
        }
        assert order["payment"]["status"] == "completed"
        assert order["payment"]["ref"] == REF
        assert order["payment"]["pay_url"].endswith(REF)
        assert orders.events("SessionIssueDetected", order_id=booked.order_id) == []

    async def test_a_completion_delivered_twice_or_sent_twice_pays_once(self, orders) -> None:
        booked = await orders.booked()
        await orders.handled(await orders.publish(booked.initiated(REF)))
        completed = booked.completed(REF)
        first = await orders.publish(completed)
        await orders.publish(completed, message_id=first)  # the same message, redelivered
        sent_again = await orders.publish(completed)  # the same fact in a new message

        async def redelivery_seen() -> bool:
            return await orders.consumed("PaymentCompleted", "duplicate") == 1

        await eventually(redelivery_seen, what="the redelivery reaching the inbox")
        await orders.quiet(first, sent_again)

        assert len(orders.events("OrderPaid", order_id=booked.order_id)) == 1
        assert orders.events("SessionIssueDetected", order_id=booked.order_id) == []
        assert await orders.order_status(booked.order_id) == ("paid", "awaiting_calendar")
        await assert_nothing_dead_lettered(orders)

    async def test_a_completion_before_the_initiation_still_ends_paid(self, orders) -> None:
        booked = await orders.booked()
        await orders.quiet(await orders.publish(booked.completed(REF)))
        assert await orders.order_status(booked.order_id) == ("paid", "awaiting_calendar")

        await orders.quiet(await orders.publish(booked.initiated(REF)))  # late
        order = await orders.order(booked)
        assert (order["status"], order["session"]["status"]) == ("paid", "awaiting_calendar")
        assert order["payment"] == {
            "ref": REF,
            "pay_url": f"https://pay.example/pay?payment_ref={REF}",
            "status": "completed",
        }
        assert len(orders.events("OrderPaid", order_id=booked.order_id)) == 1
        await assert_nothing_dead_lettered(orders)

    async def test_an_underpayment_leaves_the_order_unpaid_and_tells_the_admins(
        self, orders
    ) -> None:
        booked = await orders.booked()
        await orders.handled(await orders.publish(booked.initiated(REF)))
        short = orders.PRICE - 20_000
        await orders.quiet(await orders.publish(booked.completed(REF, paid=short, fee=15_000)))

        order = await orders.order(booked)
        assert (order["status"], order["session"]["status"]) == (
            "awaiting_payment",
            "pending_payment",
        )
        assert order["amount_paid"] == {"amount": short, "currency": "TND"}
        [issue] = orders.events("SessionIssueDetected", order_id=booked.order_id)
        assert issue["kind"] == "underpayment"
        assert issue["session_id"] == booked.session_id
        assert "20000 short" in issue["detail"]
        assert orders.events("OrderPaid", order_id=booked.order_id) == []

    async def test_money_for_an_unknown_order_is_reported_not_dropped(self, orders) -> None:
        booked = await orders.booked()
        stranger = booked.completed(REF).model_copy(update={"order_id": uuid.uuid4()})
        await orders.quiet(await orders.publish(stranger))

        [issue] = orders.events("SessionIssueDetected", order_id=stranger.order_id)
        assert issue["kind"] == "payment_for_unknown_order"
        assert issue["session_id"] is None
        assert REF in issue["detail"] and str(orders.PRICE) in issue["detail"]
        await assert_nothing_dead_lettered(orders)

    async def test_money_for_an_order_whose_payment_failed_is_reported_not_applied(
        self, orders
    ) -> None:
        booked = await orders.booked()
        await orders.handled(await orders.publish(booked.initiated(REF)))
        await orders.handled(await orders.publish(booked.failed(REF, reason="expired")))
        await orders.quiet(await orders.publish(booked.completed(REF)))

        assert await orders.order_status(booked.order_id) == ("payment_failed", "cancelled")
        [issue] = orders.events("SessionIssueDetected", order_id=booked.order_id)
        assert issue["kind"] == "payment_for_cancelled_order"
        assert issue["session_id"] == booked.session_id
        assert orders.events("OrderPaid", order_id=booked.order_id) == []

    async def test_money_for_a_cancelled_order_is_reported_not_applied(self, orders) -> None:
        booked = await orders.booked()
        unpayable = PaymentInitiationFailed(
            order_id=booked.order_id, reason="konnect_unavailable", detail="503 x 4"
        )
        await orders.handled(await orders.publish(unpayable))
        await orders.quiet(await orders.publish(booked.completed(REF)))

        assert await orders.order_status(booked.order_id) == ("cancelled", "cancelled")
        [issue] = orders.events("SessionIssueDetected", order_id=booked.order_id)
        assert issue["kind"] == "payment_for_cancelled_order"

    async def test_a_second_payment_for_a_paid_order_is_reported_not_applied(self, orders) -> None:
        booked = await orders.booked()
        await orders.quiet(await orders.publish(booked.completed(REF)))
        other_ref = "0123456789abcdef01234567"
        await orders.quiet(await orders.publish(booked.completed(other_ref)))

        [issue] = orders.events("SessionIssueDetected", order_id=booked.order_id)
        assert issue["kind"] == "payment_for_paid_order"
        assert other_ref in issue["detail"]
        assert len(orders.events("OrderPaid", order_id=booked.order_id)) == 1
        await assert_nothing_dead_lettered(orders)

    async def test_money_in_another_currency_is_reported_not_applied(self, orders) -> None:
        booked = await orders.booked()
        in_euros = booked.completed(REF).model_copy(update={"currency": "EUR"})
        await orders.quiet(await orders.publish(in_euros))

        assert await orders.order_status(booked.order_id) == ("pending", "pending_payment")
        [issue] = orders.events("SessionIssueDetected", order_id=booked.order_id)
        assert issue["kind"] == "currency_mismatch"
        await assert_nothing_dead_lettered(orders)


class TestPaymentEndsWithoutMoney:
    async def test_a_failed_payment_fails_the_order_and_frees_the_slot(self, orders) -> None:
        start = orders.future(days=41)
        booked = await orders.booked(start)
        await orders.handled(await orders.publish(booked.initiated(REF)))
        await orders.handled(await orders.publish(booked.failed(REF, reason="expired")))

        order = await orders.order(booked)
        assert (order["status"], order["session"]["status"]) == ("payment_failed", "cancelled")
        assert order["payment"]["status"] == "expired"
        again = await orders.book(booked.offering_id, start)
        assert again.status_code == 202, again.text

    async def test_an_unpayable_order_is_cancelled_and_frees_the_slot(self, orders) -> None:
        start = orders.future(days=42)
        booked = await orders.booked(start)
        unpayable = PaymentInitiationFailed(
            order_id=booked.order_id, reason="konnect_unavailable", detail="503 x 4"
        )
        await orders.handled(await orders.publish(unpayable))

        order = await orders.order(booked)
        assert (order["status"], order["session"]["status"]) == ("cancelled", "cancelled")
        assert order["payment"] == {"ref": None, "pay_url": None, "status": "initiation_failed"}
        again = await orders.book(booked.offering_id, start)
        assert again.status_code == 202, again.text

    async def test_a_late_failure_leaves_a_paid_order_paid(self, orders) -> None:
        start = orders.future(days=43)
        booked = await orders.booked(start)
        await orders.handled(await orders.publish(booked.completed(REF)))
        await orders.quiet(await orders.publish(booked.failed(REF, reason="expired")))

        assert await orders.order_status(booked.order_id) == ("paid", "awaiting_calendar")
        orders.problem(await orders.book(booked.offering_id, start), 409)  # still held
        await assert_nothing_dead_lettered(orders)


class TestCalendar:
    async def test_a_confirmed_calendar_booking_schedules_the_session_and_confirms_the_order(
        self, orders
    ) -> None:
        booked = await orders.booked()
        await orders.handled(await orders.publish(booked.completed(REF)))
        await orders.handled(await orders.publish(booked.confirmed("evt0123456789")))

        order = await orders.order(booked)
        assert order["status"] == "confirmed"
        assert order["session"]["status"] == "scheduled"
        assert order["session"]["meet_link"] == "https://meet.google.com/abc-defg-hij"
        assert order["session"]["calendar_event_id"] == "evt0123456789"

    async def test_the_confirmation_announces_the_confirmed_order_once(self, orders) -> None:
        start = orders.future(days=45, hour=10)
        booked = await orders.booked(start)
        await orders.pay(booked, REF)
        confirmed = booked.confirmed("evt0123456789")
        first = await orders.publish(confirmed)
        again = await orders.publish(confirmed)  # the same fact in a new message
        await orders.quiet(first, again)

        assert orders.events("OrderConfirmed", order_id=booked.order_id) == [
            {
                "order_id": booked.order_id,
                "session_id": booked.session_id,
                "mentor_id": booked.mentor_id,
                "end_at": (start + timedelta(hours=1)).isoformat().replace("+00:00", "Z"),
            }
        ]
        assert await orders.outbox_count("OrderConfirmed", booked.order_id) == 1

    async def test_a_failure_that_will_be_retried_leaves_the_session_waiting_and_the_slot_held(
        self, orders
    ) -> None:
        start = orders.future(days=44)
        booked = await orders.booked(start)
        await orders.pay(booked, REF)
        for reason, attempts in (("calendar_api_error", 1), ("mentor_not_integrated", 2)):
            failed = booked.calendar_failed(final=False, reason=reason, attempts=attempts)
            await orders.quiet(await orders.publish(failed))
            assert await orders.order_status(booked.order_id) == ("paid", "awaiting_calendar")
        assert orders.events("SchedulingAbandoned", order_id=booked.order_id) == []
        orders.problem(await orders.book(booked.offering_id, start), 409)

        await orders.quiet(await orders.publish(booked.confirmed()))
        assert await orders.order_status(booked.order_id) == ("confirmed", "scheduled")
        assert len(orders.events("OrderConfirmed", order_id=booked.order_id)) == 1
        await assert_nothing_dead_lettered(orders)

    async def test_a_final_failure_abandons_the_scheduling_and_keeps_the_slot(self, orders) -> None:
        start = orders.future(days=46)
        booked = await orders.booked(start)
        await orders.pay(booked, REF)
        final = booked.calendar_failed(
            final=True, reason="store_not_found", attempts=5, detail="no such mentor"
        )
        first = await orders.publish(final)
        again = await orders.publish(final)  # the same fact in a new message
        await orders.quiet(first, again)

        assert await orders.order_status(booked.order_id) == ("paid", "scheduling_failed")
        assert orders.events("SchedulingAbandoned", order_id=booked.order_id) == [
            {
                "order_id": booked.order_id,
                "session_id": booked.session_id,
                "mentor_id": booked.mentor_id,
                "reason": "store_not_found",
                "detail": "no such mentor",
            }
        ]
        assert await orders.outbox_count("SchedulingAbandoned", booked.order_id) == 1
        orders.problem(await orders.book(booked.offering_id, start), 409)  # paid for: held
        assert orders.events("OrderConfirmed", order_id=booked.order_id) == []

    async def test_an_admins_retry_that_succeeds_after_a_final_failure_confirms_the_order(
        self, orders
    ) -> None:
        booked = await orders.booked()
        await orders.pay(booked, REF)
        await orders.handled(await orders.publish(booked.calendar_failed(final=True)))
        assert await orders.order_status(booked.order_id) == ("paid", "scheduling_failed")

        await orders.quiet(await orders.publish(booked.confirmed("evt-after-retry")))
        order = await orders.order(booked)
        assert (order["status"], order["session"]["status"]) == ("confirmed", "scheduled")
        assert order["session"]["calendar_event_id"] == "evt-after-retry"
        [confirmed] = orders.events("OrderConfirmed", order_id=booked.order_id)
        assert confirmed["session_id"] == booked.session_id
        await assert_nothing_dead_lettered(orders)

    async def test_a_final_failure_for_a_scheduled_session_is_stale(self, orders) -> None:
        booked = await orders.booked()
        await orders.pay(booked, REF)
        await orders.handled(await orders.publish(booked.confirmed("evt1")))
        late = booked.calendar_failed(final=True, reason="integration_revoked", attempts=3)
        await orders.quiet(await orders.publish(late))

        assert await orders.order_status(booked.order_id) == ("confirmed", "scheduled")
        assert orders.events("SchedulingAbandoned", order_id=booked.order_id) == []
        await assert_nothing_dead_lettered(orders)

    async def test_calendar_news_for_a_cancelled_session_never_revives_it(self, orders) -> None:
        booked = await orders.booked()
        await orders.pay(booked, REF)
        cancelled = await orders.client.post(
            f"/api/admin/orders/{booked.order_id}/cancel",
            json={"reason": "mentee asked"},
            headers=orders.admin,
        )
        assert cancelled.status_code == 200, cancelled.text
        await orders.quiet(
            await orders.publish(booked.calendar_failed(final=True)),
            await orders.publish(booked.confirmed("evt-late")),
        )

        order = await orders.order(booked)
        assert (order["status"], order["session"]["status"]) == ("cancelled", "cancelled")
        assert order["session"]["calendar_event_id"] is None
        assert orders.events("OrderConfirmed", order_id=booked.order_id) == []
        assert orders.events("SchedulingAbandoned", order_id=booked.order_id) == []
        await assert_nothing_dead_lettered(orders)

    async def test_stale_calendar_events_change_nothing_and_are_not_dead_lettered(
        self, orders
    ) -> None:
        booked = await orders.booked()
        # Confirmed before the order is paid (impossible in order, possible out of it).
        early = await orders.publish(booked.confirmed())
        await orders.handled(early)
        assert await orders.order_status(booked.order_id) == ("pending", "pending_payment")

        await orders.handled(await orders.publish(booked.completed(REF)))
        await orders.handled(await orders.publish(booked.confirmed("evt1")))
        late_failure = CalendarBookingFailed(
            session_id=booked.session_id,
            order_id=booked.order_id,
            mentor_id=booked.mentor_id,
            reason=CalendarFailureReason.CALENDAR_API_ERROR,
            detail="503",
            attempts=5,
            final=True,
        )
        other_event = booked.confirmed("evt2")
        await orders.quiet(await orders.publish(late_failure), await orders.publish(other_event))
        order = await orders.order(booked)
        assert (order["status"], order["session"]["status"]) == ("confirmed", "scheduled")
        assert order["session"]["calendar_event_id"] == "evt1"
        await assert_nothing_dead_lettered(orders)


class TestEscrowStatus:
    @pytest.mark.parametrize(
        ("status", "shown"),
        [
            ("frozen", "frozen"),
            ("held", "held"),
            ("refund_due", "refund_due"),
            ("refunded", "refunded"),
            ("released", "released"),
        ],
    )
    async def test_each_escrow_event_shows_its_status(self, orders, status: str, shown: str):
        booked = await orders.booked()
        await orders.pay(booked, REF)
        await orders.quiet(await orders.publish(booked.escrow(status, 1)))

        escrow = (await orders.order(booked))["escrow"]
        assert escrow == {
            "platform_fee": {"amount": orders.FEE, "currency": "TND"},
            "escrow_amount": {"amount": orders.ESCROW, "currency": "TND"},
            "status": shown,
        }
        # Even "held" (an unfreeze) is news: it is kept with its sequence.
        sql = "SELECT escrow_sequence FROM orders.orders WHERE id = :id"
        assert await orders.scalar(sql, id=booked.order_id) == 1
        await assert_nothing_dead_lettered(orders)

    async def test_the_status_of_the_highest_sequence_wins_in_any_arrival_order(
        self, orders
    ) -> None:
        booked = await orders.booked()
        await orders.pay(booked, REF)
        # Frozen (2), refund due (3), refunded (4) arrive backwards.
        for status, sequence in (("refunded", 4), ("refund_due", 3), ("frozen", 2)):
            await orders.handled(await orders.publish(booked.escrow(status, sequence)))
            order = await orders.order(booked)
            assert order["escrow"]["status"] == "refunded", (status, sequence)
        # An equal sequence is not newer either.
        await orders.handled(await orders.publish(booked.escrow("released", 4)))
        assert (await orders.order(booked))["escrow"]["status"] == "refunded"
        assert (
            await orders.scalar(
                "SELECT escrow_sequence FROM orders.orders WHERE id = :id", id=booked.order_id
            )
            == 4
        )

    async def test_a_frozen_escrow_unfrozen_and_released_ends_released(self, orders) -> None:
        booked = await orders.booked()
        await orders.pay(booked, REF)
        for status, sequence, shown in (
            ("frozen", 1, "frozen"),
            ("held", 2, "held"),
            ("released", 3, "released"),
        ):
            await orders.handled(await orders.publish(booked.escrow(status, sequence)))
            assert (await orders.order(booked))["escrow"]["status"] == shown

    async def test_a_payment_applied_after_an_escrow_event_keeps_the_newer_status(
        self, orders
    ) -> None:
        booked = await orders.booked()
        await orders.handled(await orders.publish(booked.initiated(REF)))
        await orders.handled(await orders.publish(booked.escrow("frozen", 2)))
        await orders.quiet(await orders.publish(booked.completed(REF)))

        order = await orders.order(booked)
        assert (order["status"], order["session"]["status"]) == ("paid", "awaiting_calendar")
        assert order["escrow"]["status"] == "frozen"

    async def test_money_for_an_ended_order_shows_its_escrow_refund_due(self, orders) -> None:
        booked = await orders.booked()
        await orders.handled(await orders.publish(booked.initiated(REF)))
        await orders.handled(await orders.publish(booked.failed(REF, reason="expired")))
        await orders.handled(await orders.publish(booked.completed(REF)))  # too late
        await orders.quiet(await orders.publish(booked.escrow("refund_due", 1)))

        order = await orders.order(booked)
        assert (order["status"], order["session"]["status"]) == ("payment_failed", "cancelled")
        assert order["escrow"] == {
            "platform_fee": {"amount": orders.FEE, "currency": "TND"},
            "escrow_amount": {"amount": orders.ESCROW, "currency": "TND"},
            "status": "refund_due",
        }
        [issue] = orders.events("SessionIssueDetected", order_id=booked.order_id)
        assert issue["kind"] == "payment_for_cancelled_order"
        assert orders.events("OrderPaid", order_id=booked.order_id) == []

    async def test_an_escrow_event_for_an_unknown_order_is_not_dead_lettered(self, orders):
        booked = await orders.booked()
        stranger = booked.escrow("frozen", 1).model_copy(update={"order_id": uuid.uuid4()})
        await orders.quiet(await orders.publish(stranger))
        await assert_nothing_dead_lettered(orders)
        assert await orders.consumed("EscrowFrozen", "handled") == 1


class TestUnderpaidOrderExpires:
    async def test_the_expired_underpayment_fails_the_order_frees_the_slot_and_owes_a_refund(
        self, orders
    ) -> None:
        start = orders.future(days=47)
        booked = await orders.booked(start)
        await orders.handled(await orders.publish(booked.initiated(REF)))
        short = orders.PRICE - 50_000
        await orders.handled(await orders.publish(booked.completed(REF, paid=short, fee=10_500)))
        await orders.handled(await orders.publish(booked.failed(REF, reason="expired")))

        order = await orders.order(booked)
        assert (order["status"], order["session"]["status"]) == ("payment_failed", "cancelled")
        assert order["payment"]["status"] == "expired"
        assert order["amount_paid"] == {"amount": short, "currency": "TND"}
        again = await orders.book(booked.offering_id, start)
        assert again.status_code == 202, again.text

        refund = booked.escrow("refund_due", 1, escrow_amount=short - 10_500, refund_amount=short)
        await orders.quiet(await orders.publish(refund))
        escrow = (await orders.order(booked))["escrow"]
        assert escrow["status"] == "refund_due"
        assert escrow["escrow_amount"] == {"amount": short - 10_500, "currency": "TND"}

        # The rest arriving now never confirms it: the admins hear of the money.
        await orders.quiet(await orders.publish(booked.completed(REF)))
        assert await orders.order_status(booked.order_id) == ("payment_failed", "cancelled")
        kinds = {i["kind"] for i in orders.events("SessionIssueDetected", order_id=booked.order_id)}
        assert kinds == {"underpayment", "payment_for_cancelled_order"}
        assert orders.events("OrderPaid", order_id=booked.order_id) == []
