"""Every service has the same shape (the template in docs/architecture.md), read from the source
alone: no server, no import of the services' code.

- Every service with a database (orders, payments, calendar, notifications) has the template's
  files: api.py, handlers.py, service.py, repository.py, domain.py, tables.py, settings.py,
  app.py.
- Only repository.py, tables.py and migrations/ touch the tables: no other module of those
  services imports from sqlalchemy, sqlmodel or asyncpg. One exception, by name: AsyncSession
  and AsyncConnection from sqlalchemy.ext.asyncio, used only in type annotations. A use case
  runs on the unit of work's session and hands it to the repository, so its signatures name that
  type; a name that appears only in annotations builds no statement and runs no SQL. Any other
  use of those two (building a session, subclassing one) is reported, and so is every other name
  from those libraries: statements (select, text, func, insert), rows, the database's errors.
- Every domain.py is pure: it imports nothing that does I/O (no database, broker, HTTP client or
  web framework).
- The gateway has no schema: no repository.py, no tables.py, no migrations.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WITH_DATABASE = ("orders", "payments", "calendar", "notifications")
TEMPLATE = (
    "api.py",
    "handlers.py",
    "service.py",
    "repository.py",
    "domain.py",
    "tables.py",
    "settings.py",
    "app.py",
)
# Modules allowed to hold SQL, relative to a service's package.
SQL_HOMES = ("repository.py", "tables.py", "migrations")
SQL_LIBRARIES = ("sqlalchemy", "sqlmodel", "asyncpg")
# Names from SQL libraries that a module may import to annotate with, and only to annotate with.
ANNOTATION_ONLY = {"sqlalchemy.ext.asyncio": frozenset({"AsyncSession", "AsyncConnection"})}
IO_LIBRARIES = (
    *SQL_LIBRARIES,
    "alembic",
    "httpx",
    "aiohttp",
    "aio_pika",
    "aiormq",
    "faststream",
    "fastapi",
    "starlette",
    "uvicorn",
)

# Services that do not have this shape yet, each skipped explicitly with its name. Empty when
# every service does: a name here is work left, not a rule.
KNOWN_GAPS: set[str] = set()


def package(service: str) -> Path:
    return ROOT / "services" / service / "src" / "booking" / service


def modules(service: str) -> Iterator[Path]:
    yield from sorted(package(service).rglob("*.py"))


def skip_known_gap(service: str) -> None:
    if service in KNOWN_GAPS:
        pytest.skip(f"{service} is in KNOWN_GAPS: it does not have the template's shape yet")


def imports(tree: ast.AST) -> Iterator[tuple[str, str | None, ast.Import | ast.ImportFrom]]:
    """(module, name or None for `import module`, the statement) for every import, nested ones
    included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                yield node.module, alias.name, node


def from_library(module: str, libraries: tuple[str, ...]) -> bool:
    return any(module == lib or module.startswith(f"{lib}.") for lib in libraries)


def annotation_nodes(tree: ast.AST) -> set[int]:
    """The ids of every node inside a type annotation."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        annotations: list[ast.expr | None] = []
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            arguments = node.args
            every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
            every += [a for a in (arguments.vararg, arguments.kwarg) if a is not None]
            annotations += [a.annotation for a in every]
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for annotation in annotations:
            if annotation is not None:
                inside.update(id(sub) for sub in ast.walk(annotation))
    return inside


def sql_imports(path: Path) -> list[str]:
    """What `path` imports from the SQL libraries, beyond annotation-only names used only so."""
    tree = ast.parse(path.read_text(), filename=str(path))
    in_annotations = annotation_nodes(tree)
    found: list[str] = []
    for module, name, node in imports(tree):
        if not from_library(module, SQL_LIBRARIES):
            continue
        what = f"line {node.lineno}: " + (
            f"import {module}" if name is None else f"{module}.{name}"
        )
        if name is not None and name in ANNOTATION_ONLY.get(module, ()):
            bound = next(a.asname or a.name for a in node.names if a.name == name)
            misuse = [
                use.lineno
                for use in ast.walk(tree)
                if isinstance(use, ast.Name) and use.id == bound and id(use) not in in_annotations
            ]
            if not misuse:
                continue
            what += f" (used outside annotations on line {', '.join(map(str, misuse))})"
        found.append(what)
    return found


def outside_sql_homes(service: str) -> Iterator[Path]:
    for path in modules(service):
        relative = path.relative_to(package(service))
        if relative.parts[0] not in SQL_HOMES:
            yield path


@pytest.mark.parametrize("service", WITH_DATABASE)
def test_a_service_with_a_database_has_the_template_files(service: str) -> None:
    skip_known_gap(service)
    missing = [name for name in TEMPLATE if not (package(service) / name).is_file()]
    assert missing == [], f"{service} lacks {', '.join(missing)} (docs/architecture.md's template)"


@pytest.mark.parametrize("service", WITH_DATABASE)
def test_only_the_repository_tables_and_migrations_import_sql(service: str) -> None:
    skip_known_gap(service)
    found = {
        str(path.relative_to(package(service))): imported
        for path in outside_sql_homes(service)
        if (imported := sql_imports(path))
    }
    assert found == {}, (
        f"{service}: SQL belongs in repository.py (the tables in tables.py); these modules "
        f"import it: {found}"
    )


@pytest.mark.parametrize("service", WITH_DATABASE)
def test_the_domain_does_no_io(service: str) -> None:
    path = package(service) / "domain.py"
    if not path.is_file():
        skip_known_gap(service)
        pytest.fail(f"{service} has no domain.py")
    tree = ast.parse(path.read_text(), filename=str(path))
    found = [
        f"line {node.lineno}: {module}"
        for module, _, node in imports(tree)
        if from_library(module, IO_LIBRARIES)
    ]
    assert found == [], f"{service}'s domain.py must be pure rules; it imports {found}"


def test_the_gateway_has_no_schema() -> None:
    gateway = package("gateway")
    present = [
        name for name in ("repository.py", "tables.py", "migrations") if (gateway / name).exists()
    ]
    assert present == [], f"the gateway keeps no data of its own, yet has {present}"


class TestTheChecksThemselves:
    """The rules on small sources, so that a check that finds nothing is known to look."""

    def check(self, tmp_path: Path, source: str) -> list[str]:
        path = tmp_path / "module.py"
        path.write_text(source)
        return sql_imports(path)

    def test_an_annotation_only_session_passes(self, tmp_path: Path) -> None:
        source = (
            "from sqlalchemy.ext.asyncio import AsyncSession\n"
            "async def use(session: AsyncSession) -> AsyncSession:\n"
            "    kept: AsyncSession = session\n"
            "    return kept\n"
        )
        assert self.check(tmp_path, source) == []

    def test_a_session_built_or_a_statement_is_reported(self, tmp_path: Path) -> None:
        source = (
            "from sqlalchemy.ext.asyncio import AsyncSession as S\n"
            "from sqlalchemy import select\n"
            "import asyncpg\n"
            "def use(engine) -> None:\n"
            "    S(engine)\n"
            "    select(1)\n"
        )
        assert self.check(tmp_path, source) == [
            "line 1: sqlalchemy.ext.asyncio.AsyncSession (used outside annotations on line 5)",
            "line 2: sqlalchemy.select",
            "line 3: import asyncpg",
        ]

    def test_a_nested_import_is_seen(self, tmp_path: Path) -> None:
        source = "def late() -> None:\n    from sqlmodel import select\n"
        assert self.check(tmp_path, source) == ["line 2: sqlmodel.select"]
