"""deploy/postgres/roles.sql against the local Postgres: one role per service, owning only its
schema; each service migrates and serves as its role, and is refused on every other schema."""

from __future__ import annotations

import asyncio
import importlib
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from booking.devtools.fixtures import serving, with_database
from booking.runtime.auth import issue_token

pytestmark = pytest.mark.timeout(300)

MIGRATED = ("orders", "payments", "calendar", "notifications")

SETTINGS = {
    "orders": "booking.orders.settings:OrdersSettings",
    "payments": "booking.payments.settings:PaymentsSettings",
    "calendar": "booking.calendar.settings:CalendarSettings",
    "notifications": "booking.notifications.settings:NotificationsSettings",
}


def others(service: str) -> list[str]:
    return [s for s in MIGRATED if s != service]


async def denied(conn: asyncpg.Connection, statement: str) -> str:
    """The message Postgres refuses `statement` with (the test fails if it is allowed)."""
    with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
        await conn.execute(statement)
    return str(refused.value)


class TestTheRoles:
    async def test_a_role_may_log_in_and_nothing_more(self, roles):
        admin = await asyncpg.connect(roles.admin_url)
        try:
            rows = await admin.fetch(
                "SELECT rolname, rolcanlogin, rolsuper, rolcreatedb, rolcreaterole,"
                " rolreplication, rolbypassrls,"
                " has_database_privilege(rolname, current_database(), 'CONNECT') AS can_connect,"
                " has_database_privilege(rolname, current_database(), 'CREATE') AS can_create,"
                " has_database_privilege(rolname, current_database(), 'TEMPORARY') AS can_temp"
                " FROM pg_roles WHERE rolname LIKE $1 || '%'",
                roles.prefix,
            )
        finally:
            await admin.close()
        assert {r["rolname"] for r in rows} == {roles.role(s) for s in MIGRATED}
        for row in rows:
            assert {k: v for k, v in row.items() if k != "rolname"} == {
                "rolcanlogin": True,
                "rolsuper": False,
                "rolcreatedb": False,
                "rolcreaterole": False,
                "rolreplication": False,
                "rolbypassrls": False,
                "can_connect": True,
                "can_create": False,
                "can_temp": False,
            }, row["rolname"]

    async def test_each_role_owns_its_schema_and_has_no_right_on_another(self, roles):
        admin = await asyncpg.connect(roles.admin_url)
        try:
            owners = dict(
                await admin.fetch(
                    "SELECT nspname, pg_get_userbyid(nspowner) FROM pg_namespace"
                    " WHERE nspname = ANY($1::text[])",
                    list(MIGRATED),
                )
            )
            rights = {
                (service, schema): await admin.fetchval(
                    "SELECT has_schema_privilege($1, $2, 'USAGE')"
                    " OR has_schema_privilege($1, $2, 'CREATE')",
                    roles.role(service),
                    schema,
                )
                for service in MIGRATED
                for schema in (*MIGRATED, "public", "extensions")
            }
        finally:
            await admin.close()
        assert owners == {s: roles.role(s) for s in MIGRATED}
        assert {key for key, allowed in rights.items() if allowed} == {(s, s) for s in MIGRATED}

    @pytest.mark.parametrize("service", MIGRATED)
    async def test_each_role_works_in_its_own_schema(self, roles, service):
        conn = await asyncpg.connect(roles.url(service))
        try:
            # Unqualified: the role's search_path is its own schema.
            await conn.execute("CREATE TABLE deploy_probe (id int PRIMARY KEY, note text)")
            await conn.execute("INSERT INTO deploy_probe VALUES (1, 'written')")
            await conn.execute("UPDATE deploy_probe SET note = 'changed' WHERE id = 1")
            note = await conn.fetchval(f"SELECT note FROM {service}.deploy_probe WHERE id = 1")
            where = await conn.fetchval(
                "SELECT relnamespace::regnamespace::text FROM pg_class"
                " WHERE oid = 'deploy_probe'::regclass"
            )
            await conn.execute("DROP TABLE deploy_probe")
        finally:
            await conn.close()
        assert note == "changed"
        assert where == service

    @pytest.mark.parametrize("service", MIGRATED)
    async def test_each_role_is_refused_on_every_other_schema(self, roles, service):
        conn = await asyncpg.connect(roles.url(service))
        try:
            for other in others(service):
                for statement in (
                    f"CREATE TABLE {other}.intruder (id int)",
                    f"SELECT 1 FROM {other}.deploy_anything",
                    f"CREATE FUNCTION {other}.intruder() RETURNS int LANGUAGE sql AS 'SELECT 1'",
                ):
                    assert f"permission denied for schema {other}" in await denied(conn, statement)
        finally:
            await conn.close()

    @pytest.mark.parametrize("service", MIGRATED)
    async def test_no_role_creates_schemas_temporary_tables_or_anything_in_public(
        self, roles, service
    ):
        conn = await asyncpg.connect(roles.url(service))
        try:
            assert "permission denied for database" in await denied(
                conn, "CREATE SCHEMA deploy_intruder"
            )
            assert "temporary tables" in await denied(conn, "CREATE TEMP TABLE t (id int)")
            assert "permission denied for schema public" in await denied(
                conn, "CREATE TABLE public.intruder (id int)"
            )
            assert "permission denied to create extension" in await denied(
                conn, "CREATE EXTENSION IF NOT EXISTS hstore"
            )
        finally:
            await conn.close()

    async def test_orders_can_build_its_no_overlap_constraint_on_btree_gist(self, roles):
        # What the orders migration needs: the extension exists, made by the database's owner.
        conn = await asyncpg.connect(roles.url("orders"))
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS btree_gist")  # a no-op now
            await conn.execute(
                "CREATE TABLE deploy_slots (mentor_id uuid, during tstzrange,"
                " EXCLUDE USING gist (mentor_id WITH =, during WITH &&))"
            )
            mentor = uuid.uuid4()
            insert = "INSERT INTO deploy_slots VALUES ($1, tstzrange($2, $3))"
            ten = datetime(2030, 1, 1, 10, tzinfo=UTC)
            await conn.execute(insert, mentor, ten, ten + timedelta(hours=1))
            with pytest.raises(asyncpg.ExclusionViolationError):
                half_past = ten + timedelta(minutes=30)
                await conn.execute(insert, mentor, half_past, half_past + timedelta(hours=1))
            await conn.execute("DROP TABLE deploy_slots")
            schema = await conn.fetchval(
                "SELECT extnamespace::regnamespace::text FROM pg_extension"
                " WHERE extname = 'btree_gist'"
            )
        finally:
            await conn.close()
        assert schema == "extensions"

    async def test_applying_it_again_changes_nothing_and_keeps_the_passwords(self, roles, deploy):
        async def state() -> list:
            admin = await asyncpg.connect(roles.admin_url)
            try:
                return [
                    *await admin.fetch(
                        "SELECT rolname, rolsuper, rolcreatedb, rolcanlogin, rolpassword"
                        " FROM pg_authid WHERE rolname LIKE $1 || '%' ORDER BY rolname",
                        roles.prefix,
                    ),
                    *await admin.fetch(
                        "SELECT nspname, nspowner::regrole::text, nspacl::text FROM pg_namespace"
                        " WHERE nspname !~ '^pg_(toast_)?temp_' ORDER BY nspname"
                    ),
                    await admin.fetchrow(
                        "SELECT datacl::text FROM pg_database WHERE datname = current_database()"
                    ),
                ]
            finally:
                await admin.close()

        before = await state()
        # No passwords this time: the ones set stay.
        await asyncio.to_thread(deploy.apply_roles_sql, roles.admin_url, roles.prefix, {})
        after = await state()
        assert after == before
        assert all(row["rolpassword"] for row in before[: len(MIGRATED)])


# --- migrations and services, as the roles ------------------------------------------------------


@pytest.fixture(scope="module")
async def migrated(roles, deploy):
    """Each service migrated by `python -m booking.<service> migrate` as its own role."""
    results = await asyncio.gather(
        *(asyncio.to_thread(deploy.migrate, s, roles.url(s)) for s in MIGRATED)
    )
    failed = {s: r.stderr for s, r in zip(MIGRATED, results, strict=True) if r.returncode}
    assert not failed, "\n\n".join(f"{s} migrate failed:\n{err}" for s, err in failed.items())
    return roles


class TestServicesRunAsTheirRoles:
    async def test_each_schema_is_migrated_by_its_role_and_holds_everything_it_made(self, migrated):
        admin = await asyncpg.connect(migrated.admin_url)
        try:
            rows = await admin.fetch(
                "SELECT n.nspname AS schema, c.relname AS name,"
                " pg_get_userbyid(c.relowner) AS owner"
                " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.relkind IN ('r', 'p', 'S') AND NOT n.nspname LIKE 'pg\\_%'"
                " AND n.nspname NOT IN ('information_schema')"
            )
        finally:
            await admin.close()
        tables = {(r["schema"], r["name"]) for r in rows}
        for service in MIGRATED:
            assert {(service, "alembic_version"), (service, "outbox"), (service, "inbox")} <= tables
        assert {r["schema"] for r in rows} == set(MIGRATED)  # nothing in public or elsewhere
        assert {(r["schema"], r["owner"]) for r in rows} == {
            (s, migrated.role(s)) for s in MIGRATED
        }

    @pytest.mark.parametrize("service", MIGRATED)
    async def test_each_role_writes_and_reads_its_tables_and_no_one_elses(self, migrated, service):
        conn = await asyncpg.connect(migrated.url(service))
        try:
            message_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO inbox (message_id, consumer, event_type) VALUES ($1, 'deploy', 'T')",
                message_id,
            )
            # The outbox's trigger (a function the role made) notifies the relays.
            await conn.execute(
                "INSERT INTO outbox (message_id, exchange, routing_key, event_type,"
                " correlation_id, body) VALUES ($1, 'x', 'k', 'T', 'c', '{}')",
                message_id,
            )
            found = await conn.fetchval(
                f"SELECT count(*) FROM {service}.inbox i JOIN {service}.outbox o"
                " USING (message_id) WHERE message_id = $1",
                message_id,
            )
            for other in others(service):
                for statement in (
                    f"SELECT count(*) FROM {other}.outbox",
                    f"INSERT INTO {other}.inbox (message_id, consumer, event_type)"
                    " VALUES (gen_random_uuid(), 'intruder', 'T')",
                    f"DELETE FROM {other}.alembic_version",
                ):
                    assert f"permission denied for schema {other}" in await denied(conn, statement)
        finally:
            await conn.close()
        assert found == 1

    async def test_migrating_again_as_the_role_changes_nothing(self, migrated, deploy):
        result = await asyncio.to_thread(deploy.migrate, "orders", migrated.url("orders"))
        assert result.returncode == 0, result.stderr
        assert "Running upgrade" not in result.stdout + result.stderr

    @pytest.mark.parametrize("service", MIGRATED)
    async def test_each_service_is_ready_as_its_role(self, migrated, make_settings, service):
        module, name = SETTINGS[service].split(":")
        settings_type = getattr(importlib.import_module(module), name)
        settings = make_settings(settings_type, database_url=migrated.url(service))
        app = importlib.import_module(f"booking.{service}.app").create_app(settings)
        async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
            await app.state.runtime.broker.wait_ready(15)
            ready = await client.get("/health/ready")
            report = await client.get("/health")
            written = None
            if service == "orders":  # a write through the API: the row and its outbox event
                token = issue_token(settings.auth_jwt_secret.get_secret_value(), "ops", "admin")
                written = await client.post(
                    "/api/mentors",
                    headers={"Authorization": f"Bearer {token}"},
                    json={"name": "Amira", "email": "amira@example.com", "timezone": "UTC"},
                )
        assert ready.status_code == 200, ready.text
        checks = report.json()["checks"]
        assert checks["database:responseTime"][0]["status"] == "pass", checks
        assert checks["outbox:lag"][0]["status"] == "pass", checks
        if written is not None:
            assert written.status_code == 201, written.text


async def test_a_managed_postgres_admin_who_is_no_superuser_can_apply_it(database_url, deploy):
    # RDS, Cloud SQL and Azure give an admin user with CREATEROLE that owns the database.
    tag = uuid.uuid4().hex[:8]
    admin_role, database, prefix = f"t{tag}_admin", f"booking_managed_{tag}", f"t{tag}_"
    server = await asyncpg.connect(database_url)
    try:
        await server.execute(f"CREATE ROLE \"{admin_role}\" LOGIN CREATEROLE PASSWORD '{tag}'")
        await server.execute(f'CREATE DATABASE "{database}" OWNER "{admin_role}"')
        parts = urlsplit(with_database(database_url, database))
        netloc = f"{admin_role}:{tag}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        owner_url = parts._replace(netloc=netloc).geturl()
        await asyncio.to_thread(deploy.apply_roles_sql, owner_url, prefix, {"orders": tag})
        conn = await asyncpg.connect(owner_url)
        try:
            owners = dict(
                await conn.fetch(
                    "SELECT nspname, pg_get_userbyid(nspowner) FROM pg_namespace"
                    " WHERE nspname = ANY($1::text[])",
                    list(MIGRATED),
                )
            )
            extension = await conn.fetchval(
                "SELECT extnamespace::regnamespace::text FROM pg_extension"
                " WHERE extname = 'btree_gist'"
            )
        finally:
            await conn.close()
        assert owners == {s: f"{prefix}{s}" for s in MIGRATED}
        assert extension == "extensions"
    finally:
        await server.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        for role in (*(f"{prefix}{s}" for s in MIGRATED), admin_role):
            await server.execute(f'DROP ROLE IF EXISTS "{role}"')
        await server.close()
