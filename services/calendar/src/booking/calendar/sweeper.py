"""The sweeper: bookings the fast path left pending, failed ones whose next attempt is due,
ones whose session began while they waited for a reconnect, events of cancelled sessions still
to delete, and spent consent states.

(a) A pending booking whose lease lapsed (the replica crashed while Google was being asked, or
after Google answered but before its commit, or our database went away meanwhile), or that
nobody claimed within a grace period, is scheduled again. The event id derived from the session
makes that harmless: Google answers 409, the event is read, and the booking is confirmed with
the one event there is. (b) A failed booking on the retry schedule whose next attempt is due is
run again. (c) A booking still waiting for its mentor to connect Google when its session begins
is final (docs/recovery.md, section 6). (d) A cancelled booking whose Google event is still owed
a delete, and that no run holds, has it deleted. (e) Consent states long expired are deleted.

Every replica runs one. Each claims its rows with `FOR UPDATE SKIP LOCKED` and stamps a lease in
the same statement, so replicas never take the same booking; the outcome is then recorded under
the row lock and only once. `run_once(now)` is one sweep, at any `now` (tests drive time with it).
While the database cannot be reached a sweep is skipped, and said so once in a while.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from booking.calendar import repository
from booking.calendar.repository import ClaimedBooking
from booking.calendar.service import CalendarService
from booking.calendar.settings import CalendarSettings
from booking.runtime.clock import utcnow
from booking.runtime.outages import OutageLog, is_unreachable
from booking.runtime.sweeping import Every, run_quietly

log = logging.getLogger(__name__)

# Google calls in flight at once per sweep (600 requests a minute per mentor is Google's quota).
_GOOGLE_CONCURRENCY = 4
# Spent or expired consent states are kept this long (to tell a replay from a forgery), then go.
_STATE_RETENTION = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Sweep:
    """What one sweep did."""

    scheduled: int = 0
    retried: int = 0
    given_up: int = 0
    deletions: int = 0
    states_pruned: int = 0


class Sweeper:
    def __init__(self, service: CalendarService, settings: CalendarSettings) -> None:
        self.service = service
        self.db = service.db
        self.settings = settings
        self.batch = settings.sweeper_batch_size
        self.lease = timedelta(seconds=settings.scheduling_lease_seconds)
        self.outage = OutageLog(log, "the calendar database (sweeper)")
        self._loop = Every(settings.sweeper_interval_seconds, self.tick, name="calendar-sweeper")

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def tick(self) -> Sweep | None:
        """One sweep as the background loop runs it: one that meets the database away is
        skipped (the next interval tries again) with a line now and then, not a trace."""
        return await run_quietly(self.run_once, self.outage, "sweeping")

    async def run_once(self, now: datetime | None = None) -> Sweep:
        """One full sweep at `now` (default: the clock)."""
        now = now or utcnow()
        return Sweep(
            scheduled=await self.reschedule(now),
            retried=await self.retry_due(now),
            given_up=await self.give_up_unscheduled(now),
            deletions=await self.delete_owed(now),
            states_pruned=await self.prune_states(now),
        )

    async def _in_batches(
        self,
        claim: Callable[[datetime], Awaitable[list[ClaimedBooking]]],
        work: Callable[[ClaimedBooking], Awaitable[Any]],
        what: str,
        now: datetime,
    ) -> int:
        """Claim bookings batch by batch and work each (a few Google calls at once); how many."""
        done = 0
        limit = asyncio.Semaphore(_GOOGLE_CONCURRENCY)

        async def one(booking: ClaimedBooking) -> None:
            try:
                async with limit:
                    await work(booking)
            except Exception as exc:
                if is_unreachable(exc):
                    self.outage.failed(exc, f"{what} {booking.session_id}")
                else:
                    log.exception("%s %s failed; the next sweep retries", what, booking.session_id)

        while True:
            claimed = await claim(now)
            await asyncio.gather(*(one(booking) for booking in claimed))
            done += len(claimed)
            if len(claimed) < self.batch:
                return done

    # -- (a) interrupted bookings ------------------------------------------------------------

    async def reschedule(self, now: datetime) -> int:
        """Schedule every pending booking whose lease lapsed or nobody claimed; how many."""
        return await self._in_batches(self._claim_lapsed, self._schedule, "scheduling", now)

    async def _claim_lapsed(self, now: datetime) -> list[ClaimedBooking]:
        grace = timedelta(seconds=self.settings.scheduling_grace_seconds)
        async with self.db.transaction() as session:
            return await repository.claim_lapsed(session, now, grace, now + self.lease, self.batch)

    async def _schedule(self, booking: ClaimedBooking) -> None:
        log.warning(
            "scheduling session %s of order %s again (after %d attempt(s): interrupted or not "
            "yet claimed)",
            booking.session_id,
            booking.order_id,
            booking.attempts,
        )
        await self.service.schedule_claimed(booking)

    # -- (b) the retry schedule --------------------------------------------------------------

    async def retry_due(self, now: datetime) -> int:
        """Run again every failed booking whose next attempt on the schedule is due; how many."""
        return await self._in_batches(self._claim_due, self._retry, "retrying", now)

    async def _claim_due(self, now: datetime) -> list[ClaimedBooking]:
        # Pending again under this sweeper's lease: the run's outcome is recorded as any other.
        async with self.db.transaction() as session:
            return await repository.claim_due(session, now, now + self.lease, self.batch)

    async def _retry(self, booking: ClaimedBooking) -> None:
        log.info(
            "scheduling session %s of order %s again on its retry schedule (attempt %d)",
            booking.session_id,
            booking.order_id,
            booking.attempts + 1,
        )
        await self.service.schedule_claimed(booking)

    # -- (c) sessions that began unscheduled -------------------------------------------------

    async def give_up_unscheduled(self, now: datetime) -> int:
        given_up = 0
        while True:
            batch = await self.service.give_up_unscheduled(now, self.batch)
            given_up += batch
            if batch < self.batch:
                return given_up

    # -- (d) events of cancelled sessions ----------------------------------------------------

    async def delete_owed(self, now: datetime) -> int:
        """Delete the event of every cancelled booking that owes one and no run holds; how many
        were tried (a delete Google did not do stays owed, for after the lease)."""
        return await self._in_batches(
            self._claim_deletions, self.service.delete_claimed, "deleting the event of", now
        )

    async def _claim_deletions(self, now: datetime) -> list[ClaimedBooking]:
        async with self.db.transaction() as session:
            return await repository.claim_deletions(session, now, now + self.lease, self.batch)

    # -- (e) consent states ------------------------------------------------------------------

    async def prune_states(self, now: datetime) -> int:
        async with self.db.transaction() as session:
            return await repository.prune_states(session, now - _STATE_RETENTION)
