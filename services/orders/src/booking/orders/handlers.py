"""What the orders service does when payments and calendar report back.

Each handler runs in the consumer's transaction (the inbox record commits with it): it locks the
order and its session (`FOR UPDATE`, order first, always), applies the domain and records its
events. Events arrive at least once and in any order, so a stale or repeated one is logged and
left alone; raising would only retry it into a dead letter. Events this service sends about a
fact carry an id derived from that fact (`service.event_id`), so recording one twice stores it
once.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

from sqlalchemy import select

from booking.contracts import (
    CalendarBookingConfirmed,
    CalendarBookingFailed,
    EscrowFrozen,
    EscrowRefundDue,
    EscrowRefunded,
    EscrowReleased,
    EscrowUnfrozen,
    OrderConfirmed,
    OrderPaid,
    PaymentCompleted,
    PaymentFailed,
    PaymentInitiated,
    PaymentInitiationFailed,
    SchedulingAbandoned,
    SessionIssueDetected,
    SessionIssueKind,
)
from booking.orders.domain import (
    CurrencyMismatch,
    EscrowStatus,
    IllegalTransition,
    InvalidMoney,
    OrderStatus,
    PaymentStatus,
)
from booking.orders.service import event_id, lock_order
from booking.orders.tables import OrderRow
from booking.runtime.consumer import Handler, MessageContext

log = logging.getLogger(__name__)

_ENDED = frozenset({OrderStatus.CANCELLED, OrderStatus.PAYMENT_FAILED})


def _now() -> datetime:
    return datetime.now(UTC)


async def record_payment_link(event: PaymentInitiated, ctx: MessageContext) -> None:
    """The order awaits payment at the pay URL payments opened."""
    locked = await lock_order(ctx.session, event.order_id)
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
        row.payment_status = PaymentStatus.PENDING.value


async def cancel_unpayable_order(event: PaymentInitiationFailed, ctx: MessageContext) -> None:
    """No payment could be opened: the order is cancelled and the slot freed."""
    locked = await lock_order(ctx.session, event.order_id)
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
    row.payment_status = PaymentStatus.INITIATION_FAILED.value
    log.info("order %s cancelled: no payment could be opened (%s)", order.id, event.reason)


async def apply_payment(event: PaymentCompleted, ctx: MessageContext) -> None:
    """Money arrived: paid in full -> paid, OrderPaid; short -> stays unpaid, an issue raised.

    Money for an order this service does not know, or one that has ended, is never dropped: it
    raises SessionIssueDetected for the admins.
    """
    locked = await lock_order(ctx.session, event.order_id)
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
        row.payment_status == PaymentStatus.COMPLETED.value
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
    row.payment_status = PaymentStatus.COMPLETED.value
    row.platform_fee = event.platform_fee
    row.escrow_amount = event.escrow_amount
    if underpayment is not None:
        await _raise_issue(
            ctx, event, booked_row.id, SessionIssueKind.UNDERPAYMENT, underpayment.detail
        )
        return
    escrow = row.escrow()
    if escrow.hold_for_payment():
        row.record_escrow(escrow)
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
        message_id=event_id(f"OrderPaid:{order.id}"),
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
        message_id=event_id(f"{fact}:{event.amount_paid}"),
    )


async def fail_order_payment(event: PaymentFailed, ctx: MessageContext) -> None:
    """The payment failed or expired: the order is payment_failed and the slot freed."""
    locked = await lock_order(ctx.session, event.order_id)
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
    """The session is in the mentor's calendar: scheduled with its Meet link, order confirmed.

    The order's confirmation is announced (OrderConfirmed) so that payments holds its escrow
    for release after the session, or unfreezes it when an admin's retry of a scheduling that
    had been abandoned succeeded. A cancelled session is never scheduled again.
    """
    locked = await lock_order(ctx.session, event.order_id)
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
    if order.status is not OrderStatus.PAID:
        if order.status is not OrderStatus.CONFIRMED:
            log.warning("session %s scheduled for order %s (%s)", booked.id, order.id, order.status)
        return
    order.confirm(_now())
    row.record(order)
    await ctx.record(
        OrderConfirmed(
            order_id=order.id, session_id=booked.id, mentor_id=order.mentor_id, end_at=booked.end_at
        ),
        message_id=event_id(f"OrderConfirmed:{order.id}"),
    )


async def record_scheduling_failure(event: CalendarBookingFailed, ctx: MessageContext) -> None:
    """The calendar could not book the session.

    Not final: the calendar tries again on its schedule (or when the mentor reconnects), so the
    session keeps waiting as it is. Final: the session is scheduling_failed (it keeps its slot:
    it is paid for, and an admin may retry it) and SchedulingAbandoned tells payments to freeze
    the escrow. A final failure for a session scheduled or cancelled since is stale.
    """
    locked = await lock_order(ctx.session, event.order_id)
    if locked is None or locked[1].id != event.session_id:
        log.warning(
            "CalendarBookingFailed for unknown session %s of order %s",
            event.session_id,
            event.order_id,
        )
        return
    _, booked_row = locked
    if not event.final:
        log.info(
            "calendar booking of session %s failed (%s, attempt %d); next attempt %s",
            event.session_id,
            event.reason.value,
            event.attempts,
            event.next_attempt_at.isoformat() if event.next_attempt_at else "when reconnected",
        )
        return
    booked = booked_row.to_domain()
    try:
        booked.fail_scheduling()
    except IllegalTransition as exc:
        log.warning("final CalendarBookingFailed (%s) is stale: %s", event.reason.value, exc)
        return
    booked_row.record(booked)
    log.warning(
        "calendar gave up on session %s of order %s (%s): %s",
        booked.id,
        event.order_id,
        event.reason.value,
        event.detail,
    )
    await ctx.record(
        SchedulingAbandoned(
            order_id=event.order_id,
            session_id=booked.id,
            mentor_id=booked.mentor_id,
            reason=event.reason,
            detail=event.detail,
        ),
        # One abandonment per session: once scheduled, a session never fails again, and until
        # then its escrow stays frozen, so a second final failure has nothing new to say.
        message_id=event_id(f"SchedulingAbandoned:{booked.id}"),
    )


EscrowEvent = EscrowFrozen | EscrowUnfrozen | EscrowRefundDue | EscrowRefunded | EscrowReleased

_ESCROW_STATUS: dict[type, EscrowStatus] = {
    EscrowFrozen: EscrowStatus.FROZEN,
    EscrowUnfrozen: EscrowStatus.HELD,
    EscrowRefundDue: EscrowStatus.REFUND_DUE,
    EscrowRefunded: EscrowStatus.REFUNDED,
    EscrowReleased: EscrowStatus.RELEASED,
}


async def record_escrow_status(event: EscrowEvent, ctx: MessageContext) -> None:
    """Payments moved the order's escrow: keep the status of the highest sequence heard of.

    An escrow event may be the first word of money for an order whose PaymentCompleted was
    never applied (it came after the order ended): its amounts then fill the empty ones, so the
    order view shows the escrow.
    """
    row = await ctx.session.scalar(
        select(OrderRow).where(OrderRow.id == event.order_id).with_for_update()
    )
    if row is None:
        log.warning("%s for unknown order %s", type(event).__name__, event.order_id)
        return
    escrow = row.escrow()
    if not escrow.observe(_ESCROW_STATUS[type(event)], event.sequence):
        log.info(
            "%s (sequence %d) for order %s is older than what is known (sequence %d)",
            type(event).__name__,
            event.sequence,
            row.id,
            escrow.sequence,
        )
        return
    row.record_escrow(escrow)
    if event.currency != row.currency:
        log.error(
            "%s for order %s is in %s, the order in %s: its amounts are not shown",
            type(event).__name__,
            row.id,
            event.currency,
            row.currency,
        )
        return
    if row.escrow_amount is None:
        row.escrow_amount = event.escrow_amount
    refund_amount = getattr(event, "refund_amount", None)
    if row.platform_fee is None and refund_amount is not None:
        # A refund is everything paid; the escrow is that less the platform's fee.
        row.platform_fee = max(refund_amount - row.escrow_amount, 0)


HANDLERS: dict[type, Handler] = {
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
