"""Housekeeping prunes sent outbox rows and old inbox records, and nothing else."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import func, select, update

from booking.runtime.housekeeping import Housekeeping


async def test_prunes_only_what_is_past_its_retention(make_service, new_event):
    service = await make_service(start=False)
    outbox, inbox = service.tables.outbox, service.tables.inbox
    old_sent, recent_sent, old_unsent = await service.record(new_event(), new_event(), new_event())
    async with service.db.transaction() as session:
        await session.execute(
            update(outbox)
            .where(outbox.c.message_id.in_([old_sent, old_unsent]))
            .values(created_at=func.now() - timedelta(days=30))
        )
        await session.execute(
            update(outbox)
            .where(outbox.c.message_id == old_sent)
            .values(sent_at=func.now() - timedelta(days=10))
        )
        await session.execute(
            update(outbox).where(outbox.c.message_id == recent_sent).values(sent_at=func.now())
        )
        old_seen, recent_seen = uuid.uuid4(), uuid.uuid4()
        for message_id, age in ((old_seen, timedelta(days=40)), (recent_seen, timedelta(0))):
            await session.execute(
                inbox.insert().values(
                    message_id=message_id,
                    consumer="c",
                    event_type="X",
                    handled_at=func.now() - age,
                )
            )

    housekeeping = Housekeeping(
        service.db.engine,
        service.tables,
        outbox_retention=timedelta(days=7),
        inbox_retention=timedelta(days=30),
        batch_size=1,  # several batches: the loop must keep going until nothing is left
    )
    assert await housekeeping.prune() == 2

    async with service.db.engine.connect() as conn:
        kept_events = set(await conn.scalars(select(outbox.c.message_id)))
        kept_seen = set(await conn.scalars(select(inbox.c.message_id)))
    # An unsent event is never pruned, however old: it has yet to be published.
    assert kept_events == {recent_sent, old_unsent}
    assert kept_seen == {recent_seen}
