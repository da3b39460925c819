"""The payments service's event subscribers: an event in, one service call.

Each runs in the consumer's transaction (`ctx.session`; the inbox record commits with it); the
service keeps the rules and the order's lock that serialises what happens to one order.
"""

from __future__ import annotations

from booking.contracts import (
    BookingRequested,
    Event,
    OrderCancelled,
    OrderConfirmed,
    SchedulingAbandoned,
)
from booking.payments.service import PaymentService
from booking.runtime.consumer import Handler, MessageContext


def subscribers(service: PaymentService) -> dict[type[Event], Handler]:
    """The events payments consumes, each with the handler that turns it into a service call."""

    async def open_payment(event: BookingRequested, ctx: MessageContext) -> None:
        """Open the order's payment (`initiating`), then initiate it at Konnect once committed.

        Konnect is called after the commit, never inside this transaction; if that step is
        lost, the sweeper initiates the payment.
        """
        payment_id = await service.open_payment(ctx.session, event, ctx.envelope.correlation_id)
        if payment_id is not None:
            ctx.call_after_commit(lambda: service.initiate(payment_id))

    async def schedule_escrow_release(event: OrderConfirmed, ctx: MessageContext) -> None:
        """The session is in the calendar: its escrow is released after its end plus the delay."""
        await service.schedule_release(ctx.session, event)

    async def freeze_escrow(event: SchedulingAbandoned, ctx: MessageContext) -> None:
        """The calendar gave up on the session: its escrow waits for an admin."""
        await service.freeze_for_scheduling(ctx.session, event)

    async def end_order(event: OrderCancelled, ctx: MessageContext) -> None:
        """The order ended without its session: no payment opened, or its escrow frozen."""
        await service.end_order(ctx.session, event)

    return {
        BookingRequested: open_payment,
        OrderConfirmed: schedule_escrow_release,
        SchedulingAbandoned: freeze_escrow,
        OrderCancelled: end_order,
    }
