"""Pruning what the messaging tables no longer need, so they do not grow without end.

Sent outbox rows are kept for a while for audit, then deleted. Inbox records are what make a
redelivery harmless, so they are kept much longer than any redelivery can come (retries take
seconds; a dead letter replayed by hand may take days), and the record of a message kept as a
dead letter stays until an admin replays or discards it, whatever its age. Deletes go in
bounded batches, and any number of replicas may prune at once: the same delete twice deletes
once.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from booking.runtime.outages import OutageLog
from booking.runtime.sweeping import Every, run_quietly
from booking.runtime.tables import MessagingTables

log = logging.getLogger(__name__)


class Housekeeping:
    def __init__(
        self,
        engine: AsyncEngine,
        tables: MessagingTables,
        *,
        outbox_retention: timedelta,
        inbox_retention: timedelta,
        interval: float = 300.0,
        batch_size: int = 5000,
    ) -> None:
        self.engine = engine
        self.interval = interval
        self.batch_size = batch_size
        schema = tables.schema
        self._statements = [
            (
                text(
                    f'DELETE FROM "{schema}".outbox WHERE id IN (SELECT id FROM "{schema}".outbox'
                    " WHERE sent_at < now() - CAST(:keep AS interval) LIMIT :limit)"
                ),
                outbox_retention,
            ),
            (
                text(
                    f'DELETE FROM "{schema}".inbox WHERE ctid IN (SELECT i.ctid'
                    f' FROM "{schema}".inbox AS i'
                    " WHERE i.handled_at < now() - CAST(:keep AS interval)"
                    f' AND NOT EXISTS (SELECT 1 FROM "{schema}".dead_letters AS d'
                    "   WHERE d.status = 'kept' AND d.message_id = i.message_id::text"
                    "     AND d.consumer = i.consumer)"
                    " LIMIT :limit)"
                ),
                inbox_retention,
            ),
        ]
        self.outage = OutageLog(log, f"the database (housekeeping of {schema})")
        self._loop = Every(interval, self._prune_quietly, name="housekeeping")

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def prune(self) -> int:
        """Delete everything past its retention, batch by batch; returns how many rows."""
        deleted = 0
        for statement, keep in self._statements:
            while True:
                async with self.engine.begin() as conn:
                    result = await conn.execute(statement, {"keep": keep, "limit": self.batch_size})
                deleted += result.rowcount
                if result.rowcount < self.batch_size:
                    break
        return deleted

    async def _prune_quietly(self) -> None:
        if deleted := await run_quietly(self.prune, self.outage, "pruning the messaging tables"):
            log.info("pruned %d outbox and inbox rows past their retention", deleted)
