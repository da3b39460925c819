"""The composed service: its schema matches its tables, its health reports Konnect."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

from booking.payments.settings import PaymentsSettings
from booking.payments.tables import SCHEMA
from booking.runtime.settings import async_database_url
from booking.runtime.testing import free_port


class TestMigrations:
    async def test_the_migrated_schema_is_exactly_the_tables(self, migrated: str) -> None:
        def differences(connection) -> list:
            def ours(name, type_, parents) -> bool:
                if type_ == "schema":
                    return name == SCHEMA
                if type_ == "table":
                    return parents.get("schema_name") == SCHEMA and name != "alembic_version"
                return True

            def in_schema(obj, name, type_, reflected, compare_to) -> bool:
                # One metadata holds every service's tables when the whole suite runs.
                table = obj if type_ == "table" else getattr(obj, "table", None)
                return table is None or table.schema == SCHEMA

            context = MigrationContext.configure(
                connection,
                opts={"include_schemas": True, "include_name": ours, "include_object": in_schema},
            )
            return compare_metadata(context, SQLModel.metadata)

        engine = create_async_engine(async_database_url(migrated))
        try:
            async with engine.connect() as conn:
                assert await conn.run_sync(differences) == []
        finally:
            await engine.dispose()


def konnect_checks(report: dict) -> dict:
    return {k: v[0] for k, v in report["checks"].items() if k.startswith("konnect:")}


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
