"""The sweeper: orders whose payment never opened, so that no booking holds its slot for ever.

An order still `pending` (payments never said PaymentInitiated, and no money came) once
`PAYMENT_OPENING_TIMEOUT_MINUTES` have passed since its booking fails: payment_failed (payment
`not_opened`), its session cancelled so the slot is free, OrderCancelled (reason
`payment_never_opened`, no admin) so that payments never opens a payment for it afterwards, and
SessionIssueDetected for the admins (docs/recovery.md section 5).

Every replica runs one. A batch of orders is claimed with `FOR UPDATE SKIP LOCKED` and failed
in one transaction, so replicas never take the same order, and a handler that reaches an order
first (the PaymentInitiated that was late) wins: the order is then no longer pending. When the
database is away the sweep says so in one quiet line and tries again at its next interval.
`run_once(now)` is one sweep, at any `now` (tests drive time with it). Each batch is one use
case of the service, `OrderService.fail_unopened_batch`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from booking.orders.service import OrderService
from booking.orders.settings import OrdersSettings
from booking.runtime.clock import utcnow
from booking.runtime.outages import OutageLog
from booking.runtime.sweeping import Every, run_quietly

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Sweep:
    """What one sweep did."""

    unopened_failed: int = 0


class Sweeper:
    def __init__(self, orders: OrderService, settings: OrdersSettings) -> None:
        self.orders = orders
        self.interval = settings.orders_sweeper_interval_seconds
        self.batch = settings.orders_sweeper_batch_size
        self.opening_timeout = timedelta(minutes=settings.payment_opening_timeout_minutes)
        self.outage = OutageLog(log, "Postgres (orders sweeper)")
        self._loop = Every(self.interval, self.sweep, name="orders-sweeper")

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def sweep(self, now: datetime | None = None) -> Sweep | None:
        """One sweep that never raises: a database that cannot be reached is logged quietly
        (once in a while, no trace) and the sweep skipped; anything else is logged in full."""
        return await run_quietly(
            lambda: self.run_once(now), self.outage, "failing orders whose payment never opened"
        )

    async def run_once(self, now: datetime | None = None) -> Sweep:
        """One full sweep at `now` (default: the clock)."""
        now = now or utcnow()
        return Sweep(unopened_failed=await self.fail_unopened_payments(now))

    async def fail_unopened_payments(self, now: datetime) -> int:
        """Fail every order whose payment never opened in time; returns how many."""
        failed = 0
        while True:
            claimed, batch = await self.orders.fail_unopened_batch(
                now, self.opening_timeout, self.batch
            )
            failed += len(batch)
            for stored in batch:
                log.warning(
                    "order %s failed: no payment opened within %s of its booking (%s)",
                    stored.order.id,
                    self.opening_timeout,
                    stored.order.created_at.isoformat(),
                )
            # A full batch may have more behind it; one that changed nothing would come back
            # the same (it cannot, as the query and the rule agree, but never loop on it).
            if claimed < self.batch or not batch:
                return failed
