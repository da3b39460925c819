"""The migrated schema keeps the rules the code relies on."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import pytest
from alembic import command

from booking.devtools.fixtures import private_database, schema_differences
from booking.orders.domain import LIVE_SESSION_STATUSES, EscrowStatus, SessionStatus
from booking.orders.settings import OrdersSettings
from booking.orders.tables import NO_OVERLAP, SCHEMA
from booking.runtime.migrations import alembic_config, upgrade


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


async def test_the_migrations_and_the_tables_agree(migrated: str) -> None:
    assert await schema_differences(migrated, SCHEMA) == []


async def test_the_escrow_status_can_only_be_one_the_domain_knows(migrated: str) -> None:
    conn = await asyncpg.connect(migrated)
    try:
        allowed = await conn.fetchval(
            "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c "
            "JOIN pg_namespace n ON n.oid = c.connamespace "
            "WHERE n.nspname = 'orders' AND c.conname = 'ck_orders_escrow_status'"
        )
    finally:
        await conn.close()
    assert set(re.findall(r"'(\w+)'::text", allowed)) == {s.value for s in EscrowStatus}


@pytest.mark.servers  # a private database of its own
async def test_the_recovery_revision_downgrades_and_upgrades_again() -> None:
    async with private_database("orders_migrations") as url:
        settings = OrdersSettings.model_validate({"database_url": url})
        config = alembic_config(settings.async_database_url, "booking.orders", SCHEMA)
        await asyncio.to_thread(upgrade, settings, "booking.orders", SCHEMA)
        await asyncio.to_thread(command.downgrade, config, "0002")
        conn = await asyncpg.connect(url)
        try:
            columns = {
                r["column_name"]
                for r in await conn.fetch(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = 'orders' AND table_name = 'orders'"
                )
            }
            indexes = await conn.fetchval(
                "SELECT count(*) FROM pg_indexes WHERE schemaname = 'orders' "
                "AND indexname = 'ix_orders_pending_created_at'"
            )
        finally:
            await conn.close()
        assert {"escrow_status", "escrow_sequence", "correlation_id"}.isdisjoint(columns)
        assert "status" in columns and indexes == 0
        await asyncio.to_thread(upgrade, settings, "booking.orders", SCHEMA)
        assert await schema_differences(url, SCHEMA) == []
