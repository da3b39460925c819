"""The composed service: its schema matches its tables, its health reports Google."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

from booking.calendar.tables import SCHEMA
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


def google_checks(report: dict) -> dict:
    return {k: v[0] for k, v in report["checks"].items() if k.startswith("google:")}


class TestHealth:
    async def test_google_configured_and_reachable_pass(self, calendar) -> None:
        response = await calendar.http.get("/health")

        checks = google_checks(response.json())
        assert checks["google:configured"]["status"] == "pass"
        assert checks["google:reachable"]["status"] == "pass"
        assert checks["google:reachable"]["observedUnit"] == "ms"

    async def test_google_out_of_reach_warns_and_never_touches_readiness(
        self, start_calendar
    ) -> None:
        running = await start_calendar(google_token_url=f"http://127.0.0.1:{free_port()}/token")

        full = await running.http.get("/health")
        ready = await running.http.get("/health/ready")

        assert full.status_code == 200 and full.json()["status"] == "warn"
        assert google_checks(full.json())["google:reachable"]["status"] == "warn"
        assert ready.status_code == 200 and google_checks(ready.json()) == {}

    async def test_google_not_configured_is_reported(self, start_calendar) -> None:
        running = await start_calendar(google_client_id="", google_calendar_api_url="")

        full = await running.http.get("/health")

        configured = google_checks(full.json())["google:configured"]
        assert configured["status"] == "fail"
        assert "GOOGLE_CLIENT_ID" in configured["output"]
        assert "GOOGLE_CALENDAR_API_URL" in configured["output"]
        assert (await running.http.get("/health/ready")).status_code == 200

    async def test_no_secret_is_in_any_health_report(self, calendar) -> None:
        secrets = (
            calendar.settings.google_client_secret.get_secret_value(),
            calendar.settings.token_encryption_key.get_secret_value(),
        )
        for path in ("/health", "/health/ready"):
            text = (await calendar.http.get(path)).text
            assert not any(secret in text for secret in secrets)
