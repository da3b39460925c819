"""The payments service's units of work: initiating a payment at Konnect, applying Konnect's
verdict, answering Konnect's webhook.

Konnect is never called inside an open transaction: a step claims or reads what it needs and
commits, calls Konnect, then records the result and its events in a transaction of its own,
under a row lock, so a duplicate or a concurrent step finds the work done and does nothing.
Events carry the booking's correlation id, stored with the payment.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Row, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from booking.contracts import (
    Event,
    PaymentAnomalyDetected,
    PaymentAnomalyKind,
    PaymentCompleted,
    PaymentFailed,
    PaymentFailureReason,
    PaymentInitiated,
    PaymentInitiationFailed,
)
from booking.payments.domain import (
    EscrowHold,
    KonnectVerdict,
    MalformedKonnectPayment,
    Payment,
    PaymentState,
    Settlement,
)
from booking.payments.konnect import (
    KonnectClient,
    KonnectError,
    KonnectUnauthorized,
    KonnectUnavailable,
    PaymentNotFound,
    PaymentRequest,
)
from booking.payments.settings import PaymentsSettings
from booking.payments.tables import escrow_holds, messaging, payments
from booking.runtime.context import correlated
from booking.runtime.db import Database
from booking.runtime.outbox import Outbox

log = logging.getLogger(__name__)

# Events about one payment get ids derived from it: recording one twice stores it once.
_EVENTS = uuid.UUID("0b8a1f6e-3c1d-4e55-9a0e-5d7c2f4b9e21")


def event_id(*parts: object) -> uuid.UUID:
    return uuid.uuid5(_EVENTS, ":".join(str(part) for part in parts))


def utcnow() -> datetime:
    return datetime.now(UTC)


class UnknownPaymentRef(Exception):
    """No payment of ours has this ref (an anomaly was raised)."""


class KonnectCannotBeAsked(Exception):
    """Konnect could not be asked about a payment, or its answer could not be read."""


@dataclass(frozen=True, slots=True)
class WebhookAnswer:
    payment_ref: str
    status: str


def payment_of(row: Row[Any]) -> Payment:
    """The domain's view of a `payments` row."""
    return Payment(
        id=row.id,
        order_id=row.order_id,
        amount=row.amount,
        currency=row.currency,
        created_at=row.created_at,
        updated_at=row.updated_at,
        payment_ref=row.payment_ref,
        pay_url=row.pay_url,
        expires_at=row.expires_at,
        status=PaymentState(row.status),
        amount_paid=row.amount_paid,
        platform_fee=row.platform_fee,
        escrow_amount=row.escrow_amount,
        paid_at=row.paid_at,
    )


def _stored(payment: Payment) -> dict[str, Any]:
    return {
        "status": payment.status.value,
        "payment_ref": payment.payment_ref,
        "pay_url": payment.pay_url,
        "expires_at": payment.expires_at,
        "amount_paid": payment.amount_paid,
        "platform_fee": payment.platform_fee,
        "escrow_amount": payment.escrow_amount,
        "paid_at": payment.paid_at,
        "updated_at": payment.updated_at,
    }


class PaymentService:
    def __init__(
        self,
        *,
        db: Database,
        outbox: Outbox,
        konnect: KonnectClient,
        settings: PaymentsSettings,
    ) -> None:
        self.db = db
        self.outbox = outbox
        self.konnect = konnect
        self.settings = settings
        self.lease = timedelta(seconds=settings.initiation_lease_seconds)

    async def _record(self, session: AsyncSession, event: Event, message_id: uuid.UUID) -> None:
        await self.outbox.record(session, event, message_id=message_id)

    # -- initiation ------------------------------------------------------------------------

    async def initiate(self, payment_id: uuid.UUID, now: datetime | None = None) -> None:
        """Initiate a payment just opened, unless another replica holds it (the fast path)."""
        now = now or utcnow()
        claim = (
            update(payments)
            .where(
                payments.c.id == payment_id,
                payments.c.status == PaymentState.INITIATING.value,
                payments.c.claimed_until.is_(None) | (payments.c.claimed_until < now),
            )
            .values(claimed_until=now + self.lease)
            .returning(*payments.c)
        )
        async with self.db.single_statement() as session:
            row = (await session.execute(claim)).one_or_none()
        if row is not None:
            await self.initiate_claimed(row)

    async def initiate_claimed(self, row: Row[Any]) -> PaymentState:
        """Call Konnect init for a payment this replica holds the lease of; record the result.

        Runs outside any transaction. A crash before the result is recorded leaves the lease to
        lapse, and the sweeper initiates the payment again: the first Konnect payment was never
        shown to anyone, so it is a harmless orphan.
        """
        request = PaymentRequest(
            order_id=row.order_id,
            amount=row.amount,
            currency=row.currency,
            description=row.title,
            first_name=row.mentee_first_name,
            last_name=row.mentee_last_name,
            email=row.mentee_email,
            phone=row.mentee_phone,
            lifespan_minutes=self.settings.konnect_payment_lifespan_minutes,
            webhook_url=self.settings.konnect_webhook_url,
            success_url=self.settings.konnect_success_url or "",
            fail_url=self.settings.konnect_fail_url or "",
        )
        with correlated(row.correlation_id):
            try:
                initiated = await self.konnect.init_payment(request)
            except KonnectUnavailable as error:
                return await self._initiation_failed(row.id, "konnect_unavailable", str(error))
            except KonnectUnauthorized as error:
                detail = f"Konnect refused our API key (check KONNECT_API_KEY): {error.message}"
                return await self._initiation_failed(row.id, "konnect_unauthorized", detail)
            except KonnectError as error:
                return await self._initiation_failed(row.id, "konnect_refused", error.message)
            return await self._initiated(
                row.id, initiated.payment_ref, initiated.pay_url, now=utcnow()
            )

    async def _locked(self, session: AsyncSession, payment_id: uuid.UUID) -> Row[Any]:
        query = select(payments).where(payments.c.id == payment_id).with_for_update()
        return (await session.execute(query)).one()

    async def _initiated(
        self, payment_id: uuid.UUID, payment_ref: str, pay_url: str, *, now: datetime
    ) -> PaymentState:
        # The payer may pay until Konnect's own expiry, which counts from its answer; ours
        # counts from the same moment or later, so we never end a payment Konnect still takes.
        expires_at = now + timedelta(minutes=self.settings.konnect_payment_lifespan_minutes)
        async with self.db.transaction() as session:
            row = await self._locked(session, payment_id)
            payment = payment_of(row)
            if payment.status is not PaymentState.INITIATING:
                log.warning(
                    "payment %s of order %s was settled elsewhere (%s): Konnect payment %s is an "
                    "orphan nobody will see",
                    payment_id,
                    row.order_id,
                    payment.status,
                    payment_ref,
                )
                return payment.status
            payment.initiated(payment_ref, pay_url, expires_at, now)
            await session.execute(
                update(payments)
                .where(payments.c.id == payment_id)
                .values(**_stored(payment), claimed_until=None)
            )
            await self._record(
                session,
                PaymentInitiated(
                    order_id=row.order_id,
                    payment_ref=payment_ref,
                    pay_url=pay_url,
                    expires_at=expires_at,
                ),
                event_id("initiated", payment_id),
            )
        log.info("payment %s of order %s opened at Konnect", payment_ref, row.order_id)
        return payment.status

    async def _initiation_failed(
        self, payment_id: uuid.UUID, reason: str, detail: str
    ) -> PaymentState:
        now = utcnow()
        async with self.db.transaction() as session:
            row = await self._locked(session, payment_id)
            payment = payment_of(row)
            if payment.status is not PaymentState.INITIATING:
                return payment.status
            payment.initiation_failed(now)
            await session.execute(
                update(payments)
                .where(payments.c.id == payment_id)
                .values(**_stored(payment), claimed_until=None)
            )
            await self._record(
                session,
                PaymentInitiationFailed(order_id=row.order_id, reason=reason, detail=detail),
                event_id("initiation_failed", payment_id),
            )
        log.error("Konnect would not open a payment for order %s: %s", row.order_id, detail)
        return payment.status

    # -- Konnect's verdict -----------------------------------------------------------------

    async def apply_verdict(
        self, payment_id: uuid.UUID, verdict: KonnectVerdict, now: datetime
    ) -> PaymentState:
        """Apply what Konnect says of a payment, once, under the payment's row lock.

        Used by the webhook and by the sweeper. A concurrent duplicate waits for the lock, then
        finds the verdict applied and changes nothing.
        """
        async with self.db.transaction() as session:
            row = await self._locked(session, payment_id)
            payment = payment_of(row)
            with correlated(row.correlation_id):
                settlement = payment.apply_verdict(verdict, self.settings.platform_fee_rate, now)
                values = {"last_checked_at": now}
                if settlement.changed:
                    values |= _stored(payment)
                await session.execute(
                    update(payments).where(payments.c.id == payment_id).values(**values)
                )
                await self._record_settlement(session, row, payment, settlement, now)
        return payment.status

    async def _record_settlement(
        self,
        session: AsyncSession,
        row: Row[Any],
        payment: Payment,
        settlement: Settlement,
        now: datetime,
    ) -> None:
        ref = row.payment_ref
        if settlement.currency_mismatch is not None:
            await self._anomaly(
                session,
                row,
                PaymentAnomalyKind.CURRENCY_MISMATCH,
                str(settlement.currency_mismatch),
            )
            return
        if settlement.expired:
            await self._record(
                session,
                PaymentFailed(
                    order_id=row.order_id, payment_ref=ref, reason=PaymentFailureReason.EXPIRED
                ),
                event_id("failed", row.id),
            )
            log.info("payment %s of order %s expired unpaid", ref, row.order_id)
            return
        done = settlement.completion
        if done is None:
            return
        hold = EscrowHold.for_completion(
            done,
            id=uuid.uuid4(),
            order_id=row.order_id,
            mentor_id=row.mentor_id,
            session_end_at=row.session_end_at,
            delay=timedelta(minutes=self.settings.escrow_release_delay_minutes),
            now=now,
        )
        await session.execute(
            escrow_holds.insert().values(
                id=hold.id,
                order_id=hold.order_id,
                payment_id=row.id,
                mentor_id=hold.mentor_id,
                amount=hold.amount,
                currency=hold.currency,
                status=hold.status.value,
                release_due_at=hold.release_due_at,
                created_at=now,
            )
        )
        await self._record(
            session,
            PaymentCompleted(
                order_id=row.order_id,
                payment_ref=ref,
                amount=done.amount,
                amount_paid=done.amount_paid,
                platform_fee=done.platform_fee,
                escrow_amount=done.escrow_amount,
                currency=done.currency,
                paid_at=done.paid_at,
            ),
            event_id("completed", row.id),
        )
        money = f"{done.amount_paid} {done.currency} (minor units)"
        if done.late:
            await self._anomaly(
                session,
                row,
                PaymentAnomalyKind.PAYMENT_FOR_ENDED_ORDER,
                f"Critical: {money} arrived for payment {ref} of order {row.order_id} after it "
                f"had {done.previous_state.value}: money for an ended order. It is recorded and "
                f"its escrow of {done.escrow_amount} frozen, never dropped: an admin must "
                "refund it or honour the booking.",
            )
        if done.amount_paid < done.amount:
            await self._anomaly(
                session,
                row,
                PaymentAnomalyKind.UNDERPAYMENT,
                f"payment {ref} of order {row.order_id} reached {money} of the "
                f"{done.amount} due: the order stays unpaid and the escrow is frozen.",
            )
        elif done.amount_paid > done.amount:
            await self._anomaly(
                session,
                row,
                PaymentAnomalyKind.AMOUNT_MISMATCH,
                f"payment {ref} of order {row.order_id} reached {money}, more than the "
                f"{done.amount} due.",
            )
        log.info(
            "payment %s of order %s completed: %d paid, fee %d, escrow %d (%s)",
            ref,
            row.order_id,
            done.amount_paid,
            done.platform_fee,
            done.escrow_amount,
            hold.status.value,
        )

    async def _anomaly(
        self, session: AsyncSession, row: Row[Any], kind: PaymentAnomalyKind, detail: str
    ) -> None:
        log.warning("payment anomaly %s: %s", kind.value, detail)
        await self._record(
            session,
            PaymentAnomalyDetected(
                payment_ref=row.payment_ref, order_id=row.order_id, kind=kind, detail=detail
            ),
            event_id("anomaly", kind.value, row.id),
        )

    # -- the webhook -----------------------------------------------------------------------

    async def notify(self, payment_ref: str, now: datetime | None = None) -> WebhookAnswer:
        """Konnect says something happened to `payment_ref`: find out what, and apply it once.

        Raises `UnknownPaymentRef` (after raising the anomaly) for a ref that is not ours and
        `KonnectCannotBeAsked` when Konnect cannot be asked (reconciliation makes it good).
        """
        async with self.db.single_statement() as session:
            query = select(payments.c.id, payments.c.status).where(
                payments.c.payment_ref == payment_ref
            )
            found = (await session.execute(query)).one_or_none()
        if found is None:
            await self._unknown_ref(payment_ref)
            raise UnknownPaymentRef(payment_ref)
        if found.status == PaymentState.COMPLETED.value:
            # Applied before: nothing Konnect could say now changes it.
            return WebhookAnswer(payment_ref, found.status)
        # Ended payments are asked too: money that arrives after the end is never dropped.
        try:
            konnect_payment = await self.konnect.get_payment(payment_ref)
            now = now or utcnow()
            verdict = KonnectVerdict.read(konnect_payment, now)
        except (KonnectError, KonnectUnavailable, MalformedKonnectPayment) as error:
            log.warning("webhook for %s: Konnect could not be asked: %s", payment_ref, error)
            raise KonnectCannotBeAsked(str(error)) from error
        status = await self.apply_verdict(found.id, verdict, now)
        return WebhookAnswer(payment_ref, status.value)

    async def _unknown_ref(self, payment_ref: str) -> None:
        """A ref none of our payments has: one anomaly per ref, however often it comes."""
        message_id = event_id("anomaly", PaymentAnomalyKind.UNKNOWN_PAYMENT_REF.value, payment_ref)
        outbox = messaging.outbox
        async with self.db.engine.connect() as conn:
            reported = await conn.scalar(
                select(outbox.c.id).where(outbox.c.message_id == message_id)
            )
        if reported is not None:
            return  # a flood of one forged ref asks Konnect once
        order_id = None
        try:
            known = await self.konnect.get_payment(payment_ref)
        except PaymentNotFound:
            detail = (
                f"a webhook named {payment_ref}, which Konnect never issued: forged or mistaken"
            )
        except (KonnectError, KonnectUnavailable) as error:
            detail = (
                f"a webhook named {payment_ref}, which no payment of ours has; "
                f"Konnect could not be asked about it ({error})"
            )
        else:
            order_id = _uuid_or_none(known.get("orderId"))
            detail = (
                f"a webhook named {payment_ref}, which Konnect knows (order "
                f"{known.get('orderId')}, status {known.get('status')}) but no payment of ours "
                "has: an orphan of an interrupted initiation, or not ours"
            )
        log.warning("payment anomaly unknown_payment_ref: %s", detail)
        async with self.db.transaction() as session:
            await self._record(
                session,
                PaymentAnomalyDetected(
                    payment_ref=payment_ref,
                    order_id=order_id,
                    kind=PaymentAnomalyKind.UNKNOWN_PAYMENT_REF,
                    detail=detail,
                ),
                message_id,
            )


def _uuid_or_none(value: object) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None
