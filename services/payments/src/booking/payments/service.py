"""The payments service's units of work: opening and initiating a payment at Konnect, applying
Konnect's verdict, answering Konnect's webhook, the escrow that follows the session
(OrderConfirmed, SchedulingAbandoned, OrderCancelled, the release when due, an admin's
settlement), and the claims the sweeper works through. Their SQL is the repository's.

Konnect is never called inside an open transaction: a step claims or reads what it needs and
commits, calls Konnect, then records the result and its events in a transaction of its own,
under the order's lock and the row's, so a duplicate or a concurrent step finds the work done
and does nothing. Events carry the booking's correlation id, stored with the payment, and ids
derived from the fact they record: recording one twice stores it once.

The rules of the escrow are docs/recovery.md's (sections 4 and 5); the domain keeps them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession

from booking.contracts import (
    UNKNOWN_REF_SAMPLE,
    AdminAction,
    BookingRequested,
    EscrowFrozen,
    EscrowRefundDue,
    EscrowRefunded,
    EscrowReleased,
    EscrowUnfrozen,
    Event,
    OrderCancelled,
    OrderConfirmed,
    PaymentAnomalyDetected,
    PaymentAnomalyKind,
    PaymentCompleted,
    PaymentFailed,
    PaymentFailureReason,
    PaymentInitiated,
    PaymentInitiationFailed,
    SchedulingAbandoned,
)
from booking.payments import repository as repo
from booking.payments.domain import (
    AlreadyApplied,
    EscrowHold,
    EscrowStatus,
    FreezeKind,
    KonnectVerdict,
    Lookup,
    LookupBudget,
    MalformedKonnectPayment,
    MoneyFate,
    MoneyReceived,
    Payment,
    PaymentState,
    RefundCause,
    ReleaseScheduling,
    Settlement,
    UnknownRefReport,
    UnknownRefTally,
)
from booking.payments.konnect import (
    KonnectClient,
    KonnectError,
    KonnectUnauthorized,
    KonnectUnavailable,
    PaymentRequest,
    return_url,
)
from booking.payments.repository import (
    Booking,
    OrderEnding,
    PaymentOfRef,
    PaymentToCheck,
    StoredHold,
    StoredPayment,
)
from booking.payments.settings import PaymentsSettings
from booking.runtime import metrics, tracing
from booking.runtime.audit import record_admin_action
from booking.runtime.auth import issue_order_token
from booking.runtime.clock import utcnow
from booking.runtime.context import correlated
from booking.runtime.db import Database, on_commit
from booking.runtime.domain import EventIds, IllegalTransition
from booking.runtime.outages import describe, is_unreachable
from booking.runtime.outbox import Outbox

log = logging.getLogger(__name__)

# Events about one payment get ids derived from it: recording one twice stores it once.
_EVENTS = uuid.UUID("0b8a1f6e-3c1d-4e55-9a0e-5d7c2f4b9e21")

# The longest reason an escrow keeps from an event (a final scheduling failure's detail may be
# a whole stack trace).
_REASON_CHARS = 1000

SettlementAction = Literal["release", "refund", "refunded"]

# Webhooks refused a lookup are logged at most once per this many seconds (with how many).
_SAY_EVERY = 10.0


event_id = EventIds(_EVENTS)


def _money(amount: int, currency: str) -> str:
    return f"{amount} {currency} (minor units)"


def _clip(reason: str) -> str:
    return reason if len(reason) <= _REASON_CHARS else reason[: _REASON_CHARS - 3] + "..."


def _ref(payment: Payment) -> str:
    """The Konnect ref of a payment Konnect has spoken of: it opened it, so it has one."""
    assert payment.payment_ref is not None, f"payment {payment.id} was never opened at Konnect"
    return payment.payment_ref


class UnknownPaymentRef(Exception):
    """No payment of ours has this ref (an anomaly was raised)."""


class KonnectCannotBeAsked(Exception):
    """Konnect could not be asked about a payment, or its answer could not be read."""


class LookupsSpent(Exception):
    """Webhooks have used their share of Konnect lookups for now: `retry_after` seconds until
    one is free again (`math.inf` when webhooks have no share)."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(f"webhook lookups spent for {retry_after:.1f}s")


class NoEscrow(Exception):
    """The order has no escrow: nothing is held or owed for it (unpaid, or underpaid so far)."""

    def __init__(self, order_id: uuid.UUID) -> None:
        self.order_id = order_id
        super().__init__(f"order {order_id} has no escrow")


@dataclass(frozen=True, slots=True)
class WebhookAnswer:
    payment_ref: str
    status: str


# An admin's decision on an escrow: the domain's move and how the audit trail names it.
_SETTLEMENTS: dict[str, AdminAction] = {
    "release": AdminAction.RELEASE_ESCROW,
    "refund": AdminAction.REFUND_ESCROW,
    "refunded": AdminAction.RECORD_REFUND,
}


# Payments by outcome (booking_payments_total), counted once the use case that reached the
# outcome commits (`on_commit`). The usual pairs are there from the start, at 0.
_PAYMENTS = metrics.Children(metrics.PAYMENTS)
for _outcome, _reason in (
    ("initiated", ""),
    ("initiation_failed", "konnect_unavailable"),
    ("initiation_failed", "konnect_unauthorized"),
    ("initiation_failed", "konnect_refused"),
    ("completed", ""),
    ("completed", "overpaid"),
    ("underpaid", ""),
    ("expired", ""),
):
    _PAYMENTS(_outcome, _reason)


_SETTLED = {
    MoneyFate.HELD: ("completed", ""),
    MoneyFate.OVERPAID: ("completed", "overpaid"),
    MoneyFate.UNDERPAID: ("underpaid", ""),
}


class PaymentService:
    def __init__(
        self,
        *,
        db: Database,
        outbox: Outbox,
        konnect: KonnectClient,
        settings: PaymentsSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.outbox = outbox
        self.konnect = konnect
        self.settings = settings
        self.lease = timedelta(seconds=settings.initiation_lease_seconds)
        self.release_delay = timedelta(minutes=settings.escrow_release_delay_minutes)
        # What webhooks may cost: per process, like the rate of requests each replica serves.
        self.clock = clock
        self.lookups = LookupBudget(
            settings.konnect_lookups_per_minute, settings.konnect_webhook_lookup_share, clock()
        )
        self.unknown_refs = UnknownRefTally(
            timedelta(seconds=settings.unknown_ref_report_interval_seconds), UNKNOWN_REF_SAMPLE
        )
        self._asking: dict[str, _Asking] = {}
        self._refused = 0
        self._refused_said_at: float | None = None

    async def _record(self, session: AsyncSession, event: Event, message_id: uuid.UUID) -> None:
        await self.outbox.record(session, event, message_id=message_id)

    # -- opening and initiation ------------------------------------------------------------

    async def open_payment(
        self, session: AsyncSession, event: BookingRequested, correlation_id: str
    ) -> uuid.UUID | None:
        """Open the order's payment (`initiating`) in the caller's transaction; its id, or None
        when there is nothing to initiate.

        Exactly one payment per order, however often BookingRequested arrives and under
        whatever message ids: the unique order_id decides, not a check. None is opened for an
        order that ended first (OrderCancelled came before): the order's lock makes whichever
        of the two comes second see the other. The domain checks the amount and the currency
        before anything is stored.
        """
        await repo.lock_order(session, event.order_id)
        payment = Payment.opened(
            id=uuid.uuid4(),
            order_id=event.order_id,
            amount=event.amount,
            currency=event.currency,
            now=utcnow(),
        )
        booking = Booking(
            session_id=event.session_id,
            mentor_id=event.mentor_id,
            session_end_at=event.end_at,
            title=event.offering.title,
            mentee_first_name=event.mentee.first_name,
            mentee_last_name=event.mentee.last_name,
            mentee_email=event.mentee.email,
            mentee_phone=event.mentee.phone,
            correlation_id=correlation_id,
            # The span handling BookingRequested: what later comes of the payment joins it.
            traceparent=tracing.current_headers()[0],
        )
        opening = await repo.add_payment_unless_ended(session, payment, booking)
        if opening.ending is not None:
            log.info(
                "order %s ended (%s) before its payment was opened: none is",
                event.order_id,
                opening.ending.reason,
            )
            return None
        if not opening.stored:
            return None  # the order's payment was opened before
        return payment.id

    async def initiate(self, payment_id: uuid.UUID, now: datetime | None = None) -> None:
        """Initiate a payment just opened, unless another replica holds it (the fast path)."""
        now = now or utcnow()
        async with self.db.single_statement() as session:
            claimed = await repo.claim_initiation(session, payment_id, now, now + self.lease)
        if claimed is not None:
            await self.initiate_claimed(claimed)

    async def claim_lapsed_initiations(
        self, now: datetime, *, created_before: datetime, limit: int
    ) -> list[StoredPayment]:
        """Take the lease of up to `limit` payments left `initiating` (a replica crashed before
        or during its Konnect call): their lease lapsed, or nobody took one and they were
        opened before `created_before`. Another replica's are skipped."""
        async with self.db.transaction() as session:
            return await repo.claim_lapsed_initiations(
                session, now, created_before=created_before, until=now + self.lease, limit=limit
            )

    async def initiate_claimed(self, claimed: StoredPayment) -> PaymentState:
        """Call Konnect init for a payment this replica holds the lease of; record the result.

        Runs outside any transaction. A crash before the result is recorded leaves the lease to
        lapse, and the sweeper initiates the payment again: the first Konnect payment was never
        shown to anyone, so it is a harmless orphan.
        """
        payment, booking = claimed.payment, claimed.booking
        # The payer comes back to the order's page, which the token lets them follow unsigned.
        token = issue_order_token(
            self.settings.order_link_key,
            payment.order_id,
            self.settings.order_link_ttl_hours * 3600,
        )
        request = PaymentRequest(
            order_id=payment.order_id,
            amount=payment.amount,
            currency=payment.currency,
            description=booking.title,
            first_name=booking.mentee_first_name,
            last_name=booking.mentee_last_name,
            email=booking.mentee_email,
            phone=booking.mentee_phone,
            lifespan_minutes=self.settings.konnect_payment_lifespan_minutes,
            webhook_url=self.settings.konnect_webhook_url or "",
            success_url=return_url(
                self.settings.konnect_success_url or "", payment.order_id, "success", token
            ),
            fail_url=return_url(
                self.settings.konnect_fail_url or "", payment.order_id, "failed", token
            ),
        )
        with (
            correlated(booking.correlation_id),
            tracing.joined(booking.traceparent, "initiate payment"),
        ):
            try:
                initiated = await self.konnect.init_payment(request)
            except KonnectUnavailable as error:
                return await self._initiation_failed(payment.id, "konnect_unavailable", str(error))
            except KonnectUnauthorized as error:
                detail = f"Konnect refused our API key (check KONNECT_API_KEY): {error.message}"
                return await self._initiation_failed(payment.id, "konnect_unauthorized", detail)
            except KonnectError as error:
                return await self._initiation_failed(payment.id, "konnect_refused", error.message)
            return await self._initiated(
                payment.id, initiated.payment_ref, initiated.pay_url, now=utcnow()
            )

    async def _initiated(
        self, payment_id: uuid.UUID, payment_ref: str, pay_url: str, *, now: datetime
    ) -> PaymentState:
        # The payer may pay until Konnect's own expiry, which counts from its answer; ours
        # counts from the same moment or later, so we never end a payment Konnect still takes.
        expires_at = now + timedelta(minutes=self.settings.konnect_payment_lifespan_minutes)
        async with self.db.transaction() as session:
            payment = (await repo.locked_payment(session, payment_id)).payment
            if payment.status is not PaymentState.INITIATING:
                # Settled elsewhere: another replica, or the order ended while Konnect answered.
                log.warning(
                    "payment %s of order %s was settled elsewhere (%s): Konnect payment %s is an "
                    "orphan nobody will see",
                    payment_id,
                    payment.order_id,
                    payment.status,
                    payment_ref,
                )
                return payment.status
            payment.initiated(payment_ref, pay_url, expires_at, now)
            await repo.save_payment(session, payment, lease_ended=True)
            on_commit(session, _PAYMENTS("initiated", "").inc)
            await self._record(
                session,
                PaymentInitiated(
                    order_id=payment.order_id,
                    payment_ref=payment_ref,
                    pay_url=pay_url,
                    expires_at=expires_at,
                ),
                event_id("initiated", payment_id),
            )
        log.info("payment %s of order %s opened at Konnect", payment_ref, payment.order_id)
        return payment.status

    async def _initiation_failed(
        self, payment_id: uuid.UUID, reason: str, detail: str
    ) -> PaymentState:
        now = utcnow()
        async with self.db.transaction() as session:
            payment = (await repo.locked_payment(session, payment_id)).payment
            if payment.status is not PaymentState.INITIATING:
                return payment.status
            payment.initiation_failed(now)
            await repo.save_payment(session, payment, lease_ended=True)
            on_commit(session, _PAYMENTS("initiation_failed", reason).inc)
            await self._record(
                session,
                PaymentInitiationFailed(order_id=payment.order_id, reason=reason, detail=detail),
                event_id("initiation_failed", payment_id),
            )
        log.error("Konnect would not open a payment for order %s: %s", payment.order_id, detail)
        return payment.status

    # -- Konnect's verdict -----------------------------------------------------------------

    async def apply_verdict(
        self, payment_id: uuid.UUID, order_id: uuid.UUID, verdict: KonnectVerdict, now: datetime
    ) -> PaymentState:
        """Apply what Konnect says of a payment, once, under the order's lock and the row's.

        Used by the webhook and by the sweeper. A concurrent duplicate waits for the locks, then
        finds the verdict applied and changes nothing. Whether the order ended without its
        payment is read under the same lock, so money and an ending never miss each other.
        """
        async with self.db.transaction() as session:
            await repo.lock_order(session, order_id)
            stored, ending = await repo.locked_payment_and_ending(session, payment_id)
            payment = stored.payment
            with correlated(stored.booking.correlation_id):
                settlement = payment.apply_verdict(
                    verdict,
                    self.settings.platform_fee_rate,
                    now,
                    order_ended=ending is not None,
                )
                if settlement.changed:
                    await repo.save_payment(session, payment, checked_at=now)
                else:
                    await repo.mark_checked(session, payment_id, now)
                await self._record_settlement(session, stored, settlement, ending, now)
        return payment.status

    async def _record_settlement(
        self,
        session: AsyncSession,
        stored: StoredPayment,
        settlement: Settlement,
        ending: OrderEnding | None,
        now: datetime,
    ) -> None:
        payment = stored.payment
        ref = payment.payment_ref
        if settlement.currency_mismatch is not None:
            await self._anomaly(
                session,
                payment,
                PaymentAnomalyKind.CURRENCY_MISMATCH,
                str(settlement.currency_mismatch),
            )
            return
        if settlement.expired:
            on_commit(session, _PAYMENTS("expired", "").inc)
            await self._record(
                session,
                PaymentFailed(
                    order_id=payment.order_id,
                    payment_ref=_ref(payment),
                    reason=PaymentFailureReason.EXPIRED,
                ),
                event_id("failed", payment.id),
            )
            log.info(
                "payment %s of order %s expired with %s paid",
                ref,
                payment.order_id,
                payment.amount_paid or 0,
            )
        money, fate = settlement.money, settlement.fate
        if fate in (MoneyFate.HELD, MoneyFate.OVERPAID, MoneyFate.UNDERPAID):
            assert money is not None
            await self._completed(session, payment, money)
            on_commit(session, _PAYMENTS(*_SETTLED[fate]).inc)
        if fate is MoneyFate.HELD or fate is MoneyFate.OVERPAID:
            assert money is not None
            await self._hold(session, stored, money, now)
        elif fate is MoneyFate.UNDERPAID:
            assert money is not None
            await self._anomaly(
                session,
                payment,
                PaymentAnomalyKind.UNDERPAYMENT,
                f"payment {ref} of order {payment.order_id} reached "
                f"{_money(money.amount_paid, money.currency)} of the {money.amount} due: the "
                "order stays unpaid; the payer may pay the rest until the payment expires "
                f"({payment.expires_at.isoformat() if payment.expires_at else 'no expiry'}), "
                "after which what was paid is owed back.",
                money.amount_paid,
            )
        elif fate is MoneyFate.UNDERPAID_FOR_ENDED_ORDER:
            assert money is not None and ending is not None
            await self._anomaly(
                session,
                payment,
                PaymentAnomalyKind.PAYMENT_FOR_CANCELLED_ORDER,
                f"Critical: {_money(money.amount_paid, money.currency)} arrived for payment {ref} "
                f"of order {payment.order_id}, which had ended ({ending.reason}). The payment is "
                "still open; what it holds is owed back to the mentee once it ends.",
                money.amount_paid,
            )
        elif fate is MoneyFate.REFUND_DUE:
            assert settlement.refund_cause is not None
            await self._owe_back(session, stored, settlement.refund_cause, money, ending, now)

    async def _completed(
        self, session: AsyncSession, payment: Payment, money: MoneyReceived
    ) -> None:
        """PaymentCompleted with the payment's total so far: orders pays the order once the
        total reaches the amount (one event per total: a top-up is a second one)."""
        await self._record(
            session,
            PaymentCompleted(
                order_id=payment.order_id,
                payment_ref=_ref(payment),
                amount=money.amount,
                amount_paid=money.amount_paid,
                platform_fee=money.platform_fee,
                escrow_amount=money.escrow_amount,
                currency=money.currency,
                paid_at=money.paid_at,
            ),
            event_id("completed", payment.id, money.amount_paid),
        )
        log.info(
            "payment %s of order %s: %d paid of %d, fee %d, escrow %d",
            payment.payment_ref,
            payment.order_id,
            money.amount_paid,
            money.amount,
            money.platform_fee,
            money.escrow_amount,
        )

    async def _hold(
        self, session: AsyncSession, stored: StoredPayment, money: MoneyReceived, now: datetime
    ) -> None:
        """Hold the mentor's share of a payment in full; freeze it at once if overpaid."""
        payment = stored.payment
        hold = EscrowHold.held_for(
            money,
            id=uuid.uuid4(),
            order_id=payment.order_id,
            mentor_id=stored.booking.mentor_id,
            now=now,
        )
        if money.over:
            hold.freeze(
                FreezeKind.OVERPAID,
                f"overpaid: {_money(money.amount_paid, money.currency)} arrived for "
                f"{money.amount} due; an admin releases the escrow or refunds the mentee",
                None,
                now,
            )
        await repo.add_hold(session, hold, payment.id)
        if hold.status is EscrowStatus.FROZEN:
            await self._record_escrow(session, hold)
            await self._anomaly(
                session,
                payment,
                PaymentAnomalyKind.AMOUNT_MISMATCH,
                f"payment {payment.payment_ref} of order {payment.order_id} reached "
                f"{_money(money.amount_paid, money.currency)}, more than the {money.amount} "
                "due: its escrow is frozen until an admin settles it.",
                money.amount_paid,
            )

    async def _owe_back(
        self,
        session: AsyncSession,
        stored: StoredPayment,
        cause: RefundCause,
        money: MoneyReceived | None,
        ending: OrderEnding | None,
        now: datetime,
    ) -> None:
        """What the payment holds is owed back to the mentee: refund_due (or more of it), with
        the Critical anomaly, in this transaction. Nothing was ever held for the mentor."""
        payment = stored.payment
        assert payment.amount_paid is not None and payment.escrow_amount is not None
        paid = _money(payment.amount_paid, payment.currency)
        ref = payment.payment_ref
        if cause is RefundCause.ORDER_ENDED:
            assert ending is not None
            why = f"{paid} arrived for order {payment.order_id}, which had ended ({ending.reason})"
        elif cause is RefundCause.PAYMENT_ENDED:
            assert money is not None
            why = f"{paid} arrived after payment {ref} had {money.previous_state.value}"
        else:
            why = f"payment {ref} expired with {paid} paid of the {payment.amount} due"
        reason = _clip(f"{why}: owed back to the mentee")
        existing = await repo.hold_of_order(session, payment.order_id)
        if existing is None:
            hold = EscrowHold.owed_back(
                id=uuid.uuid4(),
                order_id=payment.order_id,
                mentor_id=stored.booking.mentor_id,
                escrow_amount=payment.escrow_amount,
                amount_paid=payment.amount_paid,
                currency=payment.currency,
                reason=reason,
                now=now,
            )
            await repo.add_hold(session, hold, payment.id)
        else:
            hold = existing.hold
            try:
                hold.owe_more(payment.amount_paid, payment.escrow_amount, reason, now)
            except AlreadyApplied:
                return
            except IllegalTransition:
                # Refunded already: the rest cannot join that refund. Never dropped: told.
                extra = payment.amount_paid - hold.amount_paid
                await self._anomaly(
                    session,
                    payment,
                    PaymentAnomalyKind(cause.value),
                    f"Critical: {why}, after its escrow was {hold.status.value} "
                    f"(reference {hold.refund_reference}): a further "
                    f"{_money(extra, payment.currency)} must be paid back to the mentee by hand.",
                    payment.amount_paid,
                )
                return
            await repo.save_hold(session, hold)
        await self._record_escrow(session, hold)
        await self._anomaly(
            session,
            payment,
            PaymentAnomalyKind(cause.value),
            f"Critical: {why}. It is recorded and owed back, never dropped: an admin must pay "
            f"{_money(hold.refund_amount or 0, hold.currency)} back to the mentee by other "
            "means (Konnect has no refund API) and record the refund with its reference.",
            "refund_due",
            hold.sequence,
        )
        log.error("order %s: %s (refund due)", payment.order_id, why)

    async def _anomaly(
        self,
        session: AsyncSession,
        payment: Payment,
        kind: PaymentAnomalyKind,
        detail: str,
        *fact: object,
    ) -> None:
        """PaymentAnomalyDetected, once per payment, kind and `fact` (an amount, a sequence)."""
        log.warning("payment anomaly %s: %s", kind.value, detail)
        await self._record(
            session,
            PaymentAnomalyDetected(
                payment_ref=_ref(payment), order_id=payment.order_id, kind=kind, detail=detail
            ),
            event_id("anomaly", kind.value, payment.id, *fact),
        )

    # -- the webhook -----------------------------------------------------------------------

    async def notify(self, payment_ref: str, now: datetime | None = None) -> WebhookAnswer:
        """Konnect says something happened to `payment_ref`: find out what, and apply it once.

        One index read decides. A ref none of our payments has raises `UnknownPaymentRef`: it
        is counted for the admins' report, and Konnect, which only sends refs we created, is
        not asked. A completed payment is answered as it is: nothing Konnect says changes it.
        Any other payment is asked about within the webhooks' share of the lookup budget:
        `LookupsSpent` when it is used up, `KonnectCannotBeAsked` when Konnect cannot be asked;
        reconciliation makes both good. Konnect's call carries no trace: what it sets off joins
        the booking's, stored with the payment (linked to the request's own).
        """
        async with self.db.single_statement() as session:
            found = await repo.payment_of_ref(session, payment_ref)
        if found is None:
            await self._count_unknown(payment_ref, now or utcnow())
            raise UnknownPaymentRef(payment_ref)
        if found.status is PaymentState.COMPLETED:
            # Applied before: nothing Konnect could say now changes it.
            return WebhookAnswer(payment_ref, found.status.value)
        # Ended payments are asked too: money that arrives after the end is never dropped.
        with tracing.joined(found.traceparent, "payment webhook"):
            status = await self._ask_once_for_all(found, payment_ref, now)
        return WebhookAnswer(payment_ref, status.value)

    async def _ask_once_for_all(
        self, found: PaymentOfRef, payment_ref: str, now: datetime | None
    ) -> PaymentState:
        """Ask Konnect about a payment of ours and apply its verdict, one lookup at a time per ref.

        A webhook that comes while its ref is being asked about waits for that lookup to end,
        then shares the next one with every webhook that came meanwhile: that one starts after
        they came, so it sees what they announce. A burst of duplicates costs two lookups, not
        one each. (Per process: each replica asks for the webhooks it receives.)
        """
        asking = self._asking.setdefault(payment_ref, _Asking())
        started_before = asking.started
        asking.waiting += 1
        try:
            async with asking.lock:
                if asking.started > started_before and asking.outcome is not None:
                    # A lookup that started after this webhook came has just ended: its answer.
                    if isinstance(asking.outcome, Exception):
                        raise asking.outcome.with_traceback(None)
                    return asking.outcome
                asking.started += 1
                asking.outcome = None
                try:
                    state = await self._look_up_and_apply(found, payment_ref, now)
                except (LookupsSpent, KonnectCannotBeAsked) as refused:
                    asking.outcome = refused
                    raise
                asking.outcome = state
                return state
        finally:
            asking.waiting -= 1
            if not asking.waiting:
                del self._asking[payment_ref]

    async def _look_up_and_apply(
        self, found: PaymentOfRef, payment_ref: str, now: datetime | None
    ) -> PaymentState:
        wait = self.lookups.take(Lookup.WEBHOOK, self.clock())
        if wait:
            self._lookup_refused(payment_ref)
            raise LookupsSpent(wait)
        try:
            konnect_payment = await self.konnect.get_payment(payment_ref)
            now = now or utcnow()
            verdict = KonnectVerdict.read(konnect_payment, now)
        except (KonnectError, KonnectUnavailable, MalformedKonnectPayment) as error:
            log.warning("webhook for %s: Konnect could not be asked: %s", payment_ref, error)
            raise KonnectCannotBeAsked(str(error)) from error
        return await self.apply_verdict(found.id, found.order_id, verdict, now)

    def _lookup_refused(self, payment_ref: str) -> None:
        """Say that webhooks are being refused lookups, once per few seconds with how many."""
        self._refused += 1
        now = self.clock()
        if self._refused_said_at is not None and now - self._refused_said_at < _SAY_EVERY:
            return
        log.warning(
            "webhooks have used their share of Konnect lookups (KONNECT_LOOKUPS_PER_MINUTE, "
            "KONNECT_WEBHOOK_LOOKUP_SHARE): %d answered 503 since the last such line, the latest "
            "for %s; reconciliation settles their payments",
            self._refused,
            payment_ref,
        )
        self._refused, self._refused_said_at = 0, now

    async def claim_payments_to_check(
        self, now: datetime, *, created_before: datetime, checked_before: datetime, limit: int
    ) -> list[PaymentToCheck]:
        """Claim up to `limit` open payments for the sweeper to ask Konnect about (stamped as
        checked at `now`): opened before `created_before`, not asked about since
        `checked_before`. Another replica's are skipped."""
        async with self.db.transaction() as session:
            return await repo.claim_payments_to_check(
                session,
                now,
                created_before=created_before,
                checked_before=checked_before,
                limit=limit,
            )

    async def look_up_for_reconciliation(self, payment_ref: str) -> dict[str, Any]:
        """Konnect's payment object for the sweeper, within the lookup budget: it waits for its
        turn (webhooks cannot take reconciliation's share, so the wait is bounded)."""
        while True:
            wait = self.lookups.take(Lookup.RECONCILIATION, self.clock())
            if not wait:
                return await self.konnect.get_payment(payment_ref)
            await asyncio.sleep(wait)  # the bucket refills at a known rate: nothing to wake on

    # -- refs none of our payments has ---------------------------------------------------------

    async def _count_unknown(self, payment_ref: str, now: datetime) -> None:
        """Count a webhook for a ref that is not ours; record the report if one is due (the
        first after a quiet spell is: the admins hear of it at once)."""
        report = self.unknown_refs.seen(payment_ref, now)
        if report is None:
            return
        try:
            await self._report_unknown(report)
        except Exception as exc:
            # Put back: the next report counts it. The webhook is answered all the same.
            if is_unreachable(exc):
                log.warning("unknown payment refs not reported now: %s", describe(exc))
            else:
                log.exception("reporting unknown payment refs failed")

    async def report_unknown_refs(self, now: datetime) -> int:
        """Record the report of unknown refs counted since the last one, if it is due (the
        sweeper asks once per interval); how many webhooks it reported."""
        report = self.unknown_refs.due(now)
        if report is None:
            return 0
        await self._report_unknown(report)
        return report.count

    async def _report_unknown(self, report: UnknownRefReport) -> None:
        event = unknown_refs_event(report)
        try:
            async with self.db.transaction() as session:
                await self._record(session, event, uuid.uuid4())
        except BaseException:
            self.unknown_refs.put_back(report)
            raise
        log.warning("payment anomaly unknown_payment_ref: %s", event.detail)

    # -- the session's fate (events from orders) -------------------------------------------

    async def schedule_release(self, session: AsyncSession, event: OrderConfirmed) -> None:
        """The session is in the calendar: its escrow's release is due at its end plus the
        delay; a hold frozen for the scheduling is held again (EscrowUnfrozen)."""
        now = utcnow()
        await repo.lock_order(session, event.order_id)
        stored = await repo.hold_of_order(session, event.order_id)
        if stored is None:
            log.warning(
                "order %s was confirmed but holds no escrow here: nothing to release",
                event.order_id,
            )
            return
        hold = stored.hold
        outcome = hold.schedule_release(event.end_at, self.release_delay, now)
        if outcome is ReleaseScheduling.UNCHANGED:
            return
        if outcome is ReleaseScheduling.IGNORED:
            log.warning(
                "order %s was confirmed, but its escrow is %s (%s): it no longer follows the "
                "session and is left as it is",
                event.order_id,
                hold.status.value,
                hold.frozen_reason.value if hold.frozen_reason else hold.reason,
            )
            return
        await repo.save_hold(session, hold)
        if outcome is ReleaseScheduling.UNFROZEN:
            await self._record_escrow(session, hold)
            log.info("escrow of order %s unfrozen: its session was scheduled", event.order_id)
        log.info("escrow of order %s due for release at %s", event.order_id, hold.release_due_at)

    async def freeze_for_scheduling(
        self, session: AsyncSession, event: SchedulingAbandoned
    ) -> None:
        """The calendar gave up on the session for good: its escrow is frozen (EscrowFrozen),
        never released on its own; an admin retries the scheduling, releases or refunds it."""
        now = utcnow()
        await repo.lock_order(session, event.order_id)
        stored = await repo.hold_of_order(session, event.order_id)
        if stored is None:
            log.warning(
                "scheduling of order %s abandoned, but it holds no escrow here", event.order_id
            )
            return
        reason = _clip(f"the calendar gave up on the session ({event.reason}): {event.detail}")
        await self._freeze(session, stored, FreezeKind.SCHEDULING_ABANDONED, reason, None, now)

    async def end_order(self, session: AsyncSession, event: OrderCancelled) -> None:
        """The order ended before its session (an admin's cancel, or its payment never
        opened). Recorded, so that no payment is opened for it afterwards, and:

        - a payment still `initiating` ends as initiation_failed, without
          PaymentInitiationFailed (the order has ended already);
        - a pending or underpaid payment stays open: Konnect may still take money until it
          expires, and what comes is owed back;
        - a paid order's held escrow is frozen (EscrowFrozen, `by` the admin); released or
          owed back, it is left as it is.
        """
        now = utcnow()
        await repo.lock_order(session, event.order_id)
        await repo.record_ending(
            session,
            OrderEnding(order_id=event.order_id, reason=event.reason, by=event.by, ended_at=now),
        )
        stored = await repo.locked_payment_of_order(session, event.order_id)
        if stored is None:
            log.info("order %s ended before its payment was opened: none will be", event.order_id)
            return
        payment = stored.payment
        if payment.status is PaymentState.INITIATING:
            payment.initiation_failed(now)
            await repo.save_payment(session, payment, lease_ended=True)
            log.info("order %s ended while its payment was being opened: ended", event.order_id)
            return
        if payment.is_open:
            log.info(
                "order %s ended; its payment %s stays open until it expires: money that still "
                "comes is owed back",
                event.order_id,
                payment.payment_ref,
            )
            return
        if payment.status is not PaymentState.COMPLETED:
            return
        held = await repo.hold_of_order(session, event.order_id)
        if held is None:
            log.error(
                "order %s ended; its payment is completed but holds no escrow", event.order_id
            )
            return
        reason = _clip(f"the order was cancelled: {event.reason}")
        await self._freeze(session, held, FreezeKind.ORDER_CANCELLED, reason, event.by, now)

    async def _freeze(
        self,
        session: AsyncSession,
        stored: StoredHold,
        kind: FreezeKind,
        reason: str,
        by: str | None,
        now: datetime,
    ) -> None:
        hold = stored.hold
        try:
            hold.freeze(kind, reason, by, now)
        except AlreadyApplied:
            return
        except IllegalTransition:
            # Released or owed back: the money has gone its way; no error to dead-letter.
            log.warning(
                "escrow of order %s is %s: not frozen (%s)",
                hold.order_id,
                hold.status.value,
                kind.value,
            )
            return
        await repo.save_hold(session, hold)
        await self._record_escrow(session, hold)
        log.warning("escrow of order %s frozen (%s): %s", hold.order_id, kind.value, reason)

    # -- escrow released when due (the sweeper's unit of work) ------------------------------

    async def release_due_escrow(self, now: datetime, limit: int) -> int:
        """Release up to `limit` held escrows whose session was scheduled and whose end plus
        the delay has passed (EscrowReleased each); how many. Another replica's are skipped."""
        async with self.db.transaction() as session:
            due = await repo.holds_due(session, now, limit)
            for stored in due:
                stored.hold.release_when_due(now)
                await repo.save_hold(session, stored.hold)
                with correlated(stored.correlation_id):
                    await self._record_escrow(session, stored.hold)
        if due:
            log.info("released %d escrow hold(s) to mentors", len(due))
        return len(due)

    # -- an admin's view and decisions -------------------------------------------------------

    async def escrow_of(self, order_id: uuid.UUID) -> EscrowHold:
        """The order's escrow; `NoEscrow` when nothing is held or owed for it."""
        async with self.db.single_statement() as session:
            stored = await repo.hold_of_order(session, order_id, lock=False)
        if stored is None:
            raise NoEscrow(order_id)
        return stored.hold

    async def settle_escrow(
        self,
        order_id: uuid.UUID,
        action: SettlementAction,
        *,
        reason: str,
        by: str,
        reference: str | None = None,
        now: datetime | None = None,
    ) -> EscrowHold:
        """An admin releases a frozen escrow, chooses a refund, or records the refund made.

        One unit of work: the move, its Escrow* event and the audit row (AdminActionRecorded)
        commit together. A repeat of a move that took effect changes nothing and answers the
        escrow as it is (no event, no audit). A move the escrow's state forbids raises
        `IllegalTransition`; an order without escrow `NoEscrow`.
        """
        if action == "refunded" and not reference:
            raise ValueError("a refund is recorded with its reference")
        audit_action = _SETTLEMENTS[action]
        now = now or utcnow()
        async with self.db.transaction() as session:
            await repo.lock_order(session, order_id)
            stored = await repo.hold_of_order(session, order_id)
            if stored is None:
                raise NoEscrow(order_id)
            hold = stored.hold
            before = hold.status
            try:
                if action == "release":
                    hold.release_by_admin(reason, by, now)
                elif action == "refund":
                    hold.choose_refund(reason, by, now)
                else:
                    assert reference is not None
                    hold.record_refund(reference, reason, by, now)
            except AlreadyApplied:
                return hold
            await repo.save_hold(session, hold)
            with correlated(stored.correlation_id):
                await self._record_escrow(session, hold)
                await record_admin_action(
                    session,
                    self.outbox.tables,
                    self.outbox,
                    action=audit_action,
                    by=by,
                    reason=reason,
                    at=now,
                    order_id=order_id,
                    session_id=stored.session_id,
                    detail=(
                        f"escrow {before.value} -> {hold.status.value} "
                        f"(sequence {hold.sequence}): "
                        f"{_money(hold.amount, hold.currency)} escrow, "
                        f"{_money(hold.amount_paid, hold.currency)} paid"
                        + (f", reference {reference}" if reference else "")
                    ),
                )
        log.warning(
            "escrow of order %s %s -> %s by %s: %s",
            order_id,
            before.value,
            hold.status.value,
            by,
            reason,
        )
        return hold

    # -- escrow events -----------------------------------------------------------------------

    async def _record_escrow(self, session: AsyncSession, hold: EscrowHold) -> None:
        """The Escrow* event of the hold's last transition, under an id of its sequence."""
        await self._record(session, escrow_event(hold), event_id("escrow", hold.id, hold.sequence))


def escrow_event(hold: EscrowHold) -> Event:
    """The event that announces the hold's state after a transition (its `sequence` in it)."""
    common: dict[str, Any] = {
        "order_id": hold.order_id,
        "mentor_id": hold.mentor_id,
        "escrow_amount": hold.amount,
        "currency": hold.currency,
        "sequence": hold.sequence,
    }
    reason = hold.reason or hold.status.value
    if hold.status is EscrowStatus.RELEASED:
        assert hold.released_at is not None
        return EscrowReleased(
            **common, released_at=hold.released_at, by=hold.decided_by, reason=reason
        )
    if hold.status is EscrowStatus.FROZEN:
        return EscrowFrozen(**common, reason=reason, by=hold.decided_by)
    if hold.status is EscrowStatus.HELD:
        assert hold.release_due_at is not None
        return EscrowUnfrozen(**common, release_due_at=hold.release_due_at, reason=reason)
    assert hold.refund_amount is not None
    if hold.status is EscrowStatus.REFUND_DUE:
        return EscrowRefundDue(
            **common, refund_amount=hold.refund_amount, reason=reason, by=hold.decided_by
        )
    assert hold.decided_by is not None and hold.refund_reference is not None
    return EscrowRefunded(
        **common,
        refund_amount=hold.refund_amount,
        reason=reason,
        by=hold.decided_by,
        reference=hold.refund_reference,
    )


def unknown_refs_event(report: UnknownRefReport) -> PaymentAnomalyDetected:
    """The anomaly that reports webhooks for refs none of our payments has (one or many)."""
    why = "forged or mistaken (Konnect only sends the refs we create, so it was not asked)"
    if report.count == 1:
        detail = f"a webhook named {report.refs[0]}, which no payment of ours has: {why}"
    else:
        detail = (
            f"{report.count} webhooks from {report.first_seen_at.isoformat()} to "
            f"{report.last_seen_at.isoformat()} named refs no payment of ours has: {why}. "
            f"{len(report.refs)} of their refs are listed, the first and the last ones."
        )
    return PaymentAnomalyDetected(
        payment_ref=report.refs[0],
        order_id=None,
        kind=PaymentAnomalyKind.UNKNOWN_PAYMENT_REF,
        detail=detail,
        occurrences=report.count,
        payment_refs=list(report.refs),
    )


@dataclass(slots=True)
class _Asking:
    """The lookups of one ref under way in this process (`notify` keeps one at a time)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    started: int = 0
    waiting: int = 0
    outcome: PaymentState | Exception | None = None
    """What the latest lookup came to; None while it runs or when it failed unexpectedly."""
