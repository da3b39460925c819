"""The orders service's use cases, one unit of work each.

- `OrderService`: booking a session (its Idempotency-Key included), reading an order, an admin's
  cancel, and what orders does when payments and calendar report back (each run in the
  consumer's transaction, whose inbox record commits with it).
- `MentorService`: registering mentors, their offerings, and an admin's link of a mentor to its
  identity-provider subject.

A use case's state changes, its events (through the outbox) and, for an admin's action, its
audit row commit together or not at all. An order and its session are locked together
(`repository.lock_order`, the order first, as everywhere), so a use case and a handler working on
one order take turns. Events arrive at least once and in any order, so a stale or repeated one is
logged and left alone; raising would only retry it into a dead letter. Events this service sends
about a fact carry an id derived from that fact (`event_id`), so recording one twice stores it
once. No outside system is called here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy.ext.asyncio import AsyncSession

from booking.contracts import (
    AdminAction,
    BookingRequested,
    CalendarBookingConfirmed,
    CalendarBookingFailed,
    EscrowFrozen,
    EscrowRefundDue,
    EscrowRefunded,
    EscrowReleased,
    EscrowUnfrozen,
    Event,
    MenteeContact,
    MentorIdentityLinked,
    MentorRegistered,
    OrderCancelled,
    OrderChanged,
    OrderConfirmed,
    OrderPaid,
    PaymentCompleted,
    PaymentFailed,
    PaymentInitiated,
    PaymentInitiationFailed,
    SchedulingAbandoned,
    SessionIssueDetected,
    SessionIssueKind,
    http,
)
from booking.contracts import Offering as OfferingSnapshot
from booking.orders import repository
from booking.orders.domain import (
    BookedSession,
    CurrencyMismatch,
    Escrow,
    EscrowStatus,
    Mentor,
    Money,
    Offering,
    Order,
    OrderStatus,
    PaymentStatus,
    SubjectTaken,
    cancel_booking,
    check_price,
    fail_unopened_payment,
    plan_session,
)
from booking.orders.repository import StoredOrder
from booking.runtime import metrics
from booking.runtime.audit import record_admin_action
from booking.runtime.auth import Identity, acts_as_mentor
from booking.runtime.clock import utcnow
from booking.runtime.context import correlated, current_correlation_id
from booking.runtime.db import Database, on_commit
from booking.runtime.domain import EventIds, IllegalTransition, InvalidMoney
from booking.runtime.outbox import Outbox, Recording
from booking.runtime.tables import MessagingTables

log = logging.getLogger(__name__)

# Namespace of the ids of the events orders sends (uuid5 of the fact they report), so that
# recording one fact twice stores it once.
_EVENTS = uuid.UUID("9c4f3a56-2be1-4d0b-8f43-6a1e0c7d5b21")


PAYMENT_NEVER_OPENED = "payment_never_opened"
"""OrderCancelled's reason when orders failed the order itself: no payment opened in time."""

# The message id of the event reporting a fact (e.g. "OrderCancelled:<order id>").
event_id = EventIds(_EVENTS)

# The booking funnel (booking_bookings_total, by outcome and reason), counted once the use case
# that reached the outcome commits (`on_commit`). Every pair is there from the start, at 0.
_BOOKINGS = metrics.Children(metrics.BOOKINGS)
for _outcome, _reason in (
    ("requested", ""),
    ("confirmed", ""),
    ("failed", "payment_failed"),
    ("failed", "payment_expired"),
    ("failed", PAYMENT_NEVER_OPENED),
    ("failed", "scheduling_abandoned"),
    ("cancelled", "payment_initiation_failed"),
    ("cancelled", "admin"),
):
    _BOOKINGS(_outcome, _reason)


class NoSuchOrder(Exception):
    """There is no order with this id."""


class NoSuchOffering(Exception):
    """There is no offering with this id."""


class IdempotencyKeyReused(Exception):
    """An Idempotency-Key already used with another request body."""


class IdempotencyKeyUnanswered(Exception):
    """An Idempotency-Key whose first request stored no answer (never written by this code)."""


class NoSuchMentor(Exception):
    """There is no mentor with this id."""


class NotTheMentor(Exception):
    """The caller may not act as this mentor (neither an admin nor the mentor)."""


@dataclass(frozen=True, slots=True)
class FirstAnswer:
    """What the first request sent with an Idempotency-Key was answered, to answer it again."""

    status: int
    body: dict[str, Any]


_ENDED = frozenset({OrderStatus.CANCELLED, OrderStatus.PAYMENT_FAILED})

EscrowEvent = EscrowFrozen | EscrowUnfrozen | EscrowRefundDue | EscrowRefunded | EscrowReleased

_ESCROW_STATUS: dict[type, EscrowStatus] = {
    EscrowFrozen: EscrowStatus.FROZEN,
    EscrowUnfrozen: EscrowStatus.HELD,
    EscrowRefundDue: EscrowStatus.REFUND_DUE,
    EscrowRefunded: EscrowStatus.REFUNDED,
    EscrowReleased: EscrowStatus.RELEASED,
}


class OrderService:
    def __init__(
        self,
        db: Database,
        outbox: Outbox,
        tables: MessagingTables,
        *,
        horizon: timedelta,
        changes_exchange: str,
    ) -> None:
        self.db = db
        self.outbox = outbox
        self.tables = tables
        self.horizon = horizon  # how far ahead a session may start (BOOKING_HORIZON_DAYS)
        # Where OrderChanged goes (ORDER_CHANGES_EXCHANGE): a fanout the gateways read.
        self.changes_exchange = changes_exchange

    # --- booking ------------------------------------------------------------------------------

    async def book(
        self,
        request: http.BookingCreate,
        *,
        mentee_id: str,
        idempotency_key: str | None,
        now: datetime,
    ) -> http.BookingAccepted | FirstAnswer:
        """The Order, its BookedSession and BookingRequested, in one transaction.

        The slot is the exclusion constraint's to guard: the insert either holds it or fails
        (`SlotTaken`), with no check before it to race. With an Idempotency-Key, the key is
        claimed first in the same transaction, so a second request with that key waits for the
        first to end and then gets what it got (`FirstAnswer`); a booking that fails leaves no
        key behind. Raises `NoSuchOffering`, `InvalidBooking` (the times), `SlotTaken`,
        `IdempotencyKeyReused` or `IdempotencyKeyUnanswered`.
        """
        fingerprint = _fingerprint(request)
        async with self.db.transaction() as session:
            if idempotency_key is not None:
                first = await repository.claim_key(
                    session, mentee_id, idempotency_key, fingerprint, now
                )
                if first is not None:
                    return _first_answer(first, idempotency_key, fingerprint)
            accepted = await self._book(session, request, mentee_id, now)
            if idempotency_key is not None:
                await repository.store_answer(
                    session, mentee_id, idempotency_key, 202, accepted.model_dump(mode="json")
                )
        return accepted

    async def _book(
        self,
        session: AsyncSession,
        request: http.BookingCreate,
        mentee_id: str,
        now: datetime,
    ) -> http.BookingAccepted:
        offering = await repository.offering(session, request.offering_id)
        if offering is None:
            raise NoSuchOffering(request.offering_id)
        end_at = plan_session(
            offering.duration_minutes, request.start_at, now, horizon=self.horizon
        )
        order = Order(
            id=uuid.uuid4(),
            mentee_id=mentee_id,
            mentor_id=offering.mentor_id,
            offering_id=offering.id,
            amount=offering.price,
            created_at=now,
            updated_at=now,
        )
        booked = BookedSession(
            id=uuid.uuid4(),
            order_id=order.id,
            mentor_id=order.mentor_id,
            start_at=request.start_at.astimezone(UTC),
            end_at=end_at.astimezone(UTC),
        )
        mentee = MenteeContact(
            first_name=request.mentee.first_name,
            last_name=request.mentee.last_name,
            email=request.mentee.email,
            phone=request.mentee.phone,
        )
        stored = StoredOrder(
            order=order,
            booked=booked,
            title=offering.title,
            mentee_email=mentee.email,
            # BookingRequested carries it; so will every later event about this order.
            correlation_id=current_correlation_id(),
            payment_status=None,
            platform_fee=None,
            escrow_amount=None,
            escrow=Escrow(),
            version=1,
        )
        await repository.add_booking(session, stored, mentee)
        requested = BookingRequested(
            order_id=order.id,
            session_id=booked.id,
            mentor_id=order.mentor_id,
            offering=OfferingSnapshot(
                offering_id=offering.id,
                title=offering.title,
                duration_minutes=offering.duration_minutes,
            ),
            amount=order.amount.amount,
            currency=order.amount.currency,
            mentee=mentee,
            start_at=booked.start_at,
            end_at=booked.end_at,
        )
        await self._record_changed(session, stored, (requested, uuid.uuid4()))
        on_commit(session, _BOOKINGS("requested", "").inc)
        return http.BookingAccepted(
            order_id=order.id, session_id=booked.id, status=order.status.value
        )

    # --- orders -------------------------------------------------------------------------------

    async def find(self, order_id: uuid.UUID) -> StoredOrder | None:
        """The order and its session, or None."""
        # One statement, no transaction: the order and its session from the same snapshot, in
        # one round trip. Clients poll this.
        async with self.db.single_statement() as session:
            return await repository.find_order(session, order_id)

    async def observe_oldest_pending(self) -> None:
        """Set booking_orders_oldest_pending_seconds (read on each scrape): how long the oldest
        order whose payment has not opened has waited. The sweeper fails those past
        PAYMENT_OPENING_TIMEOUT_MINUTES, so a value far past it means the flow is stuck."""
        async with self.db.single_statement() as session:
            oldest = await repository.oldest_pending_created_at(session)
        age = 0.0 if oldest is None else (utcnow() - oldest).total_seconds()
        metrics.OLDEST_PENDING_ORDER.set(max(0.0, age))

    async def fail_unopened_batch(
        self, now: datetime, opening_timeout: timedelta, limit: int
    ) -> tuple[int, list[StoredOrder]]:
        """The sweeper's unit of work: claim up to `limit` orders still pending since before
        `now - opening_timeout` (`FOR UPDATE SKIP LOCKED`: replicas never take the same one) and
        fail each whose payment never opened: payment_failed (`not_opened`), its slot freed,
        OrderCancelled (no admin) so payments never opens one for it, and SessionIssueDetected.
        Returns how many were claimed, and those failed."""
        failed: list[StoredOrder] = []
        async with self.db.transaction() as session:
            claimed = await repository.claim_unopened(session, now - opening_timeout, limit)
            for stored in claimed:
                order, booked = stored.order, stored.booked
                if not fail_unopened_payment(order, booked, now, opening_timeout):
                    continue
                stored.payment_status = PaymentStatus.NOT_OPENED
                await self._save(session, stored)
                minutes = opening_timeout.total_seconds() / 60
                with correlated(stored.correlation_id):
                    await self._record_cancelled(
                        session, stored, reason=PAYMENT_NEVER_OPENED, by=None
                    )
                    await self.outbox.record(
                        session,
                        SessionIssueDetected(
                            order_id=order.id,
                            session_id=booked.id,
                            kind=SessionIssueKind.PAYMENT_NEVER_OPENED,
                            detail=(
                                f"order {order.id}, booked at {order.created_at.isoformat()}, "
                                f"had no payment opened within {minutes:g} minutes: it failed "
                                f"and its slot ({booked.start_at.isoformat()}) was freed"
                            ),
                        ),
                        message_id=event_id(
                            f"SessionIssueDetected:{PAYMENT_NEVER_OPENED}:{order.id}"
                        ),
                    )
                on_commit(session, _BOOKINGS("failed", PAYMENT_NEVER_OPENED).inc)
                failed.append(stored)
        return len(claimed), failed

    async def _save(
        self,
        session: AsyncSession,
        stored: StoredOrder,
        reported: tuple[Event, uuid.UUID] | None = None,
    ) -> None:
        """Write the order back; if what its view shows changed (its version then grew), record
        OrderChanged with the view, in the same transaction, and `reported` (an event and its
        id) beside it, in the same statement."""
        changed = await repository.save_order(session, stored)
        await self._record_changed(session, stored, reported, changed=changed)

    async def _record_changed(
        self,
        session: AsyncSession,
        stored: StoredOrder,
        reported: tuple[Event, uuid.UUID] | None = None,
        *,
        changed: bool = True,
    ) -> None:
        """OrderChanged with the order as GET shows it, built from what the use case holds (no
        read again), to the order changes fanout; its id is the (order, version) fact's. With
        `reported`, to the events exchange, in one statement."""
        recordings: list[Recording] = []
        if changed:
            recordings.append(
                (
                    OrderChanged(order=order_view(stored)),
                    event_id(f"OrderChanged:{stored.order.id}:{stored.version}"),
                    self.changes_exchange,
                )
            )
        if reported is not None:
            recordings.append((*reported, None))
        await self.outbox.record_all(session, recordings)

    async def _record_cancelled(
        self, session: AsyncSession, stored: StoredOrder, *, reason: str, by: str | None
    ) -> None:
        """OrderCancelled, once per order whoever ended it (its id is the fact's)."""
        order = stored.order
        await self.outbox.record(
            session,
            OrderCancelled(
                order_id=order.id,
                session_id=stored.booked.id,
                mentor_id=order.mentor_id,
                reason=reason,
                by=by,
            ),
            message_id=event_id(f"OrderCancelled:{order.id}"),
        )

    async def cancel(
        self, order_id: uuid.UUID, *, by: str, reason: str, now: datetime
    ) -> StoredOrder:
        """An admin cancels an order: cancelled, its slot freed, OrderCancelled, audited.

        All in one transaction, under the order's lock, so a handler applying a payment or a
        calendar booking to the same order waits for it (and then finds it cancelled), or goes
        first. Payments freezes a paid order's escrow and calendar deletes the session's event
        on OrderCancelled. A repeat finds it cancelled and changes nothing: no event, no audit
        row. Raises `NoSuchOrder`, or `IllegalTransition` for an order whose payment failed.
        """
        async with self.db.transaction() as session:
            stored = await repository.lock_order(session, order_id)
            if stored is None:
                raise NoSuchOrder(order_id)
            order, booked = stored.order, stored.booked
            was = f"order {order.status.value}, session {booked.status.value}"
            if not cancel_booking(order, booked, now):
                return stored
            await self._save(session, stored)
            # The booking's trail: BookingRequested and every event since carry its id.
            with correlated(stored.correlation_id):
                await self._record_cancelled(session, stored, reason=reason, by=by)
                await record_admin_action(
                    session,
                    self.tables,
                    self.outbox,
                    action=AdminAction.CANCEL_ORDER,
                    by=by,
                    reason=reason,
                    at=now,
                    order_id=order.id,
                    session_id=booked.id,
                    detail=f"was {was}",
                )
            on_commit(session, _BOOKINGS("cancelled", "admin").inc)
        log.warning("order %s cancelled by %s (was %s): %s", order_id, by, was, reason)
        return stored

    # --- what payments reports ----------------------------------------------------------------

    async def record_payment_link(self, session: AsyncSession, event: PaymentInitiated) -> None:
        """The order awaits payment at the pay URL payments opened."""
        stored = await repository.lock_order(session, event.order_id)
        if stored is None:
            log.warning(
                "PaymentInitiated %s for unknown order %s", event.payment_ref, event.order_id
            )
            return
        order = stored.order
        try:
            order.awaiting_payment(event.payment_ref, event.pay_url, utcnow())
        except IllegalTransition as exc:
            # The order moved on before this arrived (paid first, cancelled): keep the ref and
            # link.
            log.info("PaymentInitiated %s after the order moved on: %s", event.payment_ref, exc)
            if order.payment_ref is None:
                order.payment_ref = event.payment_ref
            if order.pay_url is None and order.payment_ref == event.payment_ref:
                order.pay_url = event.pay_url
        else:
            if stored.payment_status is None:
                stored.payment_status = PaymentStatus.PENDING
        await self._save(session, stored)

    async def cancel_unpayable_order(
        self, session: AsyncSession, event: PaymentInitiationFailed
    ) -> None:
        """No payment could be opened: the order is cancelled and the slot freed."""
        stored = await repository.lock_order(session, event.order_id)
        if stored is None:
            log.warning("PaymentInitiationFailed for unknown order %s", event.order_id)
            return
        order, booked = stored.order, stored.booked
        if order.status is not OrderStatus.PENDING:
            # Awaiting payment means a payment is open and payable: its own end (paid or
            # expired) decides. Anything later has already been decided.
            log.warning(
                "PaymentInitiationFailed for order %s, which is %s: left as it is",
                order.id,
                order.status.value,
            )
            return
        order.cancel(utcnow())
        booked.cancel()
        stored.payment_status = PaymentStatus.INITIATION_FAILED
        await self._save(session, stored)
        on_commit(session, _BOOKINGS("cancelled", "payment_initiation_failed").inc)
        log.info("order %s cancelled: no payment could be opened (%s)", order.id, event.reason)

    async def apply_payment(self, session: AsyncSession, event: PaymentCompleted) -> None:
        """Money arrived: paid in full -> paid, OrderPaid; short -> stays unpaid, an issue raised.

        Money for an order this service does not know, or one that has ended, is never dropped:
        it raises SessionIssueDetected for the admins.
        """
        stored = await repository.lock_order(session, event.order_id)
        if stored is None:
            await self._raise_issue(
                session,
                event,
                None,
                SessionIssueKind.PAYMENT_FOR_UNKNOWN_ORDER,
                f"payment {event.payment_ref} brought {event.amount_paid} {event.currency} "
                f"(minor units) for order {event.order_id}, which the orders service does not "
                f"know",
            )
            return
        order, booked = stored.order, stored.booked
        if order.status in _ENDED:
            await self._raise_issue(
                session,
                event,
                booked.id,
                SessionIssueKind.PAYMENT_FOR_CANCELLED_ORDER,
                f"payment {event.payment_ref} brought {event.amount_paid} {event.currency} "
                f"(minor units) for order {order.id}, which is {order.status.value}; the money "
                f"is held and must be refunded or the booking restored",
            )
            return
        if (
            stored.payment_status is PaymentStatus.COMPLETED
            and order.payment_ref == event.payment_ref
            and order.amount_paid >= event.amount_paid
        ):
            log.info(
                "PaymentCompleted %s for order %s already applied", event.payment_ref, order.id
            )
            return
        try:
            underpayment = order.set_amount_paid(event.amount_paid, event.currency, utcnow())
        except (IllegalTransition, CurrencyMismatch) as exc:
            # Money that cannot be applied is never dropped silently: the admins hear of it.
            kind = (
                SessionIssueKind.CURRENCY_MISMATCH
                if isinstance(exc, CurrencyMismatch)
                else SessionIssueKind.PAYMENT_FOR_PAID_ORDER
            )
            await self._raise_issue(
                session, event, booked.id, kind, f"payment {event.payment_ref} not applied: {exc}"
            )
            return
        except InvalidMoney as exc:
            # A total below the one recorded: an older report of the same payment arriving late.
            log.warning(
                "stale PaymentCompleted %s for order %s: %s", event.payment_ref, order.id, exc
            )
            return
        order.payment_ref = event.payment_ref
        stored.payment_status = PaymentStatus.COMPLETED
        stored.platform_fee = event.platform_fee
        stored.escrow_amount = event.escrow_amount
        if underpayment is not None:
            await self._save(session, stored)
            await self._raise_issue(
                session, event, booked.id, SessionIssueKind.UNDERPAYMENT, underpayment.detail
            )
            return
        stored.escrow.hold_for_payment()
        try:
            booked.await_calendar()
        except IllegalTransition as exc:
            await self._save(session, stored)
            log.error(
                "order %s paid, but its session cannot wait for the calendar: %s", order.id, exc
            )
            return
        paid = OrderPaid(
            order_id=order.id,
            session_id=booked.id,
            mentor_id=order.mentor_id,
            mentee_email=stored.mentee_email,
            title=stored.title,
            start_at=booked.start_at,
            end_at=booked.end_at,
        )
        await self._save(session, stored, (paid, event_id(f"OrderPaid:{order.id}")))

    async def _raise_issue(
        self,
        session: AsyncSession,
        event: PaymentCompleted,
        session_id: uuid.UUID | None,
        kind: SessionIssueKind,
        detail: str,
    ) -> None:
        log.warning("order %s: %s: %s", event.order_id, kind.value, detail)
        fact = f"SessionIssueDetected:{kind.value}:{event.order_id}:{event.payment_ref}"
        await self.outbox.record(
            session,
            SessionIssueDetected(
                order_id=event.order_id, session_id=session_id, kind=kind, detail=detail
            ),
            message_id=event_id(f"{fact}:{event.amount_paid}"),
        )

    async def fail_order_payment(self, session: AsyncSession, event: PaymentFailed) -> None:
        """The payment failed or expired: the order is payment_failed and the slot freed."""
        stored = await repository.lock_order(session, event.order_id)
        if stored is None:
            log.warning("PaymentFailed %s for unknown order %s", event.payment_ref, event.order_id)
            return
        order, booked = stored.order, stored.booked
        if order.payment_ref is not None and order.payment_ref != event.payment_ref:
            log.warning(
                "PaymentFailed %s for order %s, whose payment is %s: left as it is",
                event.payment_ref,
                order.id,
                order.payment_ref,
            )
            return
        try:
            order.fail_payment(utcnow())
            booked.cancel()
        except IllegalTransition as exc:
            log.warning("PaymentFailed %s is stale: %s", event.payment_ref, exc)
            return
        order.payment_ref = event.payment_ref
        stored.payment_status = PaymentStatus(event.reason.value)
        await self._save(session, stored)
        on_commit(session, _BOOKINGS("failed", f"payment_{event.reason.value}").inc)

    async def record_escrow_status(self, session: AsyncSession, event: EscrowEvent) -> None:
        """Payments moved the order's escrow: keep the status of the highest sequence heard of.

        An escrow event may be the first word of money for an order whose PaymentCompleted was
        never applied (it came after the order ended): its amounts then fill the empty ones, so
        the order view shows the escrow.
        """
        # Escrow events never change the session, but the view shows it: it is locked too, so
        # that it is read as it stands after whatever held the order (repository.lock_order).
        stored = await repository.lock_order(session, event.order_id)
        if stored is None:
            log.warning("%s for unknown order %s", type(event).__name__, event.order_id)
            return
        if not stored.escrow.observe(_ESCROW_STATUS[type(event)], event.sequence):
            log.info(
                "%s (sequence %d) for order %s is older than what is known (sequence %d)",
                type(event).__name__,
                event.sequence,
                event.order_id,
                stored.escrow.sequence,
            )
            return
        currency = stored.order.amount.currency
        if event.currency != currency:
            await self._save(session, stored)
            log.error(
                "%s for order %s is in %s, the order in %s: its amounts are not shown",
                type(event).__name__,
                event.order_id,
                event.currency,
                currency,
            )
            return
        escrow_amount = stored.escrow_amount
        if escrow_amount is None:
            escrow_amount = stored.escrow_amount = event.escrow_amount
        refund_amount = getattr(event, "refund_amount", None)
        if stored.platform_fee is None and refund_amount is not None:
            # A refund is everything paid; the escrow is that less the platform's fee.
            stored.platform_fee = max(refund_amount - escrow_amount, 0)
        await self._save(session, stored)

    # --- what calendar reports ----------------------------------------------------------------

    async def confirm_session(self, session: AsyncSession, event: CalendarBookingConfirmed) -> None:
        """The session is in the mentor's calendar: scheduled with its Meet link, order confirmed.

        The order's confirmation is announced (OrderConfirmed) so that payments holds its escrow
        for release after the session, or unfreezes it when an admin's retry of a scheduling
        that had been abandoned succeeded. A cancelled session is never scheduled again.
        """
        stored = await repository.lock_order(session, event.order_id)
        if stored is None or stored.booked.id != event.session_id:
            log.warning(
                "CalendarBookingConfirmed for unknown session %s of order %s",
                event.session_id,
                event.order_id,
            )
            return
        order, booked = stored.order, stored.booked
        try:
            booked.schedule(event.event_id, event.meet_link)
        except IllegalTransition as exc:
            log.warning("CalendarBookingConfirmed %s not applied: %s", event.event_id, exc)
            return
        if order.status is not OrderStatus.PAID:
            await self._save(session, stored)
            if order.status is not OrderStatus.CONFIRMED:
                log.warning(
                    "session %s scheduled for order %s (%s)", booked.id, order.id, order.status
                )
            return
        order.confirm(utcnow())
        confirmed = OrderConfirmed(
            order_id=order.id,
            session_id=booked.id,
            mentor_id=order.mentor_id,
            end_at=booked.end_at,
        )
        await self._save(session, stored, (confirmed, event_id(f"OrderConfirmed:{order.id}")))
        on_commit(session, _BOOKINGS("confirmed", "").inc)

    async def record_scheduling_failure(
        self, session: AsyncSession, event: CalendarBookingFailed
    ) -> None:
        """The calendar could not book the session.

        Not final: the calendar tries again on its schedule (or when the mentor reconnects), so
        the session keeps waiting as it is. Final: the session is scheduling_failed (it keeps its
        slot: it is paid for, and an admin may retry it) and SchedulingAbandoned tells payments
        to freeze the escrow. A final failure for a session scheduled or cancelled since is
        stale.
        """
        stored = await repository.lock_order(session, event.order_id)
        if stored is None or stored.booked.id != event.session_id:
            log.warning(
                "CalendarBookingFailed for unknown session %s of order %s",
                event.session_id,
                event.order_id,
            )
            return
        if not event.final:
            log.info(
                "calendar booking of session %s failed (%s, attempt %d); next attempt %s",
                event.session_id,
                event.reason.value,
                event.attempts,
                event.next_attempt_at.isoformat() if event.next_attempt_at else "when reconnected",
            )
            return
        booked = stored.booked
        try:
            booked.fail_scheduling()
        except IllegalTransition as exc:
            log.warning("final CalendarBookingFailed (%s) is stale: %s", event.reason.value, exc)
            return
        await self._save(session, stored)
        on_commit(session, _BOOKINGS("failed", "scheduling_abandoned").inc)
        log.warning(
            "calendar gave up on session %s of order %s (%s): %s",
            booked.id,
            event.order_id,
            event.reason.value,
            event.detail,
        )
        await self.outbox.record(
            session,
            SchedulingAbandoned(
                order_id=event.order_id,
                session_id=booked.id,
                mentor_id=booked.mentor_id,
                reason=event.reason,
                detail=event.detail,
            ),
            # One abandonment per session: once scheduled, a session never fails again, and
            # until then its escrow stays frozen, so a second final failure has nothing new to
            # say.
            message_id=event_id(f"SchedulingAbandoned:{booked.id}"),
        )


class MentorService:
    """Registering mentors, their offerings, and linking mentors to their identity-provider
    subject.

    A subject acts as one mentor: the unique constraint decides (`SubjectTaken`), not a check
    before it, and a subject that is another mentor's id is refused too (that mentor's own
    tokens carry their id as `sub`).
    """

    def __init__(
        self,
        db: Database,
        outbox: Outbox,
        tables: MessagingTables,
        *,
        max_price_major_units: int,
    ) -> None:
        self.db = db
        self.outbox = outbox
        self.tables = tables
        # The most an offering may cost (OFFERING_MAX_PRICE_MAJOR_UNITS).
        self.max_price_major_units = max_price_major_units

    async def register(self, request: http.MentorCreate, *, now: datetime) -> Mentor:
        """The mentor and its MentorRegistered, in one transaction. Raises `SubjectTaken`."""
        mentor = Mentor(
            id=uuid.uuid4(),
            name=request.name,
            email=request.email,
            timezone=request.timezone,
            identity_subject=request.identity_subject,
            created_at=now,
        )
        subject = mentor.identity_subject
        async with self.db.transaction() as session:
            if subject is not None:
                await _refuse_another_mentors_id(session, subject, mentor.id)
            await repository.add_mentor(session, mentor)
            await self.outbox.record(
                session,
                MentorRegistered(
                    mentor_id=mentor.id,
                    name=mentor.name,
                    email=mentor.email,
                    timezone=mentor.timezone,
                    identity_subject=subject,
                ),
            )
        return mentor

    async def get(self, mentor_id: uuid.UUID) -> Mentor:
        """The mentor. Raises `NoSuchMentor`."""
        async with self.db.transaction() as session:
            mentor = await repository.mentor(session, mentor_id)
        if mentor is None:
            raise NoSuchMentor(mentor_id)
        return mentor

    async def add_offering(
        self, mentor_id: uuid.UUID, request: http.OfferingCreate, *, by: Identity, now: datetime
    ) -> Offering:
        """A new offering of the mentor's, added by the mentor or an admin.

        Raises `InvalidOffering` (its price is above the platform's maximum), then
        `NotTheMentor` before `NoSuchMentor`: whether another mentor exists is not a mentor's
        to learn.
        """
        price = Money(request.price.amount, request.price.currency)
        check_price(price, self.max_price_major_units)
        async with self.db.transaction() as session:
            mentor = await repository.mentor(session, mentor_id)
            if not acts_as_mentor(by, mentor_id, mentor.identity_subject if mentor else None):
                raise NotTheMentor(mentor_id)
            if mentor is None:
                raise NoSuchMentor(mentor_id)
            offering = Offering(
                id=uuid.uuid4(),
                mentor_id=mentor_id,
                title=request.title,
                duration_minutes=request.duration_minutes,
                price=price,
                created_at=now,
            )
            repository.add_offering(session, offering)
        return offering

    async def offerings(self, mentor_id: uuid.UUID) -> list[Offering]:
        """The mentor's offerings, oldest first. Raises `NoSuchMentor`."""
        async with self.db.transaction() as session:
            if await repository.mentor(session, mentor_id) is None:
                raise NoSuchMentor(mentor_id)
            return await repository.offerings_of(session, mentor_id)

    async def link_identity(
        self, mentor_id: uuid.UUID, subject: str, *, by: str, reason: str, now: datetime
    ) -> Mentor:
        """An admin links the mentor to `subject` (replacing any other): MentorIdentityLinked
        and the audit row, in one transaction under the mentor's lock. A repeat (the subject is
        the mentor's already) changes nothing: no event, no audit row. Raises `NoSuchMentor` or
        `SubjectTaken`."""
        async with self.db.transaction() as session:
            mentor = await repository.mentor(session, mentor_id, lock=True)
            if mentor is None:
                raise NoSuchMentor(mentor_id)
            if mentor.identity_subject == subject:
                return mentor
            await _refuse_another_mentors_id(session, subject, mentor_id)
            previous = mentor.link_identity(subject)
            sequence = mentor.identity_sequence
            await repository.save_mentor(session, mentor)
            await self.outbox.record(
                session,
                MentorIdentityLinked(
                    mentor_id=mentor_id,
                    identity_subject=subject,
                    previous_subject=previous,
                    by=by,
                    reason=reason,
                    linked_at=now,
                    sequence=sequence,
                ),
                message_id=event_id(f"MentorIdentityLinked:{mentor_id}:{sequence}"),
            )
            await record_admin_action(
                session,
                self.tables,
                self.outbox,
                action=AdminAction.LINK_MENTOR_IDENTITY,
                by=by,
                reason=reason,
                at=now,
                detail=f"mentor {mentor_id}: identity subject {subject!r}, was {previous!r}",
            )
        log.warning(
            "mentor %s linked to identity subject %r by %s (was %r): %s",
            mentor_id,
            subject,
            by,
            previous,
            reason,
        )
        return mentor


async def _refuse_another_mentors_id(
    session: AsyncSession, subject: str, mentor_id: uuid.UUID
) -> None:
    """`SubjectTaken` if `subject` is the id of another mentor: that mentor's tokens (whose `sub`
    is their id) would act as this one too."""
    try:
        named = uuid.UUID(subject)
    except ValueError:
        return
    if named != mentor_id and await repository.mentor(session, named) is not None:
        raise SubjectTaken(subject)


def _first_answer(first: repository.FirstRequest, key: str, fingerprint: str) -> FirstAnswer:
    """What to answer a repeat of the request that claimed `key`."""
    if first.fingerprint != fingerprint:
        raise IdempotencyKeyReused(key)
    if first.response_status is None or first.response_body is None:
        # Not written by this code (a claim always stores its answer in the same transaction).
        raise IdempotencyKeyUnanswered(key)
    return FirstAnswer(first.response_status, first.response_body)


def _fingerprint(request: http.BookingCreate) -> str:
    """What makes two requests "the same": the parsed body, with the start as a UTC instant."""
    canonical = request.model_dump(mode="json")
    canonical["start_at"] = request.start_at.astimezone(UTC).isoformat()
    encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()


def order_view(stored: StoredOrder) -> http.Order:
    """The order as GET /api/orders/{id} shows it (and OrderChanged carries it)."""
    order, booked = stored.order, stored.booked

    def money(amount: int) -> http.Money:
        return http.Money(amount=amount, currency=order.amount.currency)

    payment = None
    if stored.payment_status is not None:
        payment = http.PaymentView(
            ref=order.payment_ref, pay_url=order.pay_url, status=stored.payment_status.value
        )
    escrow = None
    if stored.platform_fee is not None and stored.escrow_amount is not None:
        escrow = http.EscrowView(
            platform_fee=money(stored.platform_fee),
            escrow_amount=money(stored.escrow_amount),
            # The domain's escrow statuses are named as the contract's.
            status=cast("http.EscrowStatus | None", stored.escrow.status),
        )
    return http.Order(
        id=order.id,
        status=order.status.value,
        amount=money(order.amount.amount),
        amount_paid=money(order.amount_paid),
        payment=payment,
        session=http.SessionView(
            id=booked.id,
            status=booked.status.value,
            start_at=booked.start_at,
            end_at=booked.end_at,
            meet_link=booked.meet_link,
            calendar_event_id=booked.calendar_event_id,
        ),
        escrow=escrow,
        version=stored.version,
    )
