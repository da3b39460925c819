"""The subscribers: BookingRequested opens exactly one Konnect payment per order; orders' events
(OrderCancelled, OrderConfirmed, SchedulingAbandoned) move the escrow with the session.

On FastStream's test broker (the `payments` fixture): events go in through the consumer as their
queue would hand them over, and what the service emits is read from its outbox. None of these
is about the broker; the delivery guarantees (retries, dead letters, the relay) are tested in
libs/runtime on the real RabbitMQ."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta

from booking.contracts import OrderCancelled
from booking.devtools.fixtures import eventually
from booking.payments.domain import KonnectVerdict, PaymentState


async def handled(db, count: int) -> bool:
    return await db.fetchval("SELECT count(*) FROM payments.inbox") >= count


class TestOpenPayment:
    async def test_a_booking_opens_a_payment_at_konnect(self, payments, sandbox, db):
        event = await payments.request_booking(amount=33_333)

        initiated = await payments.initiated(event.order_id)

        [at_konnect] = await sandbox.payments(event.order_id)
        assert initiated["payment_ref"] == at_konnect["id"]
        assert re.fullmatch(r"[0-9a-f]{24}", initiated["payment_ref"])
        assert initiated["pay_url"] == at_konnect["link"]
        assert at_konnect["amount"] == 33_333 and at_konnect["token"] == "TND"
        assert at_konnect["description"] == "Career chat"
        assert at_konnect["webhook"] == payments.webhook_url
        row = await db.fetchrow(
            "SELECT * FROM payments.payments WHERE order_id = $1", event.order_id
        )
        assert row["status"] == "pending" and row["payment_ref"] == initiated["payment_ref"]
        assert row["claimed_until"] is None
        # Our expiry is the lifespan from Konnect's answer: never before Konnect's own.
        konnect_expiry = datetime.fromisoformat(at_konnect["expirationDate"])
        assert row["expires_at"] >= konnect_expiry
        assert row["expires_at"] - konnect_expiry < timedelta(minutes=1)

    async def test_booking_requested_twice_opens_one_konnect_payment(self, payments, sandbox, db):
        event = await payments.request_booking()
        await payments.request_booking(event, message_id=uuid.uuid4())
        await eventually(lambda: handled(db, 2), what="both deliveries handled")

        await payments.initiated(event.order_id)  # recorded once

        assert len(await sandbox.payments(event.order_id)) == 1
        assert await db.fetchval("SELECT count(*) FROM payments.payments") == 1

    async def test_konnect_down_beyond_the_retries_fails_the_initiation(
        self, payments, sandbox, db
    ):
        await sandbox.fault("http_503", count=payments.settings.konnect_max_attempts)
        event = await payments.request_booking()

        failed = await payments.one("PaymentInitiationFailed", event.order_id)

        assert failed["reason"] == "konnect_unavailable" and "503" in failed["detail"]
        assert await payments.recorded("PaymentInitiated", event.order_id) == []
        assert await sandbox.payments(event.order_id) == []
        status = await db.fetchval(
            "SELECT status FROM payments.payments WHERE order_id = $1", event.order_id
        )
        assert status == "initiation_failed"

    async def test_konnect_down_for_less_than_the_retries_still_opens_one_payment(
        self, payments, sandbox
    ):
        await sandbox.fault("http_503", count=2, endpoint="init")
        event = await payments.request_booking()

        await payments.initiated(event.order_id)

        assert len(await sandbox.payments(event.order_id)) == 1

    async def test_konnect_refusing_fails_the_initiation_with_its_reason(
        self, start_in_process, sandbox, db
    ):
        running = await start_in_process(konnect_wallet_id="")  # Konnect refuses a blank wallet
        event = await running.request_booking()

        failed = await running.one("PaymentInitiationFailed", event.order_id)

        assert failed["reason"] == "konnect_refused"
        assert "receiverWalletId" in failed["detail"]
        assert await sandbox.payments(event.order_id) == []


class TestRepair:
    async def test_an_initiation_interrupted_by_a_crash_is_initiated_again(
        self, payments, sandbox, db
    ):
        event = await payments.request_booking()
        await payments.initiated(event.order_id)
        # Stage a replica that claimed a second order, then died before Konnect answered.
        order_id = uuid.uuid4()
        await db.execute(
            """
            INSERT INTO payments.payments (id, order_id, session_id, mentor_id, session_end_at,
                amount, currency, title, mentee_first_name, mentee_last_name, mentee_email,
                correlation_id, status, claimed_until)
            SELECT $1, $2, session_id, mentor_id, session_end_at, amount, currency, title,
                mentee_first_name, mentee_last_name, mentee_email, 'c-1', 'initiating',
                now() + interval '1 minute'
            FROM payments.payments WHERE order_id = $3
            """,
            uuid.uuid4(),
            order_id,
            event.order_id,
        )
        sweeper = payments.sweeper

        still_leased = await sweeper.run_once()
        lapsed = await sweeper.run_once(datetime.now().astimezone() + timedelta(minutes=2))

        assert still_leased.initiated == 0 and lapsed.initiated == 1
        await payments.initiated(order_id)
        assert len(await sandbox.payments(order_id)) == 1
        assert len(await sandbox.payments(event.order_id)) == 1  # the first, untouched


class TestOrderEndings:
    async def test_an_order_cancelled_before_its_booking_request_opens_no_payment(
        self, payments, sandbox, db
    ):
        booking = payments.new_booking()
        await payments.cancel(booking, by=None, reason="payment_never_opened")

        await payments.handled(await payments.publish(booking))

        assert await payments.payment_status(booking.order_id) is None
        assert await sandbox.payments(booking.order_id) == []
        ending = await db.fetchrow(
            "SELECT * FROM payments.order_endings WHERE order_id = $1", booking.order_id
        )
        assert (ending["reason"], ending["by"]) == ("payment_never_opened", None)
        assert await payments.recorded("PaymentInitiated", booking.order_id) == []
        assert await payments.recorded("PaymentInitiationFailed", booking.order_id) == []

    async def test_an_order_cancelled_while_its_payment_opens_ends_it_quietly(
        self, payments, sandbox, db, caplog
    ):
        # Konnect's first two answers hang past the client's timeout (seconds): the init is in
        # flight while the cancel comes; the payment Konnect opens in the end (the third try)
        # is an orphan nobody sees.
        attempts = payments.settings.konnect_max_attempts
        await sandbox.fault("timeout", count=attempts - 1, endpoint="init")
        booking = await payments.request_booking()
        await eventually(lambda: payments.payment_status(booking.order_id), what="payment opened")

        await payments.cancel(booking)

        assert await payments.payment_status(booking.order_id) == "initiation_failed"
        await eventually(lambda: sandbox.payments(booking.order_id), what="Konnect's answer")
        # The in-flight initiation came back, found the payment ended, and left it.
        await eventually(lambda: "an orphan nobody will see" in caplog.text, what="the orphan")
        await payments.sweeper.run_once()  # nothing left to repair
        assert await payments.recorded("PaymentInitiated", booking.order_id) == []
        assert await payments.recorded("PaymentInitiationFailed", booking.order_id) == []
        row = await db.fetchrow(
            "SELECT * FROM payments.payments WHERE order_id = $1", booking.order_id
        )
        assert (row["status"], row["payment_ref"], row["claimed_until"]) == (
            "initiation_failed",
            None,
            None,
        )

    async def test_a_staged_initiating_payment_ends_without_initiation_failed(self, payments, db):
        booking = payments.new_booking()
        await db.execute(
            """
            INSERT INTO payments.payments (id, order_id, session_id, mentor_id, session_end_at,
                amount, currency, title, mentee_first_name, mentee_last_name, mentee_email,
                correlation_id, status, claimed_until)
            VALUES ($1, $2, $3, $4, $5, 1000, 'TND', 't', 'A', 'B', 'a@example.com', 'c-2',
                'initiating', now() + interval '1 minute')
            """,
            uuid.uuid4(),
            booking.order_id,
            booking.session_id,
            booking.mentor_id,
            booking.end_at,
        )

        await payments.cancel(booking)

        assert await payments.payment_status(booking.order_id) == "initiation_failed"
        sweep = await payments.sweeper.run_once(datetime.now(UTC) + timedelta(hours=1))
        assert sweep.initiated == 0
        assert await payments.recorded("PaymentInitiationFailed") == []

    async def test_an_open_payment_stays_open_and_money_that_comes_is_owed_back(
        self, payments, sandbox, book
    ):
        booking, ref = await book(payments, amount=120_000)
        await payments.cancel(booking)
        assert await payments.payment_status(booking.order_id) == "pending"

        await sandbox.complete(ref)

        owed = await payments.one("EscrowRefundDue", booking.order_id)
        assert (owed["refund_amount"], owed["sequence"]) == (120_000, 1)
        assert "had ended (ill)" in owed["reason"]
        anomaly = await payments.one("PaymentAnomalyDetected", booking.order_id)
        assert anomaly["kind"] == "payment_for_cancelled_order"
        assert anomaly["detail"].startswith("Critical")
        assert await payments.recorded("PaymentCompleted", booking.order_id) == []
        assert (await payments.escrow(booking.order_id))["status"] == "refund_due"

    async def test_short_money_for_a_cancelled_order_is_owed_back_when_the_payment_expires(
        self, payments, sandbox, book
    ):
        booking, ref = await book(payments, amount=120_000)
        await payments.cancel(booking)
        await sandbox.complete(ref, amount=20_000)
        await eventually(
            lambda: payments.recorded("PaymentAnomalyDetected", booking.order_id),
            what="the anomaly",
        )
        assert await payments.payment_status(booking.order_id) == "underpaid"
        assert await payments.escrow(booking.order_id) is None

        await sandbox.expire(ref)
        await payments.webhook(ref)

        owed = await payments.one("EscrowRefundDue", booking.order_id)
        assert owed["refund_amount"] == 20_000
        await payments.one("PaymentFailed", booking.order_id)
        kinds = [
            a["kind"] for a in await payments.recorded("PaymentAnomalyDetected", booking.order_id)
        ]
        assert kinds == ["payment_for_cancelled_order", "payment_for_cancelled_order"]
        assert await payments.recorded("PaymentCompleted", booking.order_id) == []

    async def test_cancelling_a_paid_order_freezes_its_escrow_once(self, payments, sandbox, pay):
        booking = await pay(payments, sandbox)

        await payments.cancel(booking, by="admin-3", reason="mentor left")
        await payments.cancel(booking, by="admin-3", reason="mentor left")  # redelivered

        frozen = await payments.one("EscrowFrozen", booking.order_id)
        assert (frozen["sequence"], frozen["by"], frozen["escrow_amount"]) == (
            2,
            "admin-3",
            102_000,
        )
        assert frozen["reason"] == "the order was cancelled: mentor left"
        hold = await payments.escrow(booking.order_id)
        assert (hold["status"], hold["frozen_reason"], hold["decided_by"]) == (
            "frozen",
            "order_cancelled",
            "admin-3",
        )

    async def test_cancelling_an_order_whose_escrow_was_released_leaves_it(
        self, payments, sandbox, pay
    ):
        booking = await pay(payments, sandbox)
        await payments.confirm(booking)
        await payments.sweeper.run_once(booking.end_at + timedelta(days=2))
        await payments.one("EscrowReleased", booking.order_id)

        await payments.cancel(booking)

        hold = await payments.escrow(booking.order_id)
        assert (hold["status"], hold["sequence"]) == ("released", 2)
        assert await payments.recorded("EscrowFrozen", booking.order_id) == []


class TestTheSessionsFate:
    async def test_order_confirmed_makes_the_release_due_after_the_session(
        self, payments, sandbox, pay
    ):
        booking = await pay(payments, sandbox)

        await payments.confirm(booking)

        hold = await payments.escrow(booking.order_id)
        delay = timedelta(minutes=payments.settings.escrow_release_delay_minutes)
        assert (hold["status"], hold["sequence"]) == ("held", 1)
        assert hold["release_due_at"] == booking.end_at + delay

    async def test_abandoned_scheduling_freezes_the_escrow(self, payments, sandbox, pay):
        booking = await pay(payments, sandbox)
        await payments.confirm(booking)

        await payments.abandon_scheduling(booking)

        frozen = await payments.one("EscrowFrozen", booking.order_id)
        assert (frozen["sequence"], frozen["by"]) == (2, None)
        assert "calendar_api_error" in frozen["reason"]
        hold = await payments.escrow(booking.order_id)
        assert (hold["status"], hold["frozen_reason"], hold["release_due_at"]) == (
            "frozen",
            "scheduling_abandoned",
            None,
        )

    async def test_a_session_scheduled_after_all_unfreezes_its_escrow(self, payments, sandbox, pay):
        booking = await pay(payments, sandbox)
        await payments.abandon_scheduling(booking)

        await payments.confirm(booking)  # an admin's retry of the scheduling worked

        unfrozen = await payments.one("EscrowUnfrozen", booking.order_id)
        delay = timedelta(minutes=payments.settings.escrow_release_delay_minutes)
        assert unfrozen["sequence"] == 3
        assert datetime.fromisoformat(unfrozen["release_due_at"]) == booking.end_at + delay
        hold = await payments.escrow(booking.order_id)
        assert (hold["status"], hold["frozen_reason"]) == ("held", None)

    async def test_a_cancelled_orders_escrow_is_not_unfrozen_by_a_late_confirmation(
        self, payments, sandbox, pay
    ):
        booking = await pay(payments, sandbox)
        await payments.abandon_scheduling(booking)
        await payments.cancel(booking)

        await payments.confirm(booking)

        hold = await payments.escrow(booking.order_id)
        assert (hold["status"], hold["frozen_reason"], hold["sequence"]) == (
            "frozen",
            "order_cancelled",
            3,
        )
        assert await payments.recorded("EscrowUnfrozen", booking.order_id) == []

    async def test_events_for_an_order_without_escrow_are_handled_without_error(
        self, payments, book
    ):
        booking, _ = await book(payments)  # opened, never paid

        await payments.confirm(booking)
        await payments.abandon_scheduling(booking)

        assert await payments.escrow(booking.order_id) is None
        assert await payments.payment_status(booking.order_id) == "pending"


async def waiting_on_the_order(db, order_id: uuid.UUID) -> bool:
    """A transaction of this database waits for the order's lock (its advisory lock)."""
    query = """
        SELECT count(*) FROM pg_locks
        WHERE locktype = 'advisory' AND NOT granted
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND ((classid::bigint << 32) | objid::bigint) = hashtext($1)::bigint
    """
    return await db.fetchval(query, f"payments:order:{order_id}") > 0


class TestTheOrdersLock:
    """Whichever of two changes to one order commits second sees the first."""

    async def test_an_ending_waits_for_an_opening_and_ends_the_payment(self, payments, db):
        service = payments.service
        booking = payments.new_booking()
        cancel = OrderCancelled(
            order_id=booking.order_id,
            session_id=booking.session_id,
            mentor_id=booking.mentor_id,
            reason="changed my mind",
            by="admin-1",
        )

        async def end_it() -> None:
            async with service.db.transaction() as session:
                await service.end_order(session, cancel)

        async with service.db.transaction() as session:
            payment_id = await service.open_payment(session, booking, "c-1")
            ending = asyncio.create_task(end_it())
            await eventually(
                lambda: waiting_on_the_order(db, booking.order_id), what="the ending waiting"
            )
        await ending

        assert payment_id is not None
        assert await payments.payment_status(booking.order_id) == "initiation_failed"

    async def test_an_opening_waits_for_an_ending_and_opens_nothing(self, payments, db):
        service = payments.service
        booking = payments.new_booking()
        cancel = OrderCancelled(
            order_id=booking.order_id,
            session_id=booking.session_id,
            mentor_id=booking.mentor_id,
            reason="payment_never_opened",
        )

        async def open_it() -> uuid.UUID | None:
            async with service.db.transaction() as session:
                return await service.open_payment(session, booking, "c-1")

        async with service.db.transaction() as session:
            await service.end_order(session, cancel)
            opening = asyncio.create_task(open_it())
            await eventually(
                lambda: waiting_on_the_order(db, booking.order_id), what="the opening waiting"
            )

        assert await opening is None
        assert await payments.payment_status(booking.order_id) is None

    async def test_money_that_waits_for_an_ending_is_owed_back_never_held(
        self, payments, sandbox, book, db
    ):
        service = payments.service
        booking, ref = await book(payments)
        await sandbox.complete(ref, webhook="none")
        payment_id = await db.fetchval(
            "SELECT id FROM payments.payments WHERE order_id = $1", booking.order_id
        )
        cancel = OrderCancelled(
            order_id=booking.order_id,
            session_id=booking.session_id,
            mentor_id=booking.mentor_id,
            reason="mentor left",
            by="admin-1",
        )
        paid_in_full = KonnectVerdict(
            state=PaymentState.COMPLETED, amount_paid=booking.amount, currency="TND"
        )

        async with service.db.transaction() as session:
            await service.end_order(session, cancel)
            money = asyncio.create_task(
                service.apply_verdict(payment_id, booking.order_id, paid_in_full, datetime.now(UTC))
            )
            await eventually(
                lambda: waiting_on_the_order(db, booking.order_id), what="the money waiting"
            )
        await money

        hold = await payments.escrow(booking.order_id)
        assert (hold["status"], hold["refund_amount"]) == ("refund_due", booking.amount)
        await payments.one("EscrowRefundDue", booking.order_id)
        assert await payments.recorded("PaymentCompleted", booking.order_id) == []
