"""What orders does with payments' and calendar's events, published on its real exchange.

Events arrive at least once and in any order: each test says what one arrival, a repeat or a
late one does, and that none of them is dead-lettered.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import text

from booking.contracts import (
    CalendarBookingFailed,
    CalendarFailureReason,
    PaymentInitiationFailed,
)
from booking.orders.handlers import _lock
from booking.runtime.testing import eventually

REF = "5f0c1e2d3a4b5c6d7e8f9a0b"


def assert_nothing_dead_lettered(orders) -> None:
    assert orders.spy.of_type("SystemErrorReported") == []


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
        assert_nothing_dead_lettered(orders)

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
        assert_nothing_dead_lettered(orders)

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
        assert_nothing_dead_lettered(orders)

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
        assert_nothing_dead_lettered(orders)

    async def test_money_in_another_currency_is_reported_not_applied(self, orders) -> None:
        booked = await orders.booked()
        in_euros = booked.completed(REF).model_copy(update={"currency": "EUR"})
        await orders.quiet(await orders.publish(in_euros))

        assert await orders.order_status(booked.order_id) == ("pending", "pending_payment")
        [issue] = orders.events("SessionIssueDetected", order_id=booked.order_id)
        assert issue["kind"] == "currency_mismatch"
        assert_nothing_dead_lettered(orders)


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
        assert_nothing_dead_lettered(orders)


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

    async def test_a_failed_calendar_booking_keeps_the_slot_and_a_later_success_schedules(
        self, orders
    ) -> None:
        start = orders.future(days=44)
        booked = await orders.booked(start)
        await orders.handled(await orders.publish(booked.completed(REF)))
        failed = CalendarBookingFailed(
            session_id=booked.session_id,
            order_id=booked.order_id,
            mentor_id=booked.mentor_id,
            reason=CalendarFailureReason.MENTOR_NOT_INTEGRATED,
            detail="no Google connection",
            attempts=1,
        )
        await orders.handled(await orders.publish(failed))
        assert await orders.order_status(booked.order_id) == ("paid", "scheduling_failed")
        orders.problem(await orders.book(booked.offering_id, start), 409)

        await orders.handled(await orders.publish(booked.confirmed()))
        assert await orders.order_status(booked.order_id) == ("confirmed", "scheduled")

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
        )
        other_event = booked.confirmed("evt2")
        await orders.quiet(await orders.publish(late_failure), await orders.publish(other_event))
        order = await orders.order(booked)
        assert (order["status"], order["session"]["status"]) == ("confirmed", "scheduled")
        assert order["session"]["calendar_event_id"] == "evt1"
        assert_nothing_dead_lettered(orders)


class TestLocking:
    async def test_a_handler_holds_the_order_and_its_session_locked_until_it_commits(
        self, orders
    ) -> None:
        booked = await orders.booked()
        order_id = uuid.UUID(booked.order_id)
        async with orders.runtime.db.transaction() as session:
            order, session_row = await _lock(session, order_id)
            assert (str(order.id), str(session_row.id)) == (booked.order_id, booked.session_id)
            async with orders.runtime.db.engine.connect() as other:
                for table, column in (("orders", "id"), ("booked_sessions", "order_id")):
                    free = await other.scalar(
                        text(
                            f"SELECT count(*) FROM (SELECT 1 FROM orders.{table}"
                            f" WHERE {column} = :id FOR UPDATE SKIP LOCKED) AS s"
                        ),
                        {"id": order_id},
                    )
                    assert free == 0, f"the {table} row is not locked"
        assert await _lock_nothing(orders, uuid.uuid4()) is None


async def _lock_nothing(orders, order_id: uuid.UUID):
    async with orders.runtime.db.transaction() as session:
        return await _lock(session, order_id)
