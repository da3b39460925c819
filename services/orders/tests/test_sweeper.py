"""The sweeper fails orders whose payment never opened, on the real Postgres and RabbitMQ.

Orders are made old by moving their `created_at` back (`backdate`), and the sweep runs at the
clock's now: orders other tests left pending are younger than the timeout and never touched.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from booking.devtools.fixtures import free_port
from booking.orders.service import OrderService
from booking.orders.settings import OrdersSettings
from booking.orders.sweeper import Sweep, Sweeper
from booking.runtime.db import Database

REF = "5f0c1e2d3a4b5c6d7e8f9a0b"
TIMEOUT = 30  # minutes: PAYMENT_OPENING_TIMEOUT_MINUTES' default, the tested setting


def unreachable(orders: Any, engine: AsyncEngine) -> OrderService:
    """The service's use cases on a database that does not answer."""
    service = orders.sweeper.orders
    return OrderService(
        Database(engine, "orders"),
        service.outbox,
        service.tables,
        horizon=service.horizon,
        changes_exchange=service.changes_exchange,
    )


def test_the_defaults_are_the_documented_ones() -> None:
    settings = OrdersSettings()
    assert settings.payment_opening_timeout_minutes == TIMEOUT
    assert settings.orders_sweeper_interval_seconds == 60


class TestPaymentsThatNeverOpened:
    async def test_an_order_pending_past_the_timeout_fails_frees_its_slot_and_says_so(
        self, orders
    ) -> None:
        start = orders.future(days=60, hour=7)
        booked = await orders.booked(start)
        await orders.backdate(booked.order_id, TIMEOUT + 1)

        swept = await orders.sweeper.run_once()
        assert swept.unopened_failed >= 1
        order = await orders.order(booked)
        assert (order["status"], order["session"]["status"]) == ("payment_failed", "cancelled")
        assert order["payment"] == {"ref": None, "pay_url": None, "status": "not_opened"}

        await orders.quiet()
        assert orders.events("OrderCancelled", order_id=booked.order_id) == [
            {
                "order_id": booked.order_id,
                "session_id": booked.session_id,
                "mentor_id": booked.mentor_id,
                "reason": "payment_never_opened",
                "by": None,
            }
        ]
        [issue] = orders.events("SessionIssueDetected", order_id=booked.order_id)
        assert issue["kind"] == "payment_never_opened"
        assert issue["session_id"] == booked.session_id
        assert f"within {TIMEOUT} minutes" in issue["detail"]
        # No admin did this: nothing is audited.
        assert await orders.audit_rows(booked.order_id) == []

        again = await orders.book(booked.offering_id, start)
        assert again.status_code == 202, again.text

    async def test_a_second_sweep_changes_and_announces_nothing_more(self, orders) -> None:
        booked = await orders.booked()
        await orders.backdate(booked.order_id, TIMEOUT + 5)
        await orders.sweeper.run_once()
        await orders.sweeper.run_once()

        await orders.quiet()
        assert await orders.order_status(booked.order_id) == ("payment_failed", "cancelled")
        assert len(orders.events("OrderCancelled", order_id=booked.order_id)) == 1
        assert len(orders.events("SessionIssueDetected", order_id=booked.order_id)) == 1
        assert await orders.outbox_count("OrderCancelled", booked.order_id) == 1

    async def test_an_order_within_the_timeout_is_left_alone(self, orders) -> None:
        booked = await orders.booked()
        await orders.backdate(booked.order_id, TIMEOUT - 1)
        await orders.sweeper.run_once()

        await orders.quiet()
        assert await orders.order_status(booked.order_id) == ("pending", "pending_payment")
        assert orders.events("OrderCancelled", order_id=booked.order_id) == []

    async def test_orders_whose_payment_opened_are_left_alone_however_old(self, orders) -> None:
        awaiting = await orders.booked()
        await orders.handled(await orders.publish(awaiting.initiated(REF)))
        # Money seen before PaymentInitiated: still pending, but the payment evidently opened.
        underpaid_early = await orders.booked()
        short = orders.PRICE - 1_000
        await orders.handled(
            await orders.publish(underpaid_early.completed(REF, paid=short, fee=17_850))
        )
        paid = await orders.booked()
        await orders.pay(paid, REF)
        for booked in (awaiting, underpaid_early, paid):
            await orders.backdate(booked.order_id, TIMEOUT * 10)

        await orders.sweeper.run_once()
        await orders.quiet()
        assert await orders.order_status(awaiting.order_id) == (
            "awaiting_payment",
            "pending_payment",
        )
        assert await orders.order_status(underpaid_early.order_id) == (
            "pending",
            "pending_payment",
        )
        assert await orders.order_status(paid.order_id) == ("paid", "awaiting_calendar")
        for booked in (awaiting, underpaid_early, paid):
            assert orders.events("OrderCancelled", order_id=booked.order_id) == []

    async def test_a_payment_that_opens_after_all_never_revives_the_order(self, orders) -> None:
        booked = await orders.booked()
        await orders.backdate(booked.order_id, TIMEOUT + 1)
        await orders.sweeper.run_once()
        await orders.handled(await orders.publish(booked.initiated(REF)))  # late
        await orders.quiet(await orders.publish(booked.completed(REF)))  # and paid

        order = await orders.order(booked)
        assert (order["status"], order["session"]["status"]) == ("payment_failed", "cancelled")
        [issue] = [
            i
            for i in orders.events("SessionIssueDetected", order_id=booked.order_id)
            if i["kind"] != "payment_never_opened"
        ]
        assert issue["kind"] == "payment_for_cancelled_order"
        assert orders.events("OrderPaid", order_id=booked.order_id) == []
        assert orders.spy.of_type("SystemErrorReported") == []

    async def test_replicas_sweeping_at_once_fail_each_order_once(self, orders) -> None:
        bookings = [await orders.booked() for _ in range(5)]
        for booked in bookings:
            await orders.backdate(booked.order_id, TIMEOUT + 2)
        # Batches of one, so the replicas interleave and meet each other's locks.
        one_by_one = orders.settings.model_copy(update={"orders_sweeper_batch_size": 1})
        replicas = [Sweeper(orders.sweeper.orders, one_by_one) for _ in range(3)]
        sweeps = await asyncio.gather(*(replica.run_once() for replica in replicas))

        assert sum(s.unopened_failed for s in sweeps) >= len(bookings)
        await orders.quiet()
        for booked in bookings:
            assert await orders.order_status(booked.order_id) == ("payment_failed", "cancelled")
            assert len(orders.events("OrderCancelled", order_id=booked.order_id)) == 1
            assert len(orders.events("SessionIssueDetected", order_id=booked.order_id)) == 1

    async def test_the_service_sweeps_on_its_own(self, serve_orders) -> None:
        async with serve_orders(orders_sweeper_interval_seconds=0.1) as orders:
            booked = await orders.booked()
            await orders.backdate(booked.order_id, TIMEOUT + 1)
            await orders.wait_for_status(booked.order_id, "payment_failed", "cancelled")
            await orders.wait_for_event("OrderCancelled", order_id=booked.order_id)


class TestDatabaseAway:
    async def test_a_sweep_without_the_database_logs_one_quiet_line_and_raises_nothing(
        self, orders, caplog
    ) -> None:
        nowhere = create_async_engine(
            f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/postgres",
            connect_args={"timeout": 2},
        )
        sweeper = Sweeper(unreachable(orders, nowhere), orders.settings)
        try:
            with caplog.at_level(logging.WARNING, logger="booking.orders.sweeper"):
                outcomes = [await sweeper.sweep(datetime.now(UTC)) for _ in range(3)]
        finally:
            await nowhere.dispose()

        assert outcomes == [None, None, None]
        lines = [r for r in caplog.records if r.name == "booking.orders.sweeper"]
        assert len(lines) == 1, [r.getMessage() for r in lines]
        assert "unreachable" in lines[0].getMessage()
        assert lines[0].exc_info is None

    async def test_the_sweep_says_once_that_the_database_answers_again(
        self, orders, caplog
    ) -> None:
        nowhere = create_async_engine(
            f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/postgres",
            connect_args={"timeout": 2},
        )
        sweeper = Sweeper(unreachable(orders, nowhere), orders.settings)
        with caplog.at_level(logging.WARNING, logger="booking.orders.sweeper"):
            assert await sweeper.sweep() is None
            await nowhere.dispose()
            sweeper.orders = orders.sweeper.orders  # the database is back
            assert isinstance(await sweeper.sweep(), Sweep)
            assert isinstance(await sweeper.sweep(), Sweep)

        messages = [r.getMessage() for r in caplog.records if r.name == "booking.orders.sweeper"]
        assert len(messages) == 2, messages
        assert "unreachable" in messages[0] and "answers again" in messages[1]
