"""open_payment: BookingRequested opens exactly one Konnect payment per order."""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta

from booking.runtime.testing import eventually


async def handled(db, count: int) -> bool:
    return await db.fetchval("SELECT count(*) FROM payments.inbox") >= count


class TestOpenPayment:
    async def test_a_booking_opens_a_payment_at_konnect(self, payments_service, sandbox, db):
        event = await payments_service.request_booking(amount=33_333)

        initiated = await payments_service.initiated(event.order_id)

        [at_konnect] = await sandbox.payments(event.order_id)
        assert initiated["payment_ref"] == at_konnect["id"]
        assert re.fullmatch(r"[0-9a-f]{24}", initiated["payment_ref"])
        assert initiated["pay_url"] == at_konnect["link"]
        assert at_konnect["amount"] == 33_333 and at_konnect["token"] == "TND"
        assert at_konnect["description"] == "Career chat"
        assert at_konnect["webhook"] == payments_service.webhook_url
        row = await db.fetchrow(
            "SELECT * FROM payments.payments WHERE order_id = $1", event.order_id
        )
        assert row["status"] == "pending" and row["payment_ref"] == initiated["payment_ref"]
        assert row["claimed_until"] is None
        # Our expiry is the lifespan from Konnect's answer: never before Konnect's own.
        konnect_expiry = datetime.fromisoformat(at_konnect["expirationDate"])
        assert row["expires_at"] >= konnect_expiry
        assert row["expires_at"] - konnect_expiry < timedelta(minutes=1)

    async def test_booking_requested_twice_opens_one_konnect_payment(
        self, payments_service, sandbox, db
    ):
        event = await payments_service.request_booking()
        await payments_service.request_booking(event, message_id=uuid.uuid4())
        await eventually(lambda: handled(db, 2), what="both deliveries handled")

        await payments_service.initiated(event.order_id)  # once, the spy settled

        assert len(await sandbox.payments(event.order_id)) == 1
        assert await db.fetchval("SELECT count(*) FROM payments.payments") == 1

    async def test_konnect_down_beyond_the_retries_fails_the_initiation(
        self, payments_service, sandbox, db
    ):
        await sandbox.fault("http_503", count=payments_service.settings.konnect_max_attempts)
        event = await payments_service.request_booking()

        failed = await payments_service.one("PaymentInitiationFailed", event.order_id)

        assert failed["reason"] == "konnect_unavailable" and "503" in failed["detail"]
        assert payments_service.published("PaymentInitiated", event.order_id) == []
        assert await sandbox.payments(event.order_id) == []
        status = await db.fetchval(
            "SELECT status FROM payments.payments WHERE order_id = $1", event.order_id
        )
        assert status == "initiation_failed"

    async def test_konnect_down_for_less_than_the_retries_still_opens_one_payment(
        self, payments_service, sandbox
    ):
        await sandbox.fault("http_503", count=2, endpoint="init")
        event = await payments_service.request_booking()

        await payments_service.initiated(event.order_id)

        assert len(await sandbox.payments(event.order_id)) == 1

    async def test_konnect_refusing_fails_the_initiation_with_its_reason(
        self, start_payments, sandbox, db
    ):
        running = await start_payments(konnect_wallet_id="")  # Konnect refuses a blank wallet
        event = await running.request_booking()

        failed = await running.one("PaymentInitiationFailed", event.order_id)

        assert failed["reason"] == "konnect_refused"
        assert "receiverWalletId" in failed["detail"]
        assert await sandbox.payments(event.order_id) == []


class TestRepair:
    async def test_an_initiation_interrupted_by_a_crash_is_initiated_again(
        self, payments_service, sandbox, db
    ):
        event = await payments_service.request_booking()
        await payments_service.initiated(event.order_id)
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
        sweeper = payments_service.sweeper

        still_leased = await sweeper.run_once()
        lapsed = await sweeper.run_once(datetime.now().astimezone() + timedelta(minutes=2))

        assert still_leased.initiated == 0 and lapsed.initiated == 1
        await payments_service.initiated(order_id)
        assert len(await sandbox.payments(order_id)) == 1
        assert len(await sandbox.payments(event.order_id)) == 1  # the first, untouched
