"""The notifications service's event subscribers: each failure or health event raises an alert.

Every subscriber runs in the consumer's transaction, with the inbox record of its message, and
makes one call to the service (service.py says what raising an alert records and publishes).
"""

from __future__ import annotations

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
from booking.notifications.service import NotificationsService
from booking.runtime.consumer import Handler, MessageContext


def subscribers(service: NotificationsService) -> dict[type[Event], Handler]:
    """Every event this service consumes, and the use case it becomes."""

    async def raise_alert(event: Event, ctx: MessageContext) -> None:
        # When the failure happened, not when it is handled.
        await service.raise_alert(ctx.session, event, ctx.envelope.occurred_at)

    async def end_incident(event: HealthCheckRecovered, ctx: MessageContext) -> None:
        await service.end_incident(ctx.session, event, ctx.envelope.occurred_at)

    return {
        CalendarBookingFailed: raise_alert,
        PaymentAnomalyDetected: raise_alert,
        PaymentInitiationFailed: raise_alert,
        SessionIssueDetected: raise_alert,
        HealthCheckFailed: raise_alert,
        HealthCheckRecovered: end_incident,
        SystemErrorReported: raise_alert,
        EscrowFrozen: raise_alert,
        EscrowUnfrozen: raise_alert,
        EscrowRefundDue: raise_alert,
        EscrowRefunded: raise_alert,
        AdminActionRecorded: raise_alert,
    }
