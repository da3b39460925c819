"""The composed service: its schema matches its tables, its health reports Konnect."""

from __future__ import annotations

from booking.payments.settings import PaymentsSettings
from booking.payments.tables import SCHEMA
from booking.runtime.testing import free_port, health_checks, schema_differences


class TestMigrations:
    async def test_the_migrated_schema_is_exactly_the_tables(self, migrated: str) -> None:
        assert await schema_differences(migrated, SCHEMA) == []


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
