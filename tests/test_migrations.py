"""Every service's migrations, as a developer uses them (real Postgres, a throwaway database each):
`make migration` writes an empty revision while the tables and the migrations agree, and every
schema goes up to head, down to base and up again.

The services' own tests check that a migrated schema matches the tables; these check the way
back, and the command that writes the next step.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from alembic import command

from booking.devtools.devrun import MIGRATED
from booking.devtools.fixtures import private_database, schema_differences
from booking.devtools.migration import schema_of
from booking.runtime.migrations import alembic_config
from booking.runtime.settings import async_database_url

ROOT = Path(__file__).resolve().parents[1]


def statements(function: ast.FunctionDef) -> list[ast.stmt]:
    """A function's body without its docstring and `pass`."""
    return [
        node
        for node in function.body
        if not isinstance(node, ast.Pass)
        and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
    ]


@pytest.mark.servers  # private databases of its own
@pytest.mark.parametrize("service", MIGRATED)
def test_make_migration_writes_an_empty_revision_while_tables_and_migrations_agree(
    service: str, tmp_path: Path
) -> None:
    # The command `make migration` runs, writing into tmp_path instead of the source tree (a
    # revision there would be picked up by any test migrating this service meanwhile).
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "booking.devtools.migration",
            service,
            "nothing",
            "--into",
            tmp_path,
        ],
        cwd=ROOT,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [written] = tmp_path.glob("*.py")
    try:
        module = ast.parse(written.read_text())
        functions = {node.name: node for node in module.body if isinstance(node, ast.FunctionDef)}
        changes = {name: statements(functions[name]) for name in ("upgrade", "downgrade")}
        assert changes == {"upgrade": [], "downgrade": []}, (
            f"{service}'s tables differ from its migrations; autogenerate wrote:\n"
            + written.read_text()
        )
        # Numbered after the head, like the revisions before it.
        versions = versions_folder(service).glob("[0-9][0-9][0-9][0-9]_*.py")
        head = max(int(path.name[:4]) for path in versions)
        assert written.name == f"{head + 1:04d}_nothing.py"
    finally:
        written.unlink()


def versions_folder(service: str) -> Path:
    package = importlib.import_module(f"booking.{service}")
    return Path(package.__file__ or "").parent / "migrations" / "versions"


async def tables_in(url: str, schema: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1 AND tablename <> "
            "'alembic_version' ORDER BY tablename",
            schema,
        )
        return [row["tablename"] for row in rows]
    finally:
        await conn.close()


@pytest.mark.servers  # private databases of its own
@pytest.mark.parametrize("service", MIGRATED)
async def test_the_schema_goes_up_to_head_down_to_base_and_up_again(service: str) -> None:
    schema = schema_of(service)
    async with private_database(f"updown_{service}") as url:
        config = alembic_config(async_database_url(url), f"booking.{service}", schema)
        # Alembic's env.py runs an event loop of its own: in a thread, off this one.
        await asyncio.to_thread(command.upgrade, config, "head")
        assert await tables_in(url, schema), "head made no tables"
        await asyncio.to_thread(command.downgrade, config, "base")
        assert await tables_in(url, schema) == [], "base left tables behind"
        await asyncio.to_thread(command.upgrade, config, "head")
        assert await schema_differences(url, schema) == []
