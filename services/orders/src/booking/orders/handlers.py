"""The orders service's event subscribers: what payments and calendar report, each turned into
one call of `OrderService`.

Each runs in the consumer's transaction (the inbox record commits with it); the service keeps
the rules, the order's lock and the events it records.
"""

from __future__ import annotations

from booking.contracts import (
    CalendarBookingConfirmed,
    CalendarBookingFailed,
    EscrowFrozen,
    EscrowRefundDue,
    EscrowRefunded,
    EscrowReleased,
    EscrowUnfrozen,
    Event,
    PaymentCompleted,
    PaymentFailed,
    PaymentInitiated,
    PaymentInitiationFailed,
)
from booking.orders.service import EscrowEvent, OrderService
from booking.runtime.consumer import Handler, MessageContext


def subscribers(service: OrderService) -> dict[type[Event], Handler]:
    """The events orders consumes, and the subscriber of each."""

    async def record_payment_link(event: PaymentInitiated, ctx: MessageContext) -> None:
        """The order awaits payment at the pay URL payments opened."""
        await service.record_payment_link(ctx.session, event)

    async def cancel_unpayable_order(event: PaymentInitiationFailed, ctx: MessageContext) -> None:
        """No payment could be opened: the order is cancelled and the slot freed."""
        await service.cancel_unpayable_order(ctx.session, event)

    async def apply_payment(event: PaymentCompleted, ctx: MessageContext) -> None:
        """Money arrived: the order is paid, or the admins hear why not."""
        await service.apply_payment(ctx.session, event)

    async def fail_order_payment(event: PaymentFailed, ctx: MessageContext) -> None:
        """The payment failed or expired: the order is payment_failed and the slot freed."""
        await service.fail_order_payment(ctx.session, event)

    async def confirm_session(event: CalendarBookingConfirmed, ctx: MessageContext) -> None:
        """The session is in the mentor's calendar: scheduled, and the order confirmed."""
        await service.confirm_session(ctx.session, event)

    async def record_scheduling_failure(event: CalendarBookingFailed, ctx: MessageContext) -> None:
        """The calendar could not book the session (for now, or for good)."""
        await service.record_scheduling_failure(ctx.session, event)

    async def record_escrow_status(event: EscrowEvent, ctx: MessageContext) -> None:
        """Payments moved the order's escrow: the order view shows where the money stands."""
        await service.record_escrow_status(ctx.session, event)

    return {
        PaymentInitiated: record_payment_link,
        PaymentInitiationFailed: cancel_unpayable_order,
        PaymentCompleted: apply_payment,
        PaymentFailed: fail_order_payment,
        CalendarBookingConfirmed: confirm_session,
        CalendarBookingFailed: record_scheduling_failure,
        EscrowFrozen: record_escrow_status,
        EscrowUnfrozen: record_escrow_status,
        EscrowRefundDue: record_escrow_status,
        EscrowRefunded: record_escrow_status,
        EscrowReleased: record_escrow_status,
    }
