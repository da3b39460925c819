"""The sweeper: lost webhooks, abandoned and underpaid payments, the release of escrow whose
session was scheduled; replicas never double it; a database outage is logged quietly."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from datetime import UTC, datetime, timedelta

from booking.devtools.fixtures import free_port
from booking.payments.konnect import KonnectClient
from booking.payments.service import PaymentService
from booking.payments.sweeper import Sweeper
from booking.payments.tables import SCHEMA, messaging
from booking.runtime.db import Database, create_engine
from booking.runtime.outbox import Outbox


def now() -> datetime:
    return datetime.now(UTC)


async def expiry_of(db, order_id) -> datetime:
    return await db.fetchval(
        "SELECT expires_at FROM payments.payments WHERE order_id = $1", order_id
    )


class TestLostWebhooks:
    async def test_a_payment_whose_webhook_was_lost_is_completed_by_the_sweep(
        self, payments_service, sandbox, book, db
    ):
        event, ref = await book(payments_service, amount=33_333)
        await sandbox.complete(ref, webhook="none")

        sweep = await payments_service.sweeper.run_once()

        assert sweep.checked == 1
        completed = await payments_service.one("PaymentCompleted", event.order_id)
        assert (completed["platform_fee"], completed["escrow_amount"]) == (5_000, 28_333)

    async def test_the_running_service_sweeps_on_its_own(self, start_payments, sandbox, book):
        running = await start_payments(reconciliation_interval_seconds=0.2)
        event, ref = await book(running)

        await sandbox.complete(ref, webhook="none")

        await running.one("PaymentCompleted", event.order_id)

    async def test_a_payment_younger_than_the_grace_period_is_left_to_its_webhook(
        self, start_payments, sandbox, book, db
    ):
        running = await start_payments(reconciliation_grace_seconds=120)
        event, ref = await book(running)
        await sandbox.complete(ref, webhook="none")

        early = await running.sweeper.run_once()
        after_grace = await running.sweeper.run_once(now() + timedelta(seconds=121))

        assert (early.checked, after_grace.checked) == (0, 1)
        await running.one("PaymentCompleted", event.order_id)

    async def test_a_failed_attempt_keeps_the_payment_open(
        self, payments_service, sandbox, book, db
    ):
        event, ref = await book(payments_service)
        await sandbox.fail(ref, webhook="none")

        await payments_service.sweeper.run_once()

        status = await db.fetchval(
            "SELECT status FROM payments.payments WHERE order_id = $1", event.order_id
        )
        assert status == "pending"
        await payments_service.spy.settle()
        assert payments_service.published("PaymentFailed", event.order_id) == []


class TestExpiry:
    async def test_an_abandoned_payment_expires_past_its_lifespan(self, payments_service, book, db):
        event, ref = await book(payments_service)
        expires_at = await expiry_of(db, event.order_id)

        before = await payments_service.sweeper.run_once(expires_at - timedelta(seconds=1))
        await payments_service.spy.settle()
        assert before.checked == 1
        assert payments_service.published("PaymentFailed", event.order_id) == []
        await payments_service.sweeper.run_once(expires_at + timedelta(hours=1))

        failed = await payments_service.one("PaymentFailed", event.order_id)
        assert failed == {"order_id": str(event.order_id), "payment_ref": ref, "reason": "expired"}
        status = await db.fetchval(
            "SELECT status FROM payments.payments WHERE order_id = $1", event.order_id
        )
        assert status == "expired"

    async def test_a_payment_konnect_cannot_be_asked_about_is_never_expired_blind(
        self, payments_service, sandbox, book, db
    ):
        event, _ = await book(payments_service)
        expires_at = await expiry_of(db, event.order_id)
        await sandbox.fault("http_503", count=100, endpoint="get")

        await payments_service.sweeper.run_once(expires_at + timedelta(minutes=1))

        await payments_service.spy.settle()
        assert payments_service.published("PaymentFailed", event.order_id) == []
        status = await db.fetchval(
            "SELECT status FROM payments.payments WHERE order_id = $1", event.order_id
        )
        assert status == "pending"


class TestEscrowRelease:
    async def test_escrow_is_released_once_the_scheduled_session_ended_plus_the_delay(
        self, start_payments, sandbox, pay, db
    ):
        running = await start_payments(escrow_release_delay_minutes=30)
        event = await pay(running, sandbox, amount=33_333)
        await running.confirm(event)
        due = event.end_at + timedelta(minutes=30)

        early = await running.sweeper.run_once(due - timedelta(seconds=1))
        on_time = await running.sweeper.run_once(due)
        again = await running.sweeper.run_once(due + timedelta(days=30))

        assert (early.released, on_time.released, again.released) == (0, 1, 0)
        released = await running.one("EscrowReleased", event.order_id)
        assert released == {
            "order_id": str(event.order_id),
            "mentor_id": str(event.mentor_id),
            "escrow_amount": 28_333,
            "currency": "TND",
            "released_at": due.isoformat().replace("+00:00", "Z"),
            "by": None,
            "reason": released["reason"],
            "sequence": 2,
        }
        assert "released when due" in released["reason"]
        hold = await running.escrow(event.order_id)
        assert (hold["status"], hold["released_at"], hold["sequence"]) == ("released", due, 2)

    async def test_a_paid_session_never_scheduled_is_never_released(
        self, payments_service, sandbox, pay
    ):
        event = await pay(payments_service, sandbox)  # OrderConfirmed never comes

        sweep = await payments_service.sweeper.run_once(now() + timedelta(days=365))

        assert sweep.released == 0
        assert (await payments_service.escrow(event.order_id))["status"] == "held"

    async def test_a_paid_booking_whose_scheduling_was_abandoned_is_never_released(
        self, payments_service, sandbox, pay
    ):
        event = await pay(payments_service, sandbox)
        await payments_service.confirm(event)
        await payments_service.abandon_scheduling(event)

        sweep = await payments_service.sweeper.run_once(event.end_at + timedelta(days=365))

        assert sweep.released == 0
        assert (await payments_service.escrow(event.order_id))["status"] == "frozen"
        await payments_service.spy.settle()
        assert payments_service.published("EscrowReleased", event.order_id) == []

    async def test_a_session_scheduled_after_all_is_released_when_due(
        self, payments_service, sandbox, pay
    ):
        event = await pay(payments_service, sandbox)
        await payments_service.abandon_scheduling(event)
        await payments_service.confirm(event)

        sweep = await payments_service.sweeper.run_once(event.end_at + timedelta(days=2))

        assert sweep.released == 1
        released = await payments_service.one("EscrowReleased", event.order_id)
        sequences = [
            payments_service.published(kind, event.order_id)[0]["sequence"]
            for kind in ("EscrowFrozen", "EscrowUnfrozen", "EscrowReleased")
        ]
        assert sequences == [2, 3, 4] and released["sequence"] == 4

    async def test_money_owed_back_is_never_released(self, payments_service, sandbox, book):
        event, ref = await book(payments_service)
        await sandbox.complete(ref, amount=1_000)
        await sandbox.expire(ref)
        await payments_service.webhook(ref)
        await payments_service.one("EscrowRefundDue", event.order_id)

        sweep = await payments_service.sweeper.run_once(now() + timedelta(days=365))

        assert sweep.released == 0
        assert (await payments_service.escrow(event.order_id))["status"] == "refund_due"


class TestUnderpaidSweep:
    async def test_a_partial_payment_whose_webhook_was_lost_is_recorded_underpaid(
        self, payments_service, sandbox, book
    ):
        event, ref = await book(payments_service, amount=120_000)
        await sandbox.complete(ref, amount=70_000, webhook="none")

        sweep = await payments_service.sweeper.run_once()

        assert sweep.checked == 1
        short = await payments_service.one("PaymentCompleted", event.order_id)
        assert short["amount_paid"] == 70_000
        assert await payments_service.payment_status(event.order_id) == "underpaid"

    async def test_an_underpaid_payment_is_expired_by_the_sweep_and_its_money_owed_back(
        self, payments_service, sandbox, book, db
    ):
        event, ref = await book(payments_service, amount=120_000)
        await sandbox.complete(ref, amount=70_000)
        await payments_service.one("PaymentCompleted", event.order_id)
        expires_at = await expiry_of(db, event.order_id)

        # Konnect still calls it pending (its clock); our own expiry ends it.
        sweep = await payments_service.sweeper.run_once(expires_at + timedelta(hours=1))

        assert sweep.checked == 1  # underpaid payments are asked about too
        failed = await payments_service.one("PaymentFailed", event.order_id)
        assert failed["reason"] == "expired"
        owed = await payments_service.one("EscrowRefundDue", event.order_id)
        assert owed["refund_amount"] == 70_000
        kinds = [
            a["kind"] for a in payments_service.published("PaymentAnomalyDetected", event.order_id)
        ]
        assert kinds == ["underpayment", "underpaid_order_expired"]
        assert await payments_service.payment_status(event.order_id) == "expired"


class TestDatabaseOutage:
    async def test_a_sweep_without_its_database_logs_one_quiet_line(self, payments_service, caplog):
        settings = payments_service.settings.model_copy(
            update={"database_url": f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"}
        )
        engine = create_engine(settings)
        sweeper = Sweeper(
            PaymentService(
                db=Database(engine, SCHEMA),
                outbox=Outbox(messaging, producer="payments", exchange=settings.events_exchange),
                konnect=payments_service.service.konnect,
                settings=settings,
            ),
            settings,
        )
        caplog.set_level(logging.INFO, logger="booking.payments")
        try:
            outcomes = [
                await sweeper.guarded(sweep, now())
                for sweep in (sweeper.run_once, sweeper.release_escrow, sweeper.run_once)
            ]
        finally:
            await engine.dispose()

        assert outcomes == [False, False, False]
        records = [r for r in caplog.records if r.name.startswith("booking.payments")]
        assert len(records) == 1, [r.getMessage() for r in records]
        [record] = records
        assert record.levelno == logging.WARNING and record.exc_info is None
        assert "unreachable" in record.getMessage()
        assert sweeper.outage.in_outage

    async def test_a_sweep_that_fails_for_another_reason_is_logged_with_its_trace(
        self, payments_service, caplog
    ):
        sweeper = payments_service.sweeper

        async def broken(_now: datetime) -> None:
            raise RuntimeError("a bug in a sweep")

        assert not await sweeper.guarded(broken, now())
        [record] = [r for r in caplog.records if r.name == "booking.runtime.sweeping"]
        assert record.levelno == logging.ERROR and record.exc_info is not None
        assert await sweeper.guarded(sweeper.run_once, now())


class TestReplicas:
    async def test_two_sweepers_at_once_never_double_a_release_or_an_expiry(
        self, start_payments, sandbox, book, db, status_changes
    ):
        running = await start_payments(reconciliation_batch_size=2)
        paid, abandoned = [], []
        for i in range(8):
            event, ref = await book(running)
            if i % 2:
                await sandbox.complete(ref, webhook="none")
                paid.append(event)
            else:
                abandoned.append(event)
        before = await status_changes()
        first = running.sweeper
        await first.run_once()  # the paid ones complete; their holds are held
        for event in paid:
            await running.one("PaymentCompleted", event.order_id)
            await running.confirm(event)  # scheduled: released once over
        # A second replica: its own engine, Konnect client and sweeper on the same schema.
        settings = running.settings
        engine = create_engine(settings)
        konnect = KonnectClient.from_settings(settings)
        await konnect.open()
        second = Sweeper(
            PaymentService(
                db=Database(engine, SCHEMA),
                outbox=Outbox(messaging, producer="payments", exchange=settings.events_exchange),
                konnect=konnect,
                settings=settings,
            ),
            settings,
        )
        later = now() + timedelta(days=30)  # past every expiry and every release
        try:
            sweeps = await asyncio.gather(first.run_once(later), second.run_once(later))
        finally:
            await konnect.aclose()
            await engine.dispose()

        assert sum(s.released for s in sweeps) == len(paid)
        assert sum(s.checked for s in sweeps) == len(abandoned)
        changes = Counter((await status_changes())[len(before) :])
        assert changes == Counter(
            [("payments", e.order_id, "completed") for e in paid]
            + [("payments", e.order_id, "expired") for e in abandoned]
            + [("escrow_holds", e.order_id, "released") for e in paid]
        )
        for event in paid:
            await running.one("EscrowReleased", event.order_id)
        for event in abandoned:
            await running.one("PaymentFailed", event.order_id)
