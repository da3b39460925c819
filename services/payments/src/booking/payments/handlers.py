"""The payments service's event subscribers."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from sqlalchemy.dialects.postgresql import insert

from booking.contracts import BookingRequested
from booking.payments.domain import PaymentState
from booking.payments.tables import payments
from booking.runtime.consumer import MessageContext

Initiate = Callable[[uuid.UUID], Awaitable[None]]


async def open_payment(event: BookingRequested, ctx: MessageContext, *, initiate: Initiate) -> None:
    """Open the order's payment (`initiating`), then initiate it at Konnect once committed.

    Exactly one payment per order, however often BookingRequested arrives and under whatever
    message ids: the unique order_id decides, not a check. Konnect is called after the commit,
    never inside this transaction; if that step is lost, the sweeper initiates the payment.
    """
    opened = await ctx.session.execute(
        insert(payments)
        .values(
            id=uuid.uuid4(),
            order_id=event.order_id,
            session_id=event.session_id,
            mentor_id=event.mentor_id,
            session_end_at=event.end_at,
            amount=event.amount,
            currency=event.currency,
            title=event.offering.title,
            mentee_first_name=event.mentee.first_name,
            mentee_last_name=event.mentee.last_name,
            mentee_email=event.mentee.email,
            mentee_phone=event.mentee.phone,
            correlation_id=ctx.envelope.correlation_id,
            status=PaymentState.INITIATING.value,
        )
        .on_conflict_do_nothing(index_elements=[payments.c.order_id])
        .returning(payments.c.id)
    )
    payment_id = opened.scalar_one_or_none()
    if payment_id is not None:
        ctx.call_after_commit(lambda: initiate(payment_id))
