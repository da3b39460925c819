"""The repository: what it stores of a payment and a hold comes back as it was, one payment per
order. Each test runs in a transaction rolled back at its end, so the rows it stores are never
seen by another test (nor by a sweeper)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from booking.payments import repository as repo
from booking.payments.domain import EscrowHold, FreezeKind, MoneyReceived, Payment, PaymentState
from booking.payments.settings import PaymentsSettings
from booking.payments.tables import SCHEMA
from booking.runtime.db import Database, create_engine

NOW = datetime(2030, 1, 6, 9, 0, tzinfo=UTC)


@pytest.fixture
async def session(migrated: str) -> AsyncIterator[AsyncSession]:
    engine = create_engine(PaymentsSettings(database_url=migrated), pool_size=1)
    try:
        async with Database(engine, SCHEMA).sessions() as session:
            await session.begin()
            try:
                yield session
            finally:
                await session.rollback()
    finally:
        await engine.dispose()


def opened(order_id: uuid.UUID | None = None) -> Payment:
    return Payment.opened(
        id=uuid.uuid4(), order_id=order_id or uuid.uuid4(), amount=120_000, currency="TND", now=NOW
    )


BOOKING = repo.Booking(
    session_id=uuid.uuid4(),
    mentor_id=uuid.uuid4(),
    session_end_at=NOW + timedelta(days=2),
    title="Career chat",
    mentee_first_name="Amira",
    mentee_last_name="Ben Salah",
    mentee_email="amira@example.com",
    mentee_phone=None,
    correlation_id="c-1",
)


class TestPayments:
    async def test_a_stored_payment_comes_back_as_it_was_with_its_booking(self, session):
        payment = opened()
        assert (await repo.add_payment_unless_ended(session, payment, BOOKING)).stored

        stored = await repo.locked_payment(session, payment.id)

        assert stored == repo.StoredPayment(payment=payment, booking=BOOKING)

    async def test_an_order_has_one_payment_however_often_it_is_opened(self, session):
        first = opened()
        assert (await repo.add_payment_unless_ended(session, first, BOOKING)).stored

        again = await repo.add_payment_unless_ended(session, opened(first.order_id), BOOKING)
        assert again == repo.Opening(stored=False, ending=None)

        stored = await repo.locked_payment_of_order(session, first.order_id)
        assert stored is not None and stored.payment.id == first.id

    async def test_what_the_domain_changes_is_saved_and_found_by_its_ref(self, session):
        payment = opened()
        await repo.add_payment_unless_ended(session, payment, BOOKING)
        payment.initiated("a" * 24, "https://pay.example/a", NOW + timedelta(minutes=30), NOW)

        await repo.save_payment(session, payment, lease_ended=True)

        assert (await repo.locked_payment(session, payment.id)).payment == payment
        assert await repo.payment_of_ref(session, "a" * 24) == repo.PaymentOfRef(
            id=payment.id, order_id=payment.order_id, status=PaymentState.PENDING
        )
        assert await repo.payment_of_ref(session, "b" * 24) is None

    async def test_the_bookings_trace_is_kept_for_the_webhook_and_every_later_step(self, session):
        traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        booking = replace(BOOKING, traceparent=traceparent)
        payment = opened()
        await repo.add_payment_unless_ended(session, payment, booking)
        payment.initiated("c" * 24, "https://pay.example/c", NOW + timedelta(minutes=30), NOW)
        await repo.save_payment(session, payment, lease_ended=True)

        found = await repo.payment_of_ref(session, "c" * 24)
        stored = await repo.locked_payment(session, payment.id)

        assert found is not None and found.traceparent == traceparent
        assert stored.booking == booking

    async def test_a_lease_and_a_check_stay_until_a_save_says_otherwise(self, session):
        payment = opened()
        await repo.add_payment_unless_ended(session, payment, BOOKING)
        assert await repo.claim_initiation(session, payment.id, NOW, NOW + timedelta(minutes=1))
        await repo.mark_checked(session, payment.id, NOW)

        await repo.save_payment(session, payment)
        assert await lease_and_check(session, payment.id) == (NOW + timedelta(minutes=1), NOW)

        later = NOW + timedelta(minutes=5)
        await repo.save_payment(session, payment, lease_ended=True, checked_at=later)
        assert await lease_and_check(session, payment.id) == (None, later)


async def lease_and_check(session: AsyncSession, payment_id: uuid.UUID) -> tuple[object, ...]:
    row = (
        await session.execute(
            text("SELECT claimed_until, last_checked_at FROM payments.payments WHERE id = :id"),
            {"id": payment_id},
        )
    ).one()
    return tuple(row)


class TestOrderEndings:
    async def test_an_order_that_ended_gets_no_payment_and_its_ending_comes_back(self, session):
        ending = repo.OrderEnding(
            order_id=uuid.uuid4(), reason="cancelled", by="admin-1", ended_at=NOW
        )
        assert await repo.record_ending(session, ending)
        assert not await repo.record_ending(session, replace(ending, reason="again"))

        opening = await repo.add_payment_unless_ended(session, opened(ending.order_id), BOOKING)

        assert opening == repo.Opening(stored=False, ending=ending)
        assert await repo.locked_payment_of_order(session, ending.order_id) is None

    async def test_a_locked_payment_comes_with_its_orders_ending_if_it_ended(self, session):
        payment = opened()
        await repo.add_payment_unless_ended(session, payment, BOOKING)
        stored = repo.StoredPayment(payment=payment, booking=BOOKING)
        assert await repo.locked_payment_and_ending(session, payment.id) == (stored, None)

        ending = repo.OrderEnding(order_id=payment.order_id, reason="gone", by=None, ended_at=NOW)
        await repo.record_ending(session, ending)

        assert await repo.locked_payment_and_ending(session, payment.id) == (stored, ending)


class TestEscrowHolds:
    async def test_a_stored_hold_comes_back_as_it_was_with_its_payment(self, session):
        payment = opened()
        await repo.add_payment_unless_ended(session, payment, BOOKING)
        money = MoneyReceived(
            amount=120_000,
            amount_paid=130_000,
            platform_fee=19_500,
            escrow_amount=110_500,
            currency="TND",
            paid_at=NOW,
            previous_state=PaymentState.PENDING,
        )
        hold = EscrowHold.held_for(
            money, id=uuid.uuid4(), order_id=payment.order_id, mentor_id=BOOKING.mentor_id, now=NOW
        )
        hold.freeze(FreezeKind.OVERPAID, "overpaid", None, NOW)

        await repo.add_hold(session, hold, payment.id)

        assert await repo.hold_of_order(session, payment.order_id) == repo.StoredHold(
            hold=hold,
            payment_id=payment.id,
            session_id=BOOKING.session_id,
            correlation_id=BOOKING.correlation_id,
        )
