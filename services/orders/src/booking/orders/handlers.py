"""What the orders service does when payments and calendar report back.

Each handler runs in the consumer's transaction (the inbox record commits with it): it locks the
order and its session (`FOR UPDATE`, order first, always), applies the domain and records its
events. Events arrive at least once and in any order, so a stale or repeated one is logged and
left alone; raising would only retry it into a dead letter. Events this service sends about a
fact carry an id derived from that fact, so recording one twice stores it once.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from booking.contracts import (
    CalendarBookingConfirmed,
    CalendarBookingFailed,
    OrderPaid,
    PaymentCompleted,
    PaymentFailed,
    PaymentInitiated,
    PaymentInitiationFailed,
    SessionIssueDetected,
    SessionIssueKind,
)
from booking.orders.domain import (
    CurrencyMismatch,
    IllegalTransition,
    InvalidMoney,
    OrderStatus,
)
from booking.orders.tables import BookedSessionRow, OrderRow
from booking.runtime.consumer import Handler, MessageContext

log = logging.getLogger(__name__)

# Namespace of the ids of the events recorded here (uuid5 of the fact they report).
_EVENTS = uuid.UUID("9c4f3a56-2be1-4d0b-8f43-6a1e0c7d5b21")

# payment_status values besides PaymentFailed's reasons (failed, expired).
PAYMENT_PENDING = "pending"
PAYMENT_COMPLETED = "completed"
PAYMENT_INITIATION_FAILED = "initiation_failed"

_ENDED = frozenset({OrderStatus.CANCELLED, OrderStatus.PAYMENT_FAILED})


def _now() -> datetime:
    return datetime.now(UTC)


async def _lock(
    session: AsyncSession, order_id: uuid.UUID
) -> tuple[OrderRow, BookedSessionRow] | None:
    """The order and its session (created together, never deleted), locked in one round trip;
    None when there is no such order. Postgres takes the locks in the order of `OF`: the order
    first, as everywhere else."""
    found = (
        await session.execute(
            select(OrderRow, BookedSessionRow)
            .join(BookedSessionRow, BookedSessionRow.order_id == OrderRow.id)
            .where(OrderRow.id == order_id)
            .with_for_update(of=[OrderRow, BookedSessionRow])
        )
    ).one_or_none()
    if found is None:
        return None
    order, booked = found
    return order, booked


async def record_payment_link(event: PaymentInitiated, ctx: MessageContext) -> None:
    """The order awaits payment at the pay URL payments opened."""
    locked = await _lock(ctx.session, event.order_id)
    if locked is None:
        log.warning("PaymentInitiated %s for unknown order %s", event.payment_ref, event.order_id)
        return
    row, _ = locked
    order = row.to_domain()
    try:
        order.awaiting_payment(event.payment_ref, event.pay_url, _now())
    except IllegalTransition as exc:
        # The order moved on before this arrived (paid first, cancelled): keep the ref and link.
        log.info("PaymentInitiated %s after the order moved on: %s", event.payment_ref, exc)
        if row.payment_ref is None:
            row.payment_ref = event.payment_ref
        if row.pay_url is None and row.payment_ref == event.payment_ref:
            row.pay_url = event.pay_url
        return
    row.record(order)
    if row.payment_status is None:
        row.payment_status = PAYMENT_PENDING


async def cancel_unpayable_order(event: PaymentInitiationFailed, ctx: MessageContext) -> None:
    """No payment could be opened: the order is cancelled and the slot freed."""
    locked = await _lock(ctx.session, event.order_id)
    if locked is None:
        log.warning("PaymentInitiationFailed for unknown order %s", event.order_id)
        return
    row, booked_row = locked
    order, booked = row.to_domain(), booked_row.to_domain()
    if order.status is not OrderStatus.PENDING:
        # Awaiting payment means a payment is open and payable: its own end (paid or expired)
        # decides. Anything later has already been decided.
        log.warning(
            "PaymentInitiationFailed for order %s, which is %s: left as it is",
            order.id,
            order.status.value,
        )
        return
    order.cancel(_now())
    booked.cancel()
    row.record(order)
    booked_row.record(booked)
    row.payment_status = PAYMENT_INITIATION_FAILED
    log.info("order %s cancelled: no payment could be opened (%s)", order.id, event.reason)


async def apply_payment(event: PaymentCompleted, ctx: MessageContext) -> None:
    """Money arrived: paid in full -> paid, OrderPaid; short -> stays unpaid, an issue raised.

    Money for an order this service does not know, or one that has ended, is never dropped: it
    raises SessionIssueDetected for the admins.
    """
    locked = await _lock(ctx.session, event.order_id)
    if locked is None:
        await _raise_issue(
            ctx,
            event,
            None,
            SessionIssueKind.PAYMENT_FOR_UNKNOWN_ORDER,
            f"payment {event.payment_ref} brought {event.amount_paid} {event.currency} (minor "
            f"units) for order {event.order_id}, which the orders service does not know",
        )
        return
    row, booked_row = locked
    order = row.to_domain()
    if order.status in _ENDED:
        await _raise_issue(
            ctx,
            event,
            booked_row.id,
            SessionIssueKind.PAYMENT_FOR_CANCELLED_ORDER,
            f"payment {event.payment_ref} brought {event.amount_paid} {event.currency} (minor "
            f"units) for order {order.id}, which is {order.status.value}; the money is held "
            f"and must be refunded or the booking restored",
        )
        return
    if (
        row.payment_status == PAYMENT_COMPLETED
        and row.payment_ref == event.payment_ref
        and row.amount_paid >= event.amount_paid
    ):
        log.info("PaymentCompleted %s for order %s already applied", event.payment_ref, order.id)
        return
    try:
        underpayment = order.set_amount_paid(event.amount_paid, event.currency, _now())
    except (IllegalTransition, CurrencyMismatch) as exc:
        # Money that cannot be applied is never dropped silently: the admins hear of it.
        kind = (
            SessionIssueKind.CURRENCY_MISMATCH
            if isinstance(exc, CurrencyMismatch)
            else SessionIssueKind.PAYMENT_FOR_PAID_ORDER
        )
        await _raise_issue(
            ctx, event, booked_row.id, kind, f"payment {event.payment_ref} not applied: {exc}"
        )
        return
    except InvalidMoney as exc:
        # A total below the one recorded: an older report of the same payment arriving late.
        log.warning("stale PaymentCompleted %s for order %s: %s", event.payment_ref, order.id, exc)
        return
    row.record(order)
    row.payment_ref = event.payment_ref
    row.payment_status = PAYMENT_COMPLETED
    row.platform_fee = event.platform_fee
    row.escrow_amount = event.escrow_amount
    if underpayment is not None:
        await _raise_issue(
            ctx, event, booked_row.id, SessionIssueKind.UNDERPAYMENT, underpayment.detail
        )
        return
    booked = booked_row.to_domain()
    try:
        booked.await_calendar()
    except IllegalTransition as exc:
        log.error("order %s paid, but its session cannot wait for the calendar: %s", order.id, exc)
        return
    booked_row.record(booked)
    await ctx.record(
        OrderPaid(
            order_id=order.id,
            session_id=booked.id,
            mentor_id=order.mentor_id,
            mentee_email=row.mentee_email,
            title=row.title,
            start_at=booked.start_at,
            end_at=booked.end_at,
        ),
        message_id=uuid.uuid5(_EVENTS, f"OrderPaid:{order.id}"),
    )


async def _raise_issue(
    ctx: MessageContext,
    event: PaymentCompleted,
    session_id: uuid.UUID | None,
    kind: SessionIssueKind,
    detail: str,
) -> None:
    log.warning("order %s: %s: %s", event.order_id, kind.value, detail)
    fact = f"SessionIssueDetected:{kind.value}:{event.order_id}:{event.payment_ref}"
    await ctx.record(
        SessionIssueDetected(
            order_id=event.order_id, session_id=session_id, kind=kind, detail=detail
        ),
        message_id=uuid.uuid5(_EVENTS, f"{fact}:{event.amount_paid}"),
    )


async def fail_order_payment(event: PaymentFailed, ctx: MessageContext) -> None:
    """The payment failed or expired: the order is payment_failed and the slot freed."""
    locked = await _lock(ctx.session, event.order_id)
    if locked is None:
        log.warning("PaymentFailed %s for unknown order %s", event.payment_ref, event.order_id)
        return
    row, booked_row = locked
    order, booked = row.to_domain(), booked_row.to_domain()
    if row.payment_ref is not None and row.payment_ref != event.payment_ref:
        log.warning(
            "PaymentFailed %s for order %s, whose payment is %s: left as it is",
            event.payment_ref,
            order.id,
            row.payment_ref,
        )
        return
    try:
        order.fail_payment(_now())
        booked.cancel()
    except IllegalTransition as exc:
        log.warning("PaymentFailed %s is stale: %s", event.payment_ref, exc)
        return
    row.record(order)
    booked_row.record(booked)
    row.payment_ref = event.payment_ref
    row.payment_status = event.reason.value


async def confirm_session(event: CalendarBookingConfirmed, ctx: MessageContext) -> None:
    """The session is in the mentor's calendar: scheduled with its Meet link, order confirmed."""
    locked = await _lock(ctx.session, event.order_id)
    if locked is None or locked[1].id != event.session_id:
        log.warning(
            "CalendarBookingConfirmed for unknown session %s of order %s",
            event.session_id,
            event.order_id,
        )
        return
    row, booked_row = locked
    order, booked = row.to_domain(), booked_row.to_domain()
    try:
        booked.schedule(event.event_id, event.meet_link)
    except IllegalTransition as exc:
        log.warning("CalendarBookingConfirmed %s not applied: %s", event.event_id, exc)
        return
    booked_row.record(booked)
    if order.status is OrderStatus.PAID:
        order.confirm(_now())
        row.record(order)
    elif order.status is not OrderStatus.CONFIRMED:
        log.warning("session %s scheduled for order %s (%s)", booked.id, order.id, order.status)


async def record_scheduling_failure(event: CalendarBookingFailed, ctx: MessageContext) -> None:
    """The calendar gave up for now: the session is scheduling_failed and keeps its slot."""
    locked = await _lock(ctx.session, event.order_id)
    if locked is None or locked[1].id != event.session_id:
        log.warning(
            "CalendarBookingFailed for unknown session %s of order %s",
            event.session_id,
            event.order_id,
        )
        return
    _, booked_row = locked
    booked = booked_row.to_domain()
    try:
        booked.fail_scheduling()
    except IllegalTransition as exc:
        log.warning("CalendarBookingFailed (%s) is stale: %s", event.reason.value, exc)
        return
    booked_row.record(booked)


HANDLERS: dict[type, Handler] = {
    PaymentInitiated: record_payment_link,
    PaymentInitiationFailed: cancel_unpayable_order,
    PaymentCompleted: apply_payment,
    PaymentFailed: fail_order_payment,
    CalendarBookingConfirmed: confirm_session,
    CalendarBookingFailed: record_scheduling_failure,
}
