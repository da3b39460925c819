"""The notifications service's use cases: raise an alert from an event, end an incident, and the
admins' feed (list, summarize, mark read, delete). One unit of work each.

An event's use cases run in the transaction the consumer opened for its message (with the
message's inbox record), so a redelivered event is never counted twice. A stored or counted-up
notification is recorded in the outbox as AdminNotificationRaised to the admin alerts fanout, in
that same transaction; its message id is derived from (notification id, occurrences), so each
count is its own message. The feed's use cases open a transaction of their own.

A notification the routing sends to people (a webhook, email) gets one delivery per channel,
queued in that same transaction; the dispatcher (dispatcher.py) claims and sends them, and
records each attempt with the use cases at the end of this module.

There is no loop when storing fails: a message this service cannot handle is dead-lettered and
reported as a SystemErrorReported, which comes back here; should that fail too, the runtime's
consumer dead-letters it without reporting it again (the dead-letter queue shows in health).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from booking.contracts import AdminNotificationRaised, Event, HealthCheckRecovered
from booking.notifications import repository
from booking.notifications.domain import (
    Alert,
    Channel,
    Cursor,
    DayCount,
    Dispatch,
    FeedPage,
    Filters,
    NewDelivery,
    Notification,
    Routing,
    Severity,
    Stored,
    alert_for,
    channel_failing_alert,
    channel_failing_fingerprint,
    channel_recovered_alert,
    decide,
    failures_closed_by,
    raises_alert,
    snapshot,
    summary_days,
)
from booking.runtime.clock import utcnow
from booking.runtime.db import Database
from booking.runtime.domain import EventIds
from booking.runtime.outbox import Outbox

log = logging.getLogger(__name__)

# AdminNotificationRaised message ids: one per (notification id, occurrences), so each count is
# its own message and recording one count twice stores it once.
raised_id = EventIds(uuid.UUID("0d3b8f5e-58a4-4c1e-9a7d-2f6c1b9e4a70"))


class NotificationsService:
    """The use cases, on the runtime's database and outbox."""

    def __init__(
        self,
        *,
        db: Database,
        outbox: Outbox,
        window: timedelta,
        alerts_exchange: str,
        routing: Routing | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db = db
        self.outbox = outbox
        self.window = window
        """A repeat this long after its notification's first occurrence or sooner counts up."""
        self.alerts_exchange = alerts_exchange
        self.routing = routing or Routing()
        """Which notifications go to people, and how (none without a configured channel)."""
        self.clock = clock
        """The deliveries' times (tests drive it)."""

    # --- events -------------------------------------------------------------------------------

    async def raise_alert(self, session: AsyncSession, event: Event, occurred_at: datetime) -> None:
        """Store the notification `event` raises (or count it up) and tell every admin."""
        if not raises_alert(event):
            log.info("%s recorded without a notification (it is retried)", event.event_type())
            return
        await self._store(session, alert_for(event, occurred_at), self.clock())

    async def _store(self, session: AsyncSession, alert: Alert, now: datetime) -> Stored:
        """Store `alert` (or count it up), tell every admin, and queue its deliveries."""
        stored = await repository.store_alert(session, alert, self.window)
        notification = stored.notification
        await self.outbox.record(
            session,
            AdminNotificationRaised(**notification.public_fields()),
            message_id=raised_id(notification.id, notification.occurrences),
            exchange=self.alerts_exchange,
        )
        log.info(
            "%s notification %d (%s, %s): %s",
            "raised" if stored.created else f"counted up ({notification.occurrences})",
            notification.id,
            alert.type.name,
            alert.severity.name,
            alert.title,
        )
        await self._queue_deliveries(session, stored, now)
        return stored

    async def _queue_deliveries(self, session: AsyncSession, stored: Stored, now: datetime) -> None:
        """One delivery per channel that takes the notification, for this occurrence: due at
        once, or at the end of the quiet period after its last send on that channel."""
        notification = stored.notification
        channels = self.routing.channels_for(notification)
        if not channels:
            return
        # A new notification was never sent anywhere: no need to ask.
        sent = (
            {} if stored.created else await repository.last_sent(session, notification.id, channels)
        )
        payload = snapshot(notification)
        await repository.queue_deliveries(
            session,
            [
                NewDelivery(
                    notification_id=notification.id,
                    occurrence=notification.occurrences,
                    channel=channel,
                    payload=payload,
                    queued_at=now,
                    due_at=self.routing.first_due(now, sent.get(channel)),
                )
                for channel in channels
            ],
        )

    async def end_incident(
        self, session: AsyncSession, event: HealthCheckRecovered, occurred_at: datetime
    ) -> None:
        """The component passes again: its open failure is closed (the next is a new incident),
        and the recovery is news of its own."""
        await repository.close(session, failures_closed_by(event))
        await self.raise_alert(session, event, occurred_at)

    # --- the feed -----------------------------------------------------------------------------

    async def page(
        self,
        filters: Filters,
        *,
        limit: int,
        cursor: Cursor | None = None,
        after_id: int | None = None,
    ) -> FeedPage:
        """Newest first (by id), or oldest first after `after_id` (or an ascending cursor)."""
        async with self.db.transaction() as session:
            return await repository.page(
                session, filters, limit=limit, cursor=cursor, after_id=after_id
            )

    async def summarize(self, days: int) -> list[DayCount]:
        """Notifications raised per UTC day and severity over the last `days` days (today too),
        oldest day first, zeros included."""
        span = summary_days(utcnow().astimezone(UTC).date(), days)
        async with self.db.transaction() as session:
            counts = await repository.raised_per_day(session, span)
        return [DayCount(d, s, counts.get((d, s), 0)) for d in span for s in Severity]

    async def mark_read(self, notification_id: int) -> Notification | None:
        """Mark one read (its first read_at stays); None when there is no such notification."""
        async with self.db.transaction() as session:
            return await repository.mark_read(session, notification_id, utcnow())

    async def mark_all_read(self, filters: Filters) -> int:
        """Mark every unread notification matching `filters` read; how many were."""
        async with self.db.transaction() as session:
            return await repository.mark_all_read(session, filters, utcnow())

    async def delete(self, notification_id: int) -> bool:
        """Delete one; False when there is no such notification."""
        async with self.db.transaction() as session:
            return await repository.remove(session, notification_id)

    # --- deliveries to people (the dispatcher's use cases) --------------------------------------

    async def claim_deliveries(
        self, now: datetime, channels: list[Channel], *, limit: int, lease: timedelta
    ) -> list[Dispatch]:
        """The deliveries due at `now` on `channels` that go now, each claimed for `lease` (if
        this dispatcher dies meanwhile, another sends it after the lease, with the same key).
        Those a later occurrence replaces are dropped; those within a quiet period, or whose
        notification is being sent on the channel right now, wait."""
        async with self.db.transaction() as session:
            due = await repository.due_deliveries(session, now, channels, limit)
            to_send, superseded = [], []
            for delivery in due:
                decision = decide(delivery, now, self.routing.quiet_period)
                if decision.action == "send":
                    to_send.append(delivery.id)
                elif decision.action == "supersede":
                    superseded.append(delivery.id)
                elif decision.until is not None:
                    await repository.postpone(session, delivery.id, decision.until)
            await repository.supersede(session, superseded)
            return await repository.claim_for_sending(session, to_send, now, now + lease)

    async def record_sent(self, dispatch: Dispatch, now: datetime, target: str) -> None:
        """The channel took `dispatch`. If the channel was failing, its failure ends (and that is
        news of its own)."""
        async with self.db.transaction() as session:
            if not await repository.record_sent(session, dispatch, now):
                return  # another dispatcher took it again after our lease ended
            failing = channel_failing_fingerprint(dispatch.channel)
            # Closing is what tells: of two replicas recovering at once, one closes it.
            if await repository.is_open(session, failing):
                await repository.lock_writes(session)  # the writers' order (repository.py)
                if await repository.close(session, [failing]):
                    alert = channel_recovered_alert(dispatch.channel, target, now)
                    await self._store(session, alert, now)

    async def record_failure(
        self, dispatch: Dispatch, error: str, now: datetime, target: str, *, failing_after: int
    ) -> datetime | None:
        """The attempt failed: due again on the retry schedule, or given up (None) once the
        schedule is spent. At the `failing_after`-th failure in a row of one delivery, the
        channel is failing: the admins hear of it, once until it recovers."""
        retry_at = self.routing.retries.next_attempt(dispatch.queued_at, dispatch.attempts, now)
        async with self.db.transaction() as session:
            if not await repository.record_failure(session, dispatch, error, retry_at):
                return retry_at
            if dispatch.attempts == failing_after:
                await repository.lock_writes(session)  # then no other replica raises it meanwhile
                if not await repository.is_open(
                    session, channel_failing_fingerprint(dispatch.channel)
                ):
                    alert = channel_failing_alert(
                        dispatch.channel,
                        target,
                        error,
                        dispatch.attempts,
                        dispatch.notification_id,
                        now,
                    )
                    await self._store(session, alert, now)
        return retry_at

    async def delivery_backlog(self, now: datetime) -> Backlog:
        """What the configured channels still have to send (for the health report)."""
        async with self.db.transaction() as session:
            count, oldest = await repository.delivery_backlog(
                session, now, list(self.routing.channels)
            )
        age = 0.0 if oldest is None else max((now - oldest).total_seconds(), 0.0)
        return Backlog(count, age)


@dataclass(frozen=True)
class Backlog:
    """Deliveries still to send, and how long ago the oldest was queued (seconds)."""

    pending: int
    oldest_age: float
