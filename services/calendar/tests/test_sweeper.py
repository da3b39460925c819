"""The sweeper: a booking interrupted after Google answered still ends with exactly one event;
failed bookings are tried again on the retry schedule, then final; a booking waiting for a
reconnect is final once its session begins; a cancelled booking's event is deleted once no run
holds it; an unreachable database skips a sweep quietly."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime, timedelta

from booking.calendar.sweeper import Sweep, Sweeper
from booking.calendar.tables import SCHEMA
from booking.devtools.fixtures import eventually, url_via


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
        # The lost run cost nothing: the only attempt counted is the one that confirmed.
        assert (await calendar.booking(paid.session_id))["attempts"] == 1
        assert [a["outcome"] for a in await calendar.attempts(paid.session_id)] == ["confirmed"]

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

    async def test_a_confirmed_booking_or_one_waiting_for_a_reconnect_is_left_alone(
        self, calendar, sandbox
    ):
        mentor = await calendar.connected()
        paid = await calendar.pay(mentor)
        await calendar.confirmed(paid.session_id)
        unconnected = await calendar.register_mentor()
        waiting = await calendar.pay(unconnected)
        await calendar.failed(waiting.session_id)

        swept = await calendar.sweeper.run_once(after_the_lease(calendar))

        assert swept == Sweep()
        assert (await calendar.booking(waiting.session_id))["status"] == "failed"


class TestConsentStates:
    async def test_states_long_expired_are_pruned(self, calendar):
        mentor = await calendar.register_mentor()
        await calendar.consent_redirect(mentor)

        kept = await calendar.sweeper.run_once()
        pruned = await calendar.sweeper.run_once(datetime.now(UTC) + timedelta(days=2))

        assert (kept.states_pruned, pruned.states_pruned) == (0, 1)


def far_ahead(hours: float = 2) -> datetime:
    """Past every next attempt the schedule can set (its longest delay is an hour), and before
    the sessions of the tests begin (in three days)."""
    return datetime.now(UTC) + timedelta(hours=hours)


DELAYS = [timedelta(minutes=m) for m in (1, 5, 15, 60)]


class TestRetrySchedule:
    async def test_a_calendar_api_error_is_tried_on_the_schedule_then_final(
        self, calendar, sandbox
    ):
        mentor = await calendar.connected()
        runs = len(DELAYS) + 1
        await sandbox.fault(
            "http_503", count=runs * calendar.settings.google_max_attempts, endpoint="insert"
        )
        paid = await calendar.pay(mentor)
        await calendar.failed_times(paid.session_id, 1)

        sweeps = []
        for attempt in range(2, runs + 1):
            sweeps.append(await calendar.sweeper.run_once(far_ahead()))
            await calendar.failed_times(paid.session_id, attempt)
        after = await calendar.sweeper.run_once(far_ahead())

        assert [sweep.retried for sweep in sweeps] == [1] * len(DELAYS)
        assert after.retried == 0  # final: nothing runs it again
        await calendar.spy.settle()
        failures = calendar.failures(paid.session_id)
        assert [f["attempts"] for f in failures] == [1, 2, 3, 4, 5]
        assert [f["final"] for f in failures] == [False] * len(DELAYS) + [True]
        assert failures[-1]["next_attempt_at"] is None
        assert {f["reason"] for f in failures} == {"calendar_api_error"}
        attempts = await calendar.attempts(paid.session_id)
        assert [a["next_attempt_at"] - a["at"] for a in attempts[:-1]] == DELAYS
        assert [a["outcome"] for a in attempts] == ["failed"] * runs
        booking = await calendar.booking(paid.session_id)
        assert (booking["status"], booking["final"], booking["attempts"]) == ("failed", True, 5)
        assert booking["next_attempt_at"] is None
        assert await sandbox.events(mentor.email) == []

    async def test_a_retry_that_succeeds_confirms_the_booking(self, calendar, sandbox):
        mentor = await calendar.connected()
        await sandbox.fault(
            "http_500", count=2 * calendar.settings.google_max_attempts, endpoint="insert"
        )
        paid = await calendar.pay(mentor)
        await calendar.failed_times(paid.session_id, 1)
        await calendar.sweeper.run_once(far_ahead())
        await calendar.failed_times(paid.session_id, 2)

        swept = await calendar.sweeper.run_once(far_ahead())

        assert swept.retried == 1
        confirmed = await calendar.confirmed(paid.session_id)
        [event] = await sandbox.events(mentor.email)
        assert confirmed["event_id"] == event["id"] and event["status"] == "confirmed"
        assert [f["final"] for f in calendar.failures(paid.session_id)] == [False, False]
        attempts = await calendar.attempts(paid.session_id)
        assert [a["outcome"] for a in attempts] == ["failed", "failed", "confirmed"]
        booking = await calendar.booking(paid.session_id)
        assert (booking["status"], booking["attempts"], booking["reason"]) == (
            "confirmed",
            3,
            None,
        )

    async def test_a_failed_booking_waits_until_its_next_attempt_is_due(self, calendar, sandbox):
        mentor = await calendar.connected()
        await sandbox.fault("quota_403", count=1, endpoint="insert")
        paid = await calendar.pay(mentor)
        await calendar.failed(paid.session_id)
        due = (await calendar.booking(paid.session_id))["next_attempt_at"]

        early = await calendar.sweeper.run_once(due - timedelta(seconds=1))
        on_time = await calendar.sweeper.run_once(due)

        assert (early.retried, on_time.retried) == (0, 1)
        await calendar.confirmed(paid.session_id)

    async def test_store_not_found_is_scheduled_once_the_mentor_is_known(self, calendar, sandbox):
        mentor_id = uuid.uuid4()
        paid = await calendar.pay(mentor_id)  # before MentorRegistered reached us
        assert (await calendar.failed(paid.session_id))["reason"] == "store_not_found"
        mentor = await calendar.register_mentor(mentor_id=mentor_id)
        await calendar.connect(mentor)
        await calendar.service.settle()
        assert (await calendar.booking(paid.session_id))["status"] == "failed"  # not a reconnect's

        swept = await calendar.sweeper.run_once(far_ahead())

        assert swept.retried == 1
        await calendar.confirmed(paid.session_id)
        assert len(await sandbox.events(mentor.email)) == 1

    async def test_meet_data_pending_too_long_fails_on_the_schedule(
        self, start_calendar, make_pending_meet_sandbox
    ):
        google = await make_pending_meet_sandbox(reads=50)
        calendar = await start_calendar(google, google_meet_poll_attempts=0)
        mentor = await calendar.connected()
        paid = await calendar.pay(mentor)
        bound = calendar.settings.scheduling_max_attempts

        async def attempts() -> int:
            return len(await calendar.attempts(paid.session_id))

        await eventually(lambda: _equals(attempts, 1), what="the first run put off")
        for run in range(2, bound + 1):
            later = datetime.now(UTC) + timedelta(
                seconds=calendar.settings.meet_pending_retry_seconds + 5
            )
            await calendar.sweeper.run_once(later)
            await eventually(lambda run=run: _at_least(attempts, run), what=f"run {run}")

        [failed, *_] = await calendar.failed_times(paid.session_id, 1)
        assert failed["reason"] == "calendar_api_error" and "no Meet link" in failed["detail"]
        assert failed["attempts"] == bound
        # A failure on the retry schedule like any other (this test's clock, ahead, may have
        # run its next attempt already).
        assert failed["final"] is False and failed["next_attempt_at"] is not None
        outcomes = [a["outcome"] for a in await calendar.attempts(paid.session_id)]
        assert outcomes[:bound] == ["meet_pending"] * (bound - 1) + ["failed"]
        assert len(await google.events(mentor.email)) == 1


async def _at_least(probe, expected) -> bool:
    return await probe() >= expected


async def _equals(probe, expected) -> bool:
    return await probe() == expected


class TestGivingUp:
    async def test_a_booking_waiting_for_a_reconnect_is_final_once_its_session_begins(
        self, calendar, sandbox
    ):
        mentor = await calendar.register_mentor()
        start = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
        paid = await calendar.pay(mentor, start_at=start, end_at=start + timedelta(hours=1))
        await calendar.failed(paid.session_id)

        before = await calendar.sweeper.run_once(start - timedelta(seconds=1))
        begun = await calendar.sweeper.run_once(start)
        again = await calendar.sweeper.run_once(start + timedelta(minutes=5))

        assert (before.given_up, begun.given_up, again.given_up) == (0, 1, 0)
        await calendar.failed_times(paid.session_id, 2)
        await calendar.spy.settle()
        first, final = calendar.failures(paid.session_id)
        assert (first["final"], final["final"]) == (False, True)
        assert final["reason"] == "mentor_not_integrated" and final["attempts"] == 1
        assert "given up" in final["detail"] and final["next_attempt_at"] is None
        booking = await calendar.booking(paid.session_id)
        assert (booking["status"], booking["final"]) == ("failed", True)

        # A reconnect now is too late for it: only an admin may try it again.
        await calendar.connect(mentor)
        await calendar.service.settle()
        assert (await calendar.booking(paid.session_id))["status"] == "failed"
        assert await sandbox.events(mentor.email) == []

    async def test_a_paid_session_that_has_begun_fails_final_at_once(self, calendar):
        mentor = await calendar.register_mentor()
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)

        paid = await calendar.pay(mentor, start_at=start, end_at=start + timedelta(hours=1))

        failed = await calendar.failed(paid.session_id)
        assert failed["final"] is True and failed["reason"] == "mentor_not_integrated"


class TestOwedDeletions:
    async def test_a_lapsed_lease_with_a_delete_owed_is_finished_by_the_sweeper(
        self, calendar, sandbox
    ):
        mentor = await calendar.connected()
        killed = await killed_after_google_answered(calendar)
        paid = await calendar.pay(mentor)
        await eventually(killed.is_set, what="the run to die after Google made the event")

        await calendar.cancel(paid)
        await eventually(
            lambda: cancelled_with_delete_owed(calendar, paid.session_id),
            what="the booking cancelled, its delete owed",
        )
        await calendar.service.settle()
        held = await calendar.sweeper.run_once()  # the dead run's lease still holds
        assert (await sandbox.event(mentor.email, paid.session_id.hex))["status"] == "confirmed"
        swept = await calendar.sweeper.run_once(after_the_lease(calendar))

        assert (held.deletions, swept.deletions, swept.scheduled) == (0, 1, 0)
        assert (await sandbox.event(mentor.email, paid.session_id.hex))["status"] == "cancelled"
        booking = await calendar.booking(paid.session_id)
        assert booking["event_delete_pending"] is False and booking["claimed_until"] is None
        assert (await calendar.sweeper.run_once(after_the_lease(calendar))).deletions == 0
        await calendar.spy.settle()
        assert calendar.published("CalendarBookingConfirmed") == []

    async def test_a_delete_google_did_not_do_is_tried_again_after_the_lease(
        self, calendar, sandbox
    ):
        mentor = await calendar.connected()
        paid = await calendar.pay(mentor)
        await calendar.confirmed(paid.session_id)
        await sandbox.fault(
            "http_503", count=calendar.settings.google_max_attempts, endpoint="delete"
        )

        await calendar.cancel(paid)

        async def tried() -> bool:
            return await sandbox.faults() == []

        await eventually(tried, what="the fast path's delete to fail")
        await calendar.service.settle()
        await eventually(
            lambda: cancelled_with_delete_owed(calendar, paid.session_id),
            what="the delete still owed",
        )
        assert (await sandbox.event(mentor.email, paid.session_id.hex))["status"] == "confirmed"
        held = await calendar.sweeper.run_once()
        swept = await calendar.sweeper.run_once(after_the_lease(calendar))

        assert (held.deletions, swept.deletions) == (0, 1)
        assert (await sandbox.event(mentor.email, paid.session_id.hex))["status"] == "cancelled"
        assert (await calendar.booking(paid.session_id))["event_delete_pending"] is False


async def cancelled_with_delete_owed(calendar, session_id: uuid.UUID) -> bool:
    row = await calendar.booking(session_id)
    return row["status"] == "cancelled" and row["event_delete_pending"] is True


class TestQuietOutages:
    async def test_a_sweep_that_meets_the_database_away_is_skipped_with_one_line(
        self, postgres_proxy, start_calendar, migrated, caplog
    ):
        calendar = await start_calendar(database_url=url_via(migrated, postgres_proxy))
        assert await calendar.sweeper.tick() == Sweep()

        await postgres_proxy.cut()
        with caplog.at_level(logging.INFO, logger="booking.calendar"):
            skipped = [await calendar.sweeper.tick() for _ in range(5)]
            await postgres_proxy.restore()
            resumed = await calendar.sweeper.tick()

        assert skipped == [None] * 5 and resumed == Sweep()
        mine = [r for r in caplog.records if r.name == "booking.calendar.sweeper"]
        assert [r.levelno for r in mine] == [logging.WARNING, logging.WARNING]
        assert "unreachable while sweeping" in mine[0].getMessage()
        assert "answers again" in mine[1].getMessage()
        assert not any(r.exc_info for r in mine)

    async def test_background_scheduling_that_meets_the_database_away_is_quiet(
        self, postgres_proxy, start_calendar, migrated, caplog
    ):
        calendar = await start_calendar(database_url=url_via(migrated, postgres_proxy))

        await postgres_proxy.cut()
        with caplog.at_level(logging.INFO, logger="booking.calendar"):
            for _ in range(5):
                session_id = uuid.uuid4()
                calendar.service.spawn(
                    calendar.service.schedule(session_id), name=f"schedule-{session_id}"
                )
            await calendar.service.settle()
        await postgres_proxy.restore()

        mine = [r for r in caplog.records if r.name == "booking.calendar.service"]
        assert len(mine) == 1, [r.getMessage() for r in mine]
        assert "unreachable" in mine[0].getMessage() and mine[0].exc_info is None
