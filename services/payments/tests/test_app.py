"""The composed service: its schema matches its tables, its health reports Konnect."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
from alembic import command

from booking.devtools.fixtures import (
    free_port,
    health_checks,
    private_database,
    schema_differences,
)
from booking.payments.settings import PaymentsSettings
from booking.payments.tables import SCHEMA
from booking.runtime.migrations import alembic_config, upgrade


async def stage_0002_rows(conn: asyncpg.Connection) -> dict[str, uuid.UUID]:
    """Holds as revision 0002 left them: held, cancelled, frozen (late money), and an open
    payment; their orders by what they were."""
    orders = {name: uuid.uuid4() for name in ("held", "cancelled", "frozen", "pending")}
    for name, order_id in orders.items():
        payment_id = uuid.uuid4()
        completed = name != "pending"
        await conn.execute(
            f"""
            INSERT INTO {SCHEMA}.payments (id, order_id, session_id, mentor_id, session_end_at,
                amount, currency, title, mentee_first_name, mentee_last_name, mentee_email,
                correlation_id, status, amount_paid, platform_fee, escrow_amount)
            VALUES ($1, $2, $3, $4, now(), 120000, 'TND', 't', 'A', 'B', 'a@example.com', 'c',
                $5, $6, $7, $8)
            """,
            payment_id,
            order_id,
            uuid.uuid4(),
            uuid.uuid4(),
            "completed" if completed else "pending",
            120_000 if completed else None,
            18_000 if completed else None,
            102_000 if completed else None,
        )
        if completed:
            await conn.execute(
                f"""
                INSERT INTO {SCHEMA}.escrow_holds (id, order_id, payment_id, mentor_id, amount,
                    currency, status, release_due_at)
                VALUES ($1, $2, $3, $4, 102000, 'TND', $5, now())
                """,
                uuid.uuid4(),
                order_id,
                payment_id,
                uuid.uuid4(),
                name,
            )
    return orders


class TestMigrations:
    async def test_the_migrated_schema_is_exactly_the_tables(self, migrated: str) -> None:
        assert await schema_differences(migrated, SCHEMA) == []

    @pytest.mark.servers  # a private database of its own
    async def test_holds_and_payments_of_0002_are_carried_over_and_back(self) -> None:
        async with private_database("payments_migration") as url:
            settings = PaymentsSettings(database_url=url)
            config = alembic_config(settings.async_database_url, "booking.payments", SCHEMA)
            await asyncio.to_thread(upgrade, settings, "booking.payments", SCHEMA, "0002")
            conn = await asyncpg.connect(url)
            try:
                orders = await stage_0002_rows(conn)
                await asyncio.to_thread(upgrade, settings, "booking.payments", SCHEMA)
                holds = {
                    r["order_id"]: r
                    for r in await conn.fetch(f"SELECT * FROM {SCHEMA}.escrow_holds")
                }
                upgraded = {
                    name: (
                        holds[order]["status"],
                        holds[order]["frozen_reason"],
                        holds[order]["amount_paid"],
                        holds[order]["sequence"],
                    )
                    for name, order in orders.items()
                    if name != "pending"
                }
                assert upgraded == {
                    "held": ("held", None, 120_000, 1),
                    "cancelled": ("frozen", "order_cancelled", 120_000, 1),
                    "frozen": ("frozen", "payment_anomaly", 120_000, 1),
                }
                assert holds[orders["cancelled"]]["release_due_at"] is None
                assert holds[orders["held"]]["release_due_at"] is not None  # as it was
                await conn.execute(
                    f"UPDATE {SCHEMA}.payments SET status = 'underpaid', amount_paid = 1000 "
                    "WHERE order_id = $1",
                    orders["pending"],
                )
                await conn.execute(
                    f"UPDATE {SCHEMA}.escrow_holds SET status = 'refund_due', "
                    "refund_amount = amount_paid WHERE order_id = $1",
                    orders["frozen"],
                )

                await asyncio.to_thread(command.downgrade, config, "0002")

                statuses = {
                    r["order_id"]: r["status"]
                    for r in await conn.fetch(f"SELECT order_id, status FROM {SCHEMA}.escrow_holds")
                }
                assert statuses[orders["frozen"]] == "frozen"  # 0002 knew no refunds
                assert statuses[orders["cancelled"]] == "frozen"
                payment = await conn.fetchval(
                    f"SELECT status FROM {SCHEMA}.payments WHERE order_id = $1", orders["pending"]
                )
                assert payment == "pending"
                assert not await conn.fetchval(
                    "SELECT to_regclass($1) IS NOT NULL", f"{SCHEMA}.order_endings"
                )
            finally:
                await conn.close()


def konnect_checks(report: dict) -> dict:
    return health_checks(report, "konnect:")


class TestHealth:
    async def test_konnect_configured_and_reachable_pass(self, payments_service) -> None:
        response = await payments_service.http.get("/health")

        checks = konnect_checks(response.json())
        assert checks["konnect:configured"]["status"] == "pass"
        assert checks["konnect:reachable"]["status"] == "pass"
        assert checks["konnect:reachable"]["observedUnit"] == "ms"

    async def test_konnect_out_of_reach_warns_and_never_touches_readiness(
        self, start_payments
    ) -> None:
        running = await start_payments(konnect_api_url=f"http://127.0.0.1:{free_port()}/api/v2")

        full = await running.http.get("/health")
        ready = await running.http.get("/health/ready")

        assert full.status_code == 200 and full.json()["status"] == "warn"
        assert konnect_checks(full.json())["konnect:reachable"]["status"] == "warn"
        assert ready.status_code == 200 and konnect_checks(ready.json()) == {}

    async def test_konnect_not_configured_is_reported(self, start_payments) -> None:
        running = await start_payments(konnect_wallet_id="")

        full = await running.http.get("/health")

        configured = konnect_checks(full.json())["konnect:configured"]
        assert configured["status"] == "fail" and "KONNECT_WALLET_ID" in configured["output"]
        assert (await running.http.get("/health/ready")).status_code == 200

    async def test_the_api_key_is_not_in_any_health_report(self, payments_service) -> None:
        key = PaymentsSettings().konnect_api_key.get_secret_value()
        for path in ("/health", "/health/ready"):
            assert key not in (await payments_service.http.get(path)).text
