"""The sweeper: bookings the fast path left pending, and spent consent states.

(a) A pending booking whose lease lapsed (the replica crashed while Google was being asked, or
after Google answered but before its commit), or that nobody claimed within a grace period, is
scheduled again. The event id derived from the session makes that harmless: Google answers 409,
the event is read, and the booking is confirmed with the one event there is. (b) Consent states
long expired are deleted.

Every replica runs one. Each claims its rows with `FOR UPDATE SKIP LOCKED` and stamps a lease in
the same statement, so replicas never take the same booking; the outcome is then recorded under
the row lock and only once. `run_once(now)` is one sweep, at any `now` (tests drive time with it).
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, delete, select, update

from booking.calendar.domain import BookingStatus
from booking.calendar.service import CalendarService, utcnow
from booking.calendar.settings import CalendarSettings
from booking.calendar.tables import calendar_bookings, oauth_states

log = logging.getLogger(__name__)

# Google calls in flight at once per sweep (600 requests a minute per mentor is Google's quota).
_GOOGLE_CONCURRENCY = 4
# Spent or expired consent states are kept this long (to tell a replay from a forgery), then go.
_STATE_RETENTION = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Sweep:
    """What one sweep did."""

    scheduled: int = 0
    states_pruned: int = 0


class Sweeper:
    def __init__(self, service: CalendarService, settings: CalendarSettings) -> None:
        self.service = service
        self.db = service.db
        self.settings = settings
        self.batch = settings.sweeper_batch_size
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._forever(), name="calendar-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _forever(self) -> None:
        interval = self.settings.sweeper_interval_seconds
        while True:
            # Jittered, so replicas started together do not sweep in step.
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweep failed; trying again in about %ss", interval)

    async def run_once(self, now: datetime | None = None) -> Sweep:
        """One full sweep at `now` (default: the clock)."""
        now = now or utcnow()
        return Sweep(
            scheduled=await self.reschedule(now), states_pruned=await self.prune_states(now)
        )

    # -- (a) interrupted bookings ------------------------------------------------------------

    async def reschedule(self, now: datetime) -> int:
        """Schedule every pending booking whose lease lapsed or nobody claimed; how many."""
        scheduled = 0
        limit = asyncio.Semaphore(_GOOGLE_CONCURRENCY)
        while True:
            claimed = await self._claim_lapsed(now)
            await asyncio.gather(*(self._schedule(row, limit) for row in claimed))
            scheduled += len(claimed)
            if len(claimed) < self.batch:
                return scheduled

    async def _claim_lapsed(self, now: datetime) -> list[Row[Any]]:
        grace = timedelta(seconds=self.settings.scheduling_grace_seconds)
        lease = timedelta(seconds=self.settings.scheduling_lease_seconds)
        bookings = calendar_bookings.c
        lapsed = (
            select(bookings.session_id)
            .where(
                bookings.status == BookingStatus.PENDING.value,
                (bookings.claimed_until.is_(None) & (bookings.updated_at <= now - grace))
                | (bookings.claimed_until < now),
            )
            .order_by(bookings.updated_at)
            .limit(self.batch)
            .with_for_update(skip_locked=True)
        )
        claim = (
            update(calendar_bookings)
            .where(bookings.session_id.in_(lapsed.scalar_subquery()))
            .values(claimed_until=now + lease, attempts=bookings.attempts + 1)
            .returning(*calendar_bookings.c)
        )
        async with self.db.transaction() as session:
            return list((await session.execute(claim)).all())

    async def _schedule(self, row: Row[Any], limit: asyncio.Semaphore) -> None:
        log.warning(
            "scheduling session %s of order %s again (run %d: interrupted or not yet claimed)",
            row.session_id,
            row.order_id,
            row.attempts,
        )
        try:
            async with limit:
                await self.service.schedule_claimed(row)
        except Exception:
            log.exception("scheduling session %s failed; the next sweep retries", row.session_id)

    # -- (b) consent states ------------------------------------------------------------------

    async def prune_states(self, now: datetime) -> int:
        async with self.db.transaction() as session:
            pruned = await session.execute(
                delete(oauth_states)
                .where(oauth_states.c.expires_at < now - _STATE_RETENTION)
                .returning(oauth_states.c.nonce)
            )
            return len(pruned.all())
