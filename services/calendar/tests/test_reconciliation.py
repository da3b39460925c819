"""The sweeper: a booking interrupted after Google answered still ends with exactly one event."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from booking.calendar.reconciliation import Sweeper
from booking.calendar.tables import SCHEMA
from booking.runtime.testing import eventually


def after_the_lease(calendar) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=calendar.settings.scheduling_lease_seconds + 5)


async def killed_after_google_answered(calendar) -> asyncio.Event:
    """The service dies once between Google's answer and the commit of the outcome."""
    service = calendar.service
    record = service._confirmed
    killed = asyncio.Event()

    async def die_once(row, confirmed):
        if not killed.is_set():
            killed.set()
            raise ConnectionResetError("killed after Google answered, before the commit")
        return await record(row, confirmed)

    service._confirmed = die_once
    return killed


class TestInterruptedBookings:
    async def test_a_run_killed_after_google_answered_ends_with_one_event(self, calendar, sandbox):
        mentor = await calendar.connected()
        killed = await killed_after_google_answered(calendar)
        paid = await calendar.pay(mentor)
        await eventually(killed.is_set, what="the run to die")
        assert len(await sandbox.events(mentor.email)) == 1
        booking = await calendar.booking(paid.session_id)
        assert booking["status"] == "pending" and booking["claimed_until"] is not None

        held = await calendar.sweeper.run_once()  # the lease still holds: not yet
        swept = await calendar.sweeper.run_once(after_the_lease(calendar))

        assert (held.scheduled, swept.scheduled) == (0, 1)
        confirmed = await calendar.confirmed(paid.session_id)
        [event] = await sandbox.events(mentor.email)
        assert confirmed["event_id"] == event["id"]
        assert confirmed["meet_link"] == event["hangoutLink"]
        assert (await calendar.booking(paid.session_id))["attempts"] == 2

    async def test_a_booking_nobody_claimed_is_scheduled(self, calendar, sandbox):
        mentor = await calendar.connected()
        paid = await calendar.pay(mentor)
        await calendar.confirmed(paid.session_id)
        # Stage a second booking whose fast path never ran (the replica died at the commit).
        session_id = uuid.uuid4()
        await calendar.db.execute(
            f"""
            INSERT INTO {SCHEMA}.calendar_bookings (session_id, order_id, mentor_id, mentee_email,
                title, start_at, end_at, event_id, status, correlation_id)
            SELECT $1, gen_random_uuid(), mentor_id, mentee_email, title, start_at, end_at,
                $2, 'pending', 'c-1'
            FROM {SCHEMA}.calendar_bookings WHERE session_id = $3
            """,
            session_id,
            session_id.hex,
            paid.session_id,
        )

        swept = await calendar.sweeper.run_once()

        assert swept.scheduled == 1
        await calendar.confirmed(session_id)
        assert len(await sandbox.events(mentor.email)) == 2

    async def test_two_sweepers_never_double_a_booking(self, calendar, sandbox):
        mentor = await calendar.connected()
        killed = await killed_after_google_answered(calendar)
        paid = await calendar.pay(mentor)
        await eventually(killed.is_set, what="the run to die")
        sweepers = [Sweeper(calendar.service, calendar.settings) for _ in range(3)]
        later = after_the_lease(calendar)

        sweeps = await asyncio.gather(*(s.run_once(later) for s in sweepers))

        assert sorted(s.scheduled for s in sweeps) == [0, 0, 1]
        await calendar.confirmed(paid.session_id)
        assert len(await sandbox.events(mentor.email)) == 1

    async def test_a_confirmed_or_failed_booking_is_left_alone(self, calendar, sandbox):
        mentor = await calendar.connected()
        paid = await calendar.pay(mentor)
        await calendar.confirmed(paid.session_id)
        lost = await calendar.pay(uuid.uuid4())
        await calendar.failed(lost.session_id)

        swept = await calendar.sweeper.run_once(after_the_lease(calendar))

        assert swept.scheduled == 0


class TestConsentStates:
    async def test_states_long_expired_are_pruned(self, calendar):
        mentor = await calendar.register_mentor()
        await calendar.consent_redirect(mentor)

        kept = await calendar.sweeper.run_once()
        pruned = await calendar.sweeper.run_once(datetime.now(UTC) + timedelta(days=2))

        assert (kept.states_pruned, pruned.states_pruned) == (0, 1)
