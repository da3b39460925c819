"""The orders schema's statements (`repository.py`), on the real Postgres: locks, writes back,
the constraints' refusals as the domain's errors, and the idempotency keys of bookings.

Each test opens the unit of work itself, as a use case or the consumer does.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from booking.contracts import MenteeContact
from booking.devtools.fixtures import eventually
from booking.orders.domain import (
    BookedSession,
    Escrow,
    EscrowStatus,
    Mentor,
    Order,
    PaymentStatus,
    SlotTaken,
    SubjectTaken,
)
from booking.orders.repository import (
    StoredOrder,
    add_booking,
    add_mentor,
    claim_key,
    find_order,
    lock_order,
    save_order,
    store_answer,
)


class TestLocking:
    async def test_a_handler_holds_the_order_and_its_session_locked_until_it_commits(
        self, orders
    ) -> None:
        booked = await orders.booked()
        order_id = uuid.UUID(booked.order_id)
        async with orders.runtime.db.transaction() as session:
            stored = await lock_order(session, order_id)
            assert stored is not None
            assert (str(stored.order.id), str(stored.booked.id)) == (
                booked.order_id,
                booked.session_id,
            )
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

    async def test_what_waited_for_the_lock_reads_the_session_as_the_holder_left_it(
        self, orders
    ) -> None:
        """Postgres reads again, after a wait, only the rows the statement locks: an escrow
        event applied after a payment failure must see the session the failure cancelled, or
        its order view (OrderChanged) shows the session as it was."""
        booked = await orders.booked()
        order_id = uuid.UUID(booked.order_id)
        holding, go_on = asyncio.Event(), asyncio.Event()

        async def fail_the_payment() -> None:
            async with orders.runtime.db.transaction() as session:
                stored = await lock_order(session, order_id)
                assert stored is not None
                stored.booked.cancel()
                await save_order(session, stored)
                holding.set()
                await go_on.wait()

        failing = asyncio.create_task(fail_the_payment())
        await holding.wait()
        async with orders.runtime.db.transaction() as session:
            waiting = asyncio.create_task(lock_order(session, order_id))
            await eventually(lambda: _waits_for_a_lock(orders), what="the second lock waiting")
            go_on.set()
            await failing
            stored = await waiting
        assert stored is not None
        assert stored.booked.status.value == "cancelled"


async def _waits_for_a_lock(orders) -> bool:
    waiting = await orders.scalar(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    return bool(waiting)


async def _lock_nothing(orders, order_id: uuid.UUID):
    async with orders.runtime.db.transaction() as session:
        return await lock_order(session, order_id)


class TestSavingAnOrder:
    async def test_what_the_domain_changed_is_written_back_with_the_order_s_own_columns(
        self, orders
    ) -> None:
        booked = await orders.booked()
        order_id = uuid.UUID(booked.order_id)
        async with orders.runtime.db.transaction() as session:
            stored = await lock_order(session, order_id)
            assert stored is not None
            stored.order.awaiting_payment("ref-1", "https://pay.example/ref-1", datetime.now(UTC))
            stored.payment_status = PaymentStatus.PENDING
            await save_order(session, stored)
        assert await orders.order_status(booked.order_id) == (
            "awaiting_payment",
            "pending_payment",
        )
        async with orders.runtime.db.single_statement() as session:
            found = await find_order(session, order_id)
        assert found is not None
        assert (found.order.payment_ref, found.order.pay_url, found.payment_status) == (
            "ref-1",
            "https://pay.example/ref-1",
            PaymentStatus.PENDING,
        )

    async def test_a_change_the_view_shows_bumps_the_version_in_the_same_write(
        self, orders
    ) -> None:
        booked = await orders.booked()
        order_id = uuid.UUID(booked.order_id)
        version = "SELECT version FROM orders.orders WHERE id = :id"
        assert await orders.scalar(version, id=order_id) == 1  # as booked
        changes = [
            lambda s: s.order.awaiting_payment("ref-1", "https://pay.example/1", datetime.now(UTC)),
            lambda s: setattr(s, "payment_status", PaymentStatus.PENDING),
            lambda s: s.escrow.observe(EscrowStatus.FROZEN, 1),  # the escrow alone
            lambda s: setattr(s.booked, "meet_link", "https://meet.example/x"),  # the session's
        ]
        for expected, change in enumerate(changes, start=2):
            async with orders.runtime.db.transaction() as session:
                stored = await lock_order(session, order_id)
                assert stored is not None
                change(stored)
                assert await save_order(session, stored) is True
                assert stored.version == expected
            assert await orders.scalar(version, id=order_id) == expected

    async def test_an_order_that_did_not_change_is_not_written(self, orders) -> None:
        booked = await orders.booked()
        versions = "SELECT xmin::text FROM orders.{} WHERE {} = :id"
        before = [
            await orders.scalar(versions.format("orders", "id"), id=booked.order_id),
            await orders.scalar(versions.format("booked_sessions", "order_id"), id=booked.order_id),
        ]
        async with orders.runtime.db.transaction() as session:
            stored = await lock_order(session, uuid.UUID(booked.order_id))
            assert stored is not None
            assert await save_order(session, stored) is False  # nothing to show: no new version
            assert stored.version == 1
        after = [
            await orders.scalar(versions.format("orders", "id"), id=booked.order_id),
            await orders.scalar(versions.format("booked_sessions", "order_id"), id=booked.order_id),
        ]
        assert after == before


class TestConstraints:
    async def test_a_session_overlapping_a_live_one_of_its_mentor_is_slot_taken(
        self, orders
    ) -> None:
        booked = await orders.booked()
        async with orders.runtime.db.single_statement() as session:
            first = await find_order(session, uuid.UUID(booked.order_id))
        assert first is not None
        now = datetime.now(UTC)
        order = Order(
            id=uuid.uuid4(),
            mentee_id="mentee-2",
            mentor_id=first.order.mentor_id,
            offering_id=first.order.offering_id,
            amount=first.order.amount,
            created_at=now,
            updated_at=now,
        )
        overlapping = BookedSession(
            id=uuid.uuid4(),
            order_id=order.id,
            mentor_id=order.mentor_id,
            start_at=first.booked.start_at,
            end_at=first.booked.end_at,
        )
        mentee = MenteeContact(
            first_name="Sami", last_name="Trabelsi", email="sami@example.com", phone=None
        )
        stored = StoredOrder(
            order=order,
            booked=overlapping,
            title="t",
            mentee_email=mentee.email,
            correlation_id=None,
            payment_status=None,
            platform_fee=None,
            escrow_amount=None,
            escrow=Escrow(),
            version=1,
        )
        with pytest.raises(SlotTaken):
            async with orders.runtime.db.transaction() as session:
                await add_booking(session, stored, mentee)
        # The transaction rolled back: not even the order is left.
        left = await orders.scalar("SELECT count(*) FROM orders.orders WHERE id = :id", id=order.id)
        assert left == 0

    async def test_a_subject_that_acts_as_another_mentor_is_subject_taken(self, orders) -> None:
        subject = f"idp|{uuid.uuid4().hex}"
        now = datetime.now(UTC)

        def mentor() -> Mentor:
            return Mentor(
                id=uuid.uuid4(),
                name="Amel",
                email="amel@example.com",
                timezone="Africa/Tunis",
                created_at=now,
                identity_subject=subject,
            )

        async with orders.runtime.db.transaction() as session:
            await add_mentor(session, mentor())
        with pytest.raises(SubjectTaken):
            async with orders.runtime.db.transaction() as session:
                await add_mentor(session, mentor())


class TestIdempotencyKeys:
    async def test_a_key_is_claimed_once_and_then_answers_what_its_first_request_stored(
        self, orders
    ) -> None:
        mentee, key, now = f"mentee-{uuid.uuid4().hex[:8]}", "key-1", datetime.now(UTC)
        async with orders.runtime.db.transaction() as session:
            assert await claim_key(session, mentee, key, "fingerprint", now) is None
            await store_answer(session, mentee, key, 202, {"status": "pending"})
        async with orders.runtime.db.transaction() as session:
            first = await claim_key(session, mentee, key, "another", now)
        assert first is not None
        assert (first.fingerprint, first.response_status, first.response_body) == (
            "fingerprint",
            202,
            {"status": "pending"},
        )
        # Keys are the mentee's own: another mentee's same key is free.
        async with orders.runtime.db.transaction() as session:
            assert await claim_key(session, f"{mentee}-2", key, "fingerprint", now) is None
