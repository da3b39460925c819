"""The sweeper: what the webhook and the fast path may have left undone.

(a) Pending payments older than a grace period, not asked about within the interval, are asked
of Konnect and its verdict applied (lost webhooks); one past its expiry that Konnect does not
report completed is expired. (b) Payments left `initiating` (the replica crashed before or
during its Konnect call) are initiated again once their lease lapsed. (c) Escrow holds due are
released for the mentor.

Every replica runs one. Each claims its rows with `FOR UPDATE SKIP LOCKED` and stamps them in the
same statement, so replicas never take the same row; every change is then applied under the row
lock and only once, so even a row taken twice is never doubled. `run_once(now)` is one sweep, at
any `now` (tests drive time with it).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, select, update

from booking.contracts import EscrowReleased
from booking.payments.domain import (
    EscrowHold,
    EscrowStatus,
    KonnectVerdict,
    MalformedKonnectPayment,
    PaymentState,
)
from booking.payments.konnect import KonnectError, KonnectUnavailable, PaymentNotFound
from booking.payments.service import PaymentService, event_id, utcnow
from booking.payments.settings import PaymentsSettings
from booking.payments.tables import escrow_holds, payments
from booking.runtime.context import correlated

log = logging.getLogger(__name__)

# Konnect calls in flight at once per sweep (Konnect's rate limit is not documented).
_KONNECT_CONCURRENCY = 4


@dataclass(frozen=True, slots=True)
class Sweep:
    """What one sweep did."""

    checked: int = 0
    initiated: int = 0
    released: int = 0


class Sweeper:
    def __init__(self, service: PaymentService, settings: PaymentsSettings) -> None:
        self.service = service
        self.db = service.db
        self.settings = settings
        self.batch = settings.reconciliation_batch_size
        self._tasks: list[asyncio.Task] = []

    # -- the loops ---------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(
                self._every(self.settings.reconciliation_interval_seconds, self._payments),
                name="sweeper-payments",
            ),
            asyncio.create_task(
                self._every(self.settings.escrow_release_interval_seconds, self.release_escrow),
                name="sweeper-escrow",
            ),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    @staticmethod
    async def _every(interval: float, sweep: Callable[[datetime], Awaitable[Any]]) -> None:
        while True:
            # Jittered, so replicas started together do not sweep in step.
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))
            try:
                await sweep(utcnow())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweep failed; trying again in about %ss", interval)

    async def _payments(self, now: datetime) -> None:
        await self.reconcile(now)
        await self.repair_initiations(now)

    async def run_once(self, now: datetime | None = None) -> Sweep:
        """One full sweep at `now` (default: the clock)."""
        now = now or utcnow()
        return Sweep(
            checked=await self.reconcile(now),
            initiated=await self.repair_initiations(now),
            released=await self.release_escrow(now),
        )

    # -- (a) pending payments ----------------------------------------------------------------

    async def reconcile(self, now: datetime) -> int:
        """Ask Konnect about every pending payment due a check; returns how many were asked."""
        checked = 0
        limit = asyncio.Semaphore(_KONNECT_CONCURRENCY)
        while True:
            claimed = await self._claim_pending(now)
            await asyncio.gather(*(self._check(row, now, limit) for row in claimed))
            checked += len(claimed)
            if len(claimed) < self.batch:
                return checked

    async def _claim_pending(self, now: datetime) -> list[Row[Any]]:
        grace = timedelta(seconds=self.settings.reconciliation_grace_seconds)
        interval = timedelta(seconds=self.settings.reconciliation_interval_seconds)
        due = (
            select(payments.c.id)
            .where(
                payments.c.status == PaymentState.PENDING.value,
                payments.c.created_at <= now - grace,
                payments.c.last_checked_at.is_(None)
                | (payments.c.last_checked_at <= now - interval),
            )
            .order_by(payments.c.last_checked_at.asc().nulls_first())
            .limit(self.batch)
            .with_for_update(skip_locked=True)
        )
        claim = (
            update(payments)
            .where(payments.c.id.in_(due.scalar_subquery()))
            .values(last_checked_at=now)
            .returning(payments.c.id, payments.c.payment_ref, payments.c.currency)
        )
        async with self.db.transaction() as session:
            return list((await session.execute(claim)).all())

    async def _check(self, row: Row[Any], now: datetime, limit: asyncio.Semaphore) -> None:
        try:
            async with limit:
                konnect_payment = await self.service.konnect.get_payment(row.payment_ref)
            verdict = KonnectVerdict.read(konnect_payment, now)
        except PaymentNotFound:
            # No money can come through a payment Konnect does not know; only our expiry ends it.
            log.error("Konnect does not know pending payment %s", row.payment_ref)
            verdict = KonnectVerdict.unknown(row.currency)
        except (KonnectError, KonnectUnavailable, MalformedKonnectPayment) as error:
            # Never expire what Konnect could not be asked about: money may have arrived.
            log.warning("reconciliation: %s not checked: %s", row.payment_ref, error)
            return
        try:
            await self.service.apply_verdict(row.id, verdict, now)
        except Exception:
            log.exception(
                "reconciliation: applying Konnect's verdict on %s failed", row.payment_ref
            )

    # -- (b) interrupted initiations ---------------------------------------------------------

    async def repair_initiations(self, now: datetime) -> int:
        """Initiate payments whose lease lapsed (or that nobody claimed); returns how many."""
        lease = timedelta(seconds=self.settings.initiation_lease_seconds)
        grace = timedelta(seconds=self.settings.initiation_grace_seconds)
        lapsed = (
            select(payments.c.id)
            .where(
                payments.c.status == PaymentState.INITIATING.value,
                (payments.c.claimed_until.is_(None) & (payments.c.created_at <= now - grace))
                | (payments.c.claimed_until < now),
            )
            .order_by(payments.c.created_at)
            .limit(self.batch)
            .with_for_update(skip_locked=True)
        )
        claim = (
            update(payments)
            .where(payments.c.id.in_(lapsed.scalar_subquery()))
            .values(claimed_until=now + lease)
            .returning(*payments.c)
        )
        async with self.db.transaction() as session:
            rows = list((await session.execute(claim)).all())
        for row in rows:
            log.warning("initiating payment of order %s again (interrupted)", row.order_id)
            try:
                await self.service.initiate_claimed(row)
            except Exception:
                log.exception("initiating the payment of order %s failed", row.order_id)
        return len(rows)

    # -- (c) escrow ----------------------------------------------------------------------------

    async def release_escrow(self, now: datetime) -> int:
        """Release every held escrow whose session ended plus the delay; returns how many."""
        released = 0
        while True:
            count = await self._release_batch(now)
            released += count
            if count < self.batch:
                return released

    async def _release_batch(self, now: datetime) -> int:
        due = (
            select(escrow_holds, payments.c.correlation_id)
            .join(payments, payments.c.id == escrow_holds.c.payment_id)
            .where(
                escrow_holds.c.status == EscrowStatus.HELD.value,
                escrow_holds.c.release_due_at <= now,
            )
            .order_by(escrow_holds.c.release_due_at)
            .limit(self.batch)
            .with_for_update(of=escrow_holds, skip_locked=True)
        )
        async with self.db.transaction() as session:
            rows = (await session.execute(due)).all()
            for row in rows:
                hold = EscrowHold(
                    id=row.id,
                    order_id=row.order_id,
                    mentor_id=row.mentor_id,
                    amount=row.amount,
                    currency=row.currency,
                    created_at=row.created_at,
                    status=EscrowStatus(row.status),
                    release_due_at=row.release_due_at,
                )
                hold.release_when_due(now)
                await session.execute(
                    update(escrow_holds)
                    .where(escrow_holds.c.id == hold.id)
                    .values(status=hold.status.value, released_at=hold.released_at)
                )
                with correlated(row.correlation_id):
                    await self.service.outbox.record(
                        session,
                        EscrowReleased(
                            order_id=hold.order_id,
                            mentor_id=hold.mentor_id,
                            escrow_amount=hold.amount,
                            currency=hold.currency,
                            released_at=now,
                        ),
                        message_id=event_id("escrow_released", hold.id),
                    )
        if rows:
            log.info("released %d escrow hold(s) to mentors", len(rows))
        return len(rows)
