"""What the deploy/ tests share: the repository's files, the validators, a database of their own.

There is no Docker engine or cluster here, so deploy/ is proven by the tools that validate it
(the Compose specification's schema, kubectl's kustomize, the Kubernetes schemas, hadolint),
all installed into the virtualenv by `make install`, and by running what can run locally: the
Postgres roles, the migrations as those roles, the ops queries.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest
import yaml  # type: ignore[import-untyped]  # no types-PyYAML in the dev group

from booking.devtools.fixtures import with_database

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("gateway", "orders", "payments", "calendar", "notifications")
MIGRATED = ("orders", "payments", "calendar", "notifications")


def tool(name: str) -> str:
    """A validator's executable: the virtualenv's (make install), else one on PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: `make install` brings it (dev dependencies)")
    return found


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def kustomize(directory: Path) -> list[dict[str, Any]]:
    result = run([tool("kubectl"), "kustomize", str(directory)])
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """The kustomize output of the base and of the example overlay."""
    k8s = ROOT / "deploy" / "k8s"
    return {"base": kustomize(k8s / "base"), "example": kustomize(k8s / "overlays" / "example")}


# --- Postgres: a database and roles of the tests' own ------------------------------------------


@dataclass(frozen=True)
class Roles:
    """deploy/postgres/roles.sql applied to a fresh database, under role names no one else has."""

    admin_url: str  # the database, as the superuser that applied the SQL
    database: str
    prefix: str
    passwords: dict[str, str]

    def role(self, service: str) -> str:
        return f"{self.prefix}{service}"

    def url(self, service: str) -> str:
        """The database as `service`'s role would reach it (its DATABASE_URL)."""
        parts = urlsplit(self.admin_url)
        host = parts.hostname or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        user = f"{quote(self.role(service))}:{quote(self.passwords[service])}"
        return urlunsplit(parts._replace(netloc=f"{user}@{host}{port}"))


def apply_roles_sql(admin_url: str, prefix: str, passwords: dict[str, str]) -> None:
    argv = [tool("psql"), admin_url, "--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1"]
    argv += [f"--set=role_prefix={prefix}"]
    argv += [f"--set={service}_password={password}" for service, password in passwords.items()]
    argv += ["--file", str(ROOT / "deploy" / "postgres" / "roles.sql")]
    result = run(argv)
    assert result.returncode == 0, f"roles.sql failed:\n{result.stderr}"


@pytest.fixture(scope="session")
async def roles(database_url: str) -> AsyncIterator[Roles]:
    """A database of its own (the session's is migrated as the superuser by other tests), with
    the roles; roles are cluster-wide, so they get a unique prefix and are dropped at the end."""
    tag = uuid.uuid4().hex[:8]
    database = f"booking_roles_{tag}"
    prefix = f"t{tag}_"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    passwords = {service: f"pw-{service}-{tag}" for service in MIGRATED}
    try:
        admin_url = with_database(database_url, database)
        await asyncio.to_thread(apply_roles_sql, admin_url, prefix, passwords)
        yield Roles(admin_url, database, prefix, passwords)
    finally:
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            for service in MIGRATED:
                await admin.execute(f'DROP ROLE IF EXISTS "{prefix}{service}"')
        finally:
            await admin.close()


def migrate(service: str, database_url: str) -> subprocess.CompletedProcess:
    """`python -m booking.<service> migrate`, as docker-compose.yml and the k8s Job run it."""
    return run(
        [sys.executable, "-m", f"booking.{service}", "migrate"],
        env={**os.environ, "DATABASE_URL": database_url},
    )


@dataclass(frozen=True)
class Deploy:
    """The helpers above, for the test modules (which cannot import this conftest)."""

    root: Path = ROOT
    services: tuple[str, ...] = SERVICES
    migrated: tuple[str, ...] = MIGRATED

    tool = staticmethod(tool)
    run = staticmethod(run)
    migrate = staticmethod(migrate)
    apply_roles_sql = staticmethod(apply_roles_sql)


@pytest.fixture(scope="session")
def deploy() -> Deploy:
    return Deploy()
