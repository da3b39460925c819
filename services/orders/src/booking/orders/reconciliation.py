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
`run_once(now)` is one sweep, at any `now` (tests drive time with it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from booking.contracts import OrderCancelled, SessionIssueDetected, SessionIssueKind
from booking.orders.domain import OrderStatus, PaymentStatus, fail_unopened_payment
from booking.orders.service import event_id
from booking.orders.settings import OrdersSettings
from booking.orders.tables import BookedSessionRow, OrderRow
from booking.runtime.context import correlated
from booking.runtime.db import Database
from booking.runtime.outages import OutageLog
from booking.runtime.outbox import Outbox
from booking.runtime.sweeping import Every, run_quietly

log = logging.getLogger(__name__)

PAYMENT_NEVER_OPENED = "payment_never_opened"
"""OrderCancelled's reason when orders failed the order itself: no payment opened in time."""


@dataclass(frozen=True, slots=True)
class Sweep:
    """What one sweep did."""

    unopened_failed: int = 0


class Sweeper:
    def __init__(self, db: Database, outbox: Outbox, settings: OrdersSettings) -> None:
        self.db = db
        self.outbox = outbox
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
        now = now or datetime.now(UTC)
        return Sweep(unopened_failed=await self.fail_unopened_payments(now))

    async def fail_unopened_payments(self, now: datetime) -> int:
        """Fail every order whose payment never opened in time; returns how many."""
        failed = 0
        while True:
            claimed, count = await self._fail_unopened_batch(now)
            failed += count
            # A full batch may have more behind it; one that changed nothing would come back
            # the same (it cannot, as the query and the rule agree, but never loop on it).
            if claimed < self.batch or count == 0:
                return failed

    async def _fail_unopened_batch(self, now: datetime) -> tuple[int, int]:
        due = (
            select(OrderRow, BookedSessionRow)
            .join(BookedSessionRow, BookedSessionRow.order_id == OrderRow.id)
            .where(
                OrderRow.status == OrderStatus.PENDING.value,
                OrderRow.payment_ref.is_(None),
                OrderRow.amount_paid == 0,
                OrderRow.created_at <= now - self.opening_timeout,
            )
            .order_by(OrderRow.created_at)
            .limit(self.batch)
            .with_for_update(of=[OrderRow, BookedSessionRow], skip_locked=True)
        )
        failed: list[OrderRow] = []
        async with self.db.transaction() as session:
            rows = (await session.execute(due)).all()
            for row, booked_row in rows:
                order, booked = row.to_domain(), booked_row.to_domain()
                if not fail_unopened_payment(order, booked, now, self.opening_timeout):
                    continue
                row.record(order)
                booked_row.record(booked)
                row.payment_status = PaymentStatus.NOT_OPENED.value
                with correlated(row.correlation_id):
                    await self._record_failure(session, row, booked_row)
                failed.append(row)
        for row in failed:
            log.warning(
                "order %s failed: no payment opened within %s of its booking (%s)",
                row.id,
                self.opening_timeout,
                row.created_at.isoformat(),
            )
        return len(rows), len(failed)

    async def _record_failure(
        self, session: AsyncSession, row: OrderRow, booked_row: BookedSessionRow
    ) -> None:
        await self.outbox.record(
            session,
            OrderCancelled(
                order_id=row.id,
                session_id=booked_row.id,
                mentor_id=row.mentor_id,
                reason=PAYMENT_NEVER_OPENED,
                by=None,
            ),
            message_id=event_id(f"OrderCancelled:{row.id}"),
        )
        minutes = self.opening_timeout.total_seconds() / 60
        await self.outbox.record(
            session,
            SessionIssueDetected(
                order_id=row.id,
                session_id=booked_row.id,
                kind=SessionIssueKind.PAYMENT_NEVER_OPENED,
                detail=(
                    f"order {row.id}, booked at {row.created_at.isoformat()}, had no payment "
                    f"opened within {minutes:g} minutes: it failed and its slot "
                    f"({booked_row.start_at.isoformat()}) was freed"
                ),
            ),
            message_id=event_id(f"SessionIssueDetected:{PAYMENT_NEVER_OPENED}:{row.id}"),
        )
