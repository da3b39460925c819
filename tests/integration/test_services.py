"""Every service migrates its own schema, starts, and reports ready on the real servers."""

from __future__ import annotations

import asyncio
import importlib
import os
import subprocess
import sys

import asyncpg
import httpx
import pytest

from booking.calendar.settings import CalendarSettings
from booking.devtools.fixtures import serving
from booking.gateway.settings import GatewaySettings
from booking.notifications.settings import NotificationsSettings
from booking.orders.settings import OrdersSettings
from booking.payments.settings import PaymentsSettings

WITH_DATABASE = ["orders", "payments", "calendar", "notifications"]
SETTINGS = {
    "orders": OrdersSettings,
    "payments": PaymentsSettings,
    "calendar": CalendarSettings,
    "notifications": NotificationsSettings,
    "gateway": GatewaySettings,
}


def migrate(service: str, database_url: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"booking.{service}", "migrate"],
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
async def migrated(database_url: str) -> str:
    results = await asyncio.gather(
        *(asyncio.to_thread(migrate, s, database_url) for s in WITH_DATABASE)
    )
    for service, result in zip(WITH_DATABASE, results, strict=True):
        assert result.returncode == 0, f"{service} migrate failed:\n{result.stderr}"
    return database_url


class TestMigrations:
    async def test_each_service_owns_one_schema_with_its_own_version_table(self, migrated):
        conn = await asyncpg.connect(migrated)
        try:
            rows = await conn.fetch(
                "SELECT table_schema, table_name FROM information_schema.tables "
                "WHERE table_schema = ANY($1::text[])",
                WITH_DATABASE,
            )
        finally:
            await conn.close()
        tables = {(r["table_schema"], r["table_name"]) for r in rows}
        for schema in WITH_DATABASE:
            assert {(schema, "alembic_version"), (schema, "outbox"), (schema, "inbox")} <= tables
        assert not any(schema == "public" for schema, _ in tables)

    async def test_each_outbox_notifies_its_relays_on_commit(self, migrated):
        conn = await asyncpg.connect(migrated)
        try:
            triggers = await conn.fetch(
                "SELECT n.nspname AS schema FROM pg_trigger t "
                "JOIN pg_class c ON c.oid = t.tgrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE t.tgname = 'outbox_notify' AND c.relname = 'outbox'"
                # Other tests' schemas may share this database: only the services' count here.
                " AND n.nspname = ANY($1::text[])",
                list(WITH_DATABASE),
            )
            schema = WITH_DATABASE[0]
            await conn.execute(f"LISTEN outbox_{schema}")
            heard = asyncio.Queue()
            await conn.add_listener(f"outbox_{schema}", lambda *args: heard.put_nowait(args))
            async with conn.transaction():
                await conn.execute(
                    f"INSERT INTO {schema}.outbox (message_id, exchange, routing_key, event_type,"
                    " correlation_id, body) VALUES (gen_random_uuid(), 'x', 'k', 'T', 'c', '{{}}')"
                )
            async with asyncio.timeout(5):
                await heard.get()
        finally:
            await conn.close()
        assert {r["schema"] for r in triggers} == set(WITH_DATABASE)

    async def test_migrating_again_changes_nothing(self, migrated):
        result = await asyncio.to_thread(migrate, "orders", migrated)
        assert result.returncode == 0, result.stderr
        assert "Running upgrade" not in result.stdout + result.stderr


@pytest.mark.parametrize("service", [*WITH_DATABASE, "gateway"])
async def test_each_service_serves_ready_live_and_metrics(service, migrated, make_settings):
    module = importlib.import_module(f"booking.{service}.app")
    settings_type = SETTINGS[service]
    app = module.create_app(make_settings(settings_type))
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        await app.state.runtime.broker.wait_ready(15)
        ready = await client.get("/health/ready")
        live = await client.get("/health/live")
        metrics = await client.get("/metrics")
    assert ready.status_code == 200, ready.text
    assert ready.json()["serviceId"] == service
    assert live.status_code == 200
    assert metrics.status_code == 200
    assert "booking_http_requests_total" in metrics.text
