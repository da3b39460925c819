"""The notifications service's event subscribers: each failure or health event raises an alert.

Every handler runs in the consumer's transaction, with the inbox record of its message, so a
redelivered event is never counted twice. A stored or counted-up notification is recorded in
the outbox as AdminNotificationRaised to the admin alerts fanout, in the same transaction; its
message id is derived from (notification id, occurrences), so each count is its own message.

**The loop guard.** When this service fails to handle a message, its consumer dead-letters it
and reports a SystemErrorReported, which this service consumes again. Were handling that report
to fail too, it would be dead-lettered and reported again, and so on without end. So a report
about a SystemErrorReported that this very service failed to handle is the end of the line: it
is stored if it can be (inside a savepoint), and otherwise logged, never raised. Every other
report takes the ordinary path, which has no lookups and nothing to fail but the store itself.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from datetime import timedelta
from functools import partial

from booking.contracts import (
    CalendarBookingFailed,
    Event,
    HealthCheckFailed,
    HealthCheckRecovered,
    PaymentAnomalyDetected,
    PaymentInitiationFailed,
    SessionIssueDetected,
    SystemErrorReported,
)
from booking.notifications import feed
from booking.notifications.domain import alert_for, failures_closed_by
from booking.runtime.consumer import Handler, MessageContext

log = logging.getLogger(__name__)

SERVICE = "notifications"

# Namespace of AdminNotificationRaised message ids: uuid5 of "<id>:<occurrences>".
_RAISED = uuid.UUID("0d3b8f5e-58a4-4c1e-9a7d-2f6c1b9e4a70")


async def raise_alert(
    event: Event, ctx: MessageContext, *, window: timedelta, alerts_exchange: str
) -> None:
    """Store the notification `event` raises (or count it up) and tell every admin."""
    alert = alert_for(event, ctx.envelope.occurred_at)
    stored = await feed.store_alert(ctx.session, alert, window)
    row = stored.row
    await ctx.outbox.record(
        ctx.session,
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


def is_own_report_failure(event: SystemErrorReported) -> bool:
    """A report that this service could not handle a SystemErrorReported (the loop's 2nd turn)."""
    return event.service == SERVICE and event.message_type == SystemErrorReported.event_type()


async def raise_system_error(
    event: SystemErrorReported, ctx: MessageContext, *, window: timedelta, alerts_exchange: str
) -> None:
    """A dead-lettered message: a Critical SystemError. See the loop guard above."""
    if not is_own_report_failure(event):
        await raise_alert(event, ctx, window=window, alerts_exchange=alerts_exchange)
        return
    try:
        async with ctx.session.begin_nested():
            await raise_alert(event, ctx, window=window, alerts_exchange=alerts_exchange)
    except Exception:
        log.critical(
            "could not store the report that %s failed to handle a SystemErrorReported "
            "(dead-lettered message %s); dropped here to end the loop. Its error: %s",
            event.consumer,
            event.dead_lettered_message_id,
            event.error,
            exc_info=True,
        )


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
        SystemErrorReported: partial(
            raise_system_error, window=window, alerts_exchange=alerts_exchange
        ),
    }
