"""The sweeper: what the webhook and the fast path may have left undone.

(a) Open payments (pending, or underpaid: the payer may pay the rest) older than a grace period, not
asked about within the interval, are asked of Konnect and its verdict applied (lost webhooks, and
webhooks refused for the lookup budget, whose reserve is reconciliation's: a sweep waits for its
turn, never refused); one past its expiry that Konnect does not report completed is expired, and
what an underpaid one received is owed back. (b) Payments left `initiating` (the replica crashed
before or during its Konnect call) are initiated again once their lease lapsed. (c) Held escrow
whose session was scheduled (OrderConfirmed set when its release is due) is released for the mentor
once due; a hold never scheduled, frozen or owed back never is. (d) Webhooks for refs none of our
payments has, counted since the last report, are reported once it is due (a flood's tail).

Every replica runs one. Each claims its rows with `FOR UPDATE SKIP LOCKED` and stamps them in the
same statement, so replicas never take the same row; every change is then applied under the row
lock and only once, so even a row taken twice is never doubled. `run_once(now)` is one sweep, at
any `now` (tests drive time with it).

A sweep that meets an unreachable database gives up until its next interval and says so in
one quiet line now and then (docs/recovery.md section 1), never a stack trace per row.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from booking.payments.domain import KonnectVerdict, MalformedKonnectPayment
from booking.payments.konnect import KonnectError, KonnectUnavailable, PaymentNotFound
from booking.payments.repository import PaymentToCheck
from booking.payments.service import PaymentService
from booking.payments.settings import PaymentsSettings
from booking.runtime.clock import utcnow
from booking.runtime.outages import OutageLog, is_unreachable
from booking.runtime.sweeping import Every, run_quietly

log = logging.getLogger(__name__)

# Konnect calls in flight at once per sweep (Konnect's rate limit is not documented; the
# lookup budget paces them).
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
        self.settings = settings
        self.batch = settings.reconciliation_batch_size
        self.outage = OutageLog(log, "the database (payments sweeper)")
        self._loops: list[Every] = []

    # -- the loops ---------------------------------------------------------------------------

    def start(self) -> None:
        self._loops = [
            Every(
                self.settings.reconciliation_interval_seconds,
                lambda: self.guarded(self._payments, utcnow()),
                name="sweeper-payments",
            ),
            Every(
                self.settings.escrow_release_interval_seconds,
                lambda: self.guarded(self.release_escrow, utcnow()),
                name="sweeper-escrow",
            ),
            Every(
                self.settings.unknown_ref_report_interval_seconds,
                lambda: self.guarded(self.service.report_unknown_refs, utcnow()),
                name="sweeper-unknown-refs",
            ),
        ]
        for loop in self._loops:
            loop.start()

    async def stop(self) -> None:
        for loop in self._loops:
            await loop.stop()
        self._loops = []

    async def guarded(self, sweep: Callable[[datetime], Awaitable[Any]], now: datetime) -> bool:
        """Run one sweep as the loop does; whether it went through (see run_quietly)."""

        async def went_through() -> bool:
            await sweep(now)
            return True

        return await run_quietly(went_through, self.outage, "sweeping") is not None

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

    # -- (a) open payments -------------------------------------------------------------------

    async def reconcile(self, now: datetime) -> int:
        """Ask Konnect about every open payment due a check; returns how many were asked."""
        checked = 0
        limit = asyncio.Semaphore(_KONNECT_CONCURRENCY)
        while True:
            claimed = await self._claim_open(now)
            outcomes = await asyncio.gather(
                *(self._check(payment, now, limit) for payment in claimed), return_exceptions=True
            )
            _raise_first_outage(outcomes)
            checked += len(claimed)
            if len(claimed) < self.batch:
                return checked

    async def _claim_open(self, now: datetime) -> list[PaymentToCheck]:
        grace = timedelta(seconds=self.settings.reconciliation_grace_seconds)
        interval = timedelta(seconds=self.settings.reconciliation_interval_seconds)
        return await self.service.claim_payments_to_check(
            now, created_before=now - grace, checked_before=now - interval, limit=self.batch
        )

    async def _check(
        self, claimed: PaymentToCheck, now: datetime, limit: asyncio.Semaphore
    ) -> None:
        try:
            async with limit:
                konnect_payment = await self.service.look_up_for_reconciliation(claimed.payment_ref)
            verdict = KonnectVerdict.read(konnect_payment, now)
        except PaymentNotFound:
            # No money can come through a payment Konnect does not know; only our expiry ends it.
            log.error("Konnect does not know pending payment %s", claimed.payment_ref)
            verdict = KonnectVerdict.unknown(claimed.currency)
        except (KonnectError, KonnectUnavailable, MalformedKonnectPayment) as error:
            # Never expire what Konnect could not be asked about: money may have arrived.
            log.warning("reconciliation: %s not checked: %s", claimed.payment_ref, error)
            return
        try:
            await self.service.apply_verdict(claimed.id, claimed.order_id, verdict, now)
        except Exception as exc:
            if is_unreachable(exc):
                raise  # the whole sweep stops: the database is away, not this payment wrong
            log.exception(
                "reconciliation: applying Konnect's verdict on %s failed", claimed.payment_ref
            )

    # -- (b) interrupted initiations ---------------------------------------------------------

    async def repair_initiations(self, now: datetime) -> int:
        """Initiate payments whose lease lapsed (or that nobody claimed); returns how many."""
        grace = timedelta(seconds=self.settings.initiation_grace_seconds)
        claimed = await self.service.claim_lapsed_initiations(
            now, created_before=now - grace, limit=self.batch
        )
        for stored in claimed:
            order_id = stored.payment.order_id
            log.warning("initiating payment of order %s again (interrupted)", order_id)
            try:
                await self.service.initiate_claimed(stored)
            except Exception as exc:
                if is_unreachable(exc):
                    raise  # its lease lapses and a later sweep initiates it again
                log.exception("initiating the payment of order %s failed", order_id)
        return len(claimed)

    # -- (c) escrow ----------------------------------------------------------------------------

    async def release_escrow(self, now: datetime) -> int:
        """Release every held escrow whose scheduled session ended plus the delay; how many."""
        released = 0
        while True:
            count = await self.service.release_due_escrow(now, self.batch)
            released += count
            if count < self.batch:
                return released


def _raise_first_outage(outcomes: list[Any]) -> None:
    """Checks run side by side; if one met an unreachable database, the sweep stops with it."""
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and is_unreachable(outcome):
            raise outcome
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
