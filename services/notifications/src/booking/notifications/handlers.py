"""The notifications service's event subscribers: each failure or health event raises an alert.

Every handler runs in the consumer's transaction, with the inbox record of its message, so a
redelivered event is never counted twice. A stored or counted-up notification is recorded in
the outbox as AdminNotificationRaised to the admin alerts fanout, in the same transaction; its
message id is derived from (notification id, occurrences), so each count is its own message.

There is no loop when storing fails: a message this service cannot handle is dead-lettered and
reported as a SystemErrorReported, which comes back here; should that fail too, the runtime's
consumer dead-letters it without reporting it again (the dead-letter queue shows in health).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from datetime import timedelta
from functools import partial

from booking.contracts import (
    AdminActionRecorded,
    CalendarBookingFailed,
    EscrowFrozen,
    EscrowRefundDue,
    EscrowRefunded,
    EscrowUnfrozen,
    Event,
    HealthCheckFailed,
    HealthCheckRecovered,
    PaymentAnomalyDetected,
    PaymentInitiationFailed,
    SessionIssueDetected,
    SystemErrorReported,
)
from booking.notifications import feed
from booking.notifications.domain import alert_for, failures_closed_by, raises_alert
from booking.runtime.consumer import Handler, MessageContext

log = logging.getLogger(__name__)

SERVICE = "notifications"

# Namespace of AdminNotificationRaised message ids: uuid5 of "<id>:<occurrences>".
_RAISED = uuid.UUID("0d3b8f5e-58a4-4c1e-9a7d-2f6c1b9e4a70")


async def raise_alert(
    event: Event, ctx: MessageContext, *, window: timedelta, alerts_exchange: str
) -> None:
    """Store the notification `event` raises (or count it up) and tell every admin."""
    if not raises_alert(event):
        log.info("%s recorded without a notification (it is retried)", event.event_type())
        return
    alert = alert_for(event, ctx.envelope.occurred_at)
    stored = await feed.store_alert(ctx.session, alert, window)
    row = stored.row
    await ctx.record(
        feed.raised(row),
        message_id=uuid.uuid5(_RAISED, f"{row.id}:{row.occurrences}"),
        exchange=alerts_exchange,
    )
    log.info(
        "%s notification %d (%s, %s): %s",
        "raised" if stored.created else f"counted up ({row.occurrences})",
        row.id,
        alert.type.name,
        alert.severity.name,
        alert.title,
    )


async def raise_recovery(
    event: HealthCheckRecovered, ctx: MessageContext, *, window: timedelta, alerts_exchange: str
) -> None:
    """The component passes again: its open failure is closed (the next is a new incident)."""
    await feed.close(ctx.session, failures_closed_by(event))
    await raise_alert(event, ctx, window=window, alerts_exchange=alerts_exchange)


def handlers(window: timedelta, alerts_exchange: str) -> Mapping[type[Event], Handler]:
    """Every event this service consumes, and what it does with it."""
    alert = partial(raise_alert, window=window, alerts_exchange=alerts_exchange)
    return {
        CalendarBookingFailed: alert,
        PaymentAnomalyDetected: alert,
        PaymentInitiationFailed: alert,
        SessionIssueDetected: alert,
        HealthCheckFailed: alert,
        HealthCheckRecovered: partial(
            raise_recovery, window=window, alerts_exchange=alerts_exchange
        ),
        SystemErrorReported: alert,
        EscrowFrozen: alert,
        EscrowUnfrozen: alert,
        EscrowRefundDue: alert,
        EscrowRefunded: alert,
        AdminActionRecorded: alert,
    }
