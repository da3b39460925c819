"""The notifications service's use cases: raise an alert from an event, end an incident, and the
admins' feed (list, summarize, mark read, delete). One unit of work each.

An event's use cases run in the transaction the consumer opened for its message (with the
message's inbox record), so a redelivered event is never counted twice. A stored or counted-up
notification is recorded in the outbox as AdminNotificationRaised to the admin alerts fanout, in
that same transaction; its message id is derived from (notification id, occurrences), so each
count is its own message. The feed's use cases open a transaction of their own.

There is no loop when storing fails: a message this service cannot handle is dead-lettered and
reported as a SystemErrorReported, which comes back here; should that fail too, the runtime's
consumer dead-letters it without reporting it again (the dead-letter queue shows in health).
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from booking.contracts import AdminNotificationRaised, Event, HealthCheckRecovered
from booking.notifications import repository
from booking.notifications.domain import (
    Cursor,
    DayCount,
    FeedPage,
    Filters,
    Notification,
    Severity,
    alert_for,
    failures_closed_by,
    raises_alert,
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
        self, *, db: Database, outbox: Outbox, window: timedelta, alerts_exchange: str
    ) -> None:
        self.db = db
        self.outbox = outbox
        self.window = window
        """A repeat this long after its notification's first occurrence or sooner counts up."""
        self.alerts_exchange = alerts_exchange

    # --- events -------------------------------------------------------------------------------

    async def raise_alert(self, session: AsyncSession, event: Event, occurred_at: datetime) -> None:
        """Store the notification `event` raises (or count it up) and tell every admin."""
        if not raises_alert(event):
            log.info("%s recorded without a notification (it is retried)", event.event_type())
            return
        alert = alert_for(event, occurred_at)
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
