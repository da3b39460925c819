"""The migrated schema keeps the rules the code relies on."""

from __future__ import annotations

import re

import asyncpg

from booking.orders.domain import LIVE_SESSION_STATUSES, SessionStatus
from booking.orders.tables import NO_OVERLAP


async def test_the_slot_constraint_holds_exactly_the_live_sessions(migrated: str) -> None:
    conn = await asyncpg.connect(migrated)
    try:
        definition = await conn.fetchval(
            "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c "
            "JOIN pg_namespace n ON n.oid = c.connamespace "
            "WHERE n.nspname = 'orders' AND c.conname = $1",
            NO_OVERLAP,
        )
        allowed = await conn.fetchval(
            "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c "
            "JOIN pg_namespace n ON n.oid = c.connamespace "
            "WHERE n.nspname = 'orders' AND c.conname = 'ck_booked_sessions_status'"
        )
    finally:
        await conn.close()
    assert definition.startswith("EXCLUDE USING gist (mentor_id WITH =, tstzrange(start_at")
    assert "'[)'" in definition
    where = definition.split("WHERE", 1)[1]
    assert set(re.findall(r"'(\w+)'::text", where)) == {s.value for s in LIVE_SESSION_STATUSES}
    assert set(re.findall(r"'(\w+)'::text", allowed)) == {s.value for s in SessionStatus}
