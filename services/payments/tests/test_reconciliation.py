"""The sweeper: lost webhooks, abandoned payments, escrow release; replicas never double it."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta

from booking.payments.konnect import KonnectClient
from booking.payments.reconciliation import Sweeper
from booking.payments.service import PaymentService
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
    async def test_escrow_is_released_only_once_the_session_ended_plus_the_delay(
        self, start_payments, sandbox, book, db
    ):
        running = await start_payments(escrow_release_delay_minutes=30)
        event, ref = await book(running, amount=33_333)
        await sandbox.complete(ref)
        await running.one("PaymentCompleted", event.order_id)
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
        }
        hold = await db.fetchrow(
            "SELECT * FROM payments.escrow_holds WHERE order_id = $1", event.order_id
        )
        assert (hold["status"], hold["released_at"]) == ("released", due)

    async def test_a_frozen_hold_is_never_released(self, payments_service, sandbox, book, db):
        event, ref = await book(payments_service, amount=120_000)
        await sandbox.complete(ref, amount=1_000, webhook="none")
        await sandbox.expire(ref)
        await payments_service.sweeper.run_once()
        await payments_service.one("PaymentCompleted", event.order_id)

        sweep = await payments_service.sweeper.run_once(now() + timedelta(days=365))

        assert sweep.released == 0
        status = await db.fetchval(
            "SELECT status FROM payments.escrow_holds WHERE order_id = $1", event.order_id
        )
        assert status == "frozen"


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
