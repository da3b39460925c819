"""Async database access: one engine per process, one transaction per unit of work."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from fastapi import Request
from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from booking.runtime.settings import RuntimeSettings


def create_engine(settings: RuntimeSettings, *, pool_size: int = 20) -> AsyncEngine:
    return create_async_engine(
        settings.async_database_url,
        # Every connection it may open is kept: an overflow connection is closed as soon as it
        # is returned, so under load the pool opened and closed them all the time (a Postgres
        # backend, and every statement prepared again on it). The most it holds is unchanged.
        pool_size=pool_size,
        max_overflow=0,
        # No pre-ping: it costs a round trip per transaction; a dropped connection fails its
        # unit of work, which the caller retries (consumers redeliver, HTTP clients retry).
        pool_recycle=1800,
        # A dead database must fail a request quickly, not hang it.
        connect_args={"timeout": 5, "command_timeout": 30},
    )


class Database:
    """The engine and the session factory a service hands down to its handlers and routes."""

    def __init__(self, engine: AsyncEngine, schema: str) -> None:
        self.engine = engine
        self.schema = schema
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        # The same pool, its connections in autocommit while checked out (no round trip to
        # switch): a statement there commits on its own, with no BEGIN and COMMIT around it.
        self._single = async_sessionmaker(
            engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False
        )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One unit of work: commits at the end, rolls back on error. Nothing else commits.
        What `on_commit` gave it runs once it has committed."""
        async with self.sessions() as session:
            async with session.begin():
                try:
                    yield session
                except BaseException:
                    await _discard_if_lost(session)  # before the rollback hands it back
                    raise
            _committed(session)

    @asynccontextmanager
    async def single_statement(self) -> AsyncIterator[AsyncSession]:
        """For a unit of work that is ONE statement (a read, or a claim by UPDATE ... RETURNING):
        it commits by itself, as atomic as in a transaction, and saves the BEGIN and the COMMIT
        (or ROLLBACK) round trips. Two statements here would be two units of work: use
        `transaction()` for those."""
        async with self._single() as session:
            try:
                yield session
            except BaseException:
                await _discard_if_lost(session)
                raise
            _committed(session)

    async def answers(self, timeout: float = 2.0) -> bool:
        """Whether the database answers a query now (a dependency probe, never raises).

        Tried twice: after an outage the pool may hand out a connection the server dropped,
        which fails once and is then replaced.
        """
        for _ in range(2):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(timeout), self.engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
                return True
        return False


async def driver_connection(session: AsyncSession) -> asyncpg.Connection[Any]:
    """The asyncpg connection under `session`, inside the session's transaction.

    For the hot paths: a statement sent here skips SQLAlchemy's compiling, caching and result
    processing (about three quarters of the CPU of a simple statement through the ORM), and
    asyncpg prepares it once per connection and keeps it. It is the same connection and the same
    transaction as the session's, so it commits or rolls back with the unit of work.

    SQLAlchemy sends BEGIN lazily, with its first statement: a statement sent here first would
    run outside the transaction. So the transaction is begun here if it has not been (the
    BEGIN is the round trip the first statement would have cost anyway). A unit of work from
    `single_statement` stays in autocommit.
    """
    cached = session.info.get(_DRIVER)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    connection = await session.connection()
    adapted: Any = (await connection.get_raw_connection()).dbapi_connection
    driver: asyncpg.Connection[Any] = adapted.driver_connection
    # Kept before the BEGIN: a BEGIN on a lost connection must discard it too.
    session.info[_DRIVER] = driver
    if adapted._transaction is None:  # pylint: disable=protected-access
        # No public way to begin SQLAlchemy's asyncpg transaction without a statement; a test
        # (libs/runtime/tests/test_db.py) fails if this stops holding.
        try:
            await adapted._start_transaction()  # pylint: disable=protected-access
        except Exception as exc:
            # SQLAlchemy's adapter raises its own DBAPI error from the driver's; every other
            # statement here raises the driver's, which is what the callers (and the routes'
            # 503 for an unreachable database) know.
            if isinstance(exc.__cause__, Exception):
                raise exc.__cause__ from None
            raise
    return driver


_DRIVER = "booking.driver_connection"
_ON_COMMIT = "booking.on_commit"


def on_commit(session: AsyncSession, step: Callable[[], object]) -> None:
    """Run `step` once the unit of work `session` belongs to has committed; never if it rolls
    back. For what must count only what happened: a metric of an outcome (`Counter.inc` of its
    child). `step` is quick and synchronous, and what it raises is the caller's."""
    session.info.setdefault(_ON_COMMIT, []).append(step)


def _committed(session: AsyncSession) -> None:
    for step in session.info.pop(_ON_COMMIT, ()):
        step()


async def _discard_if_lost(session: AsyncSession) -> None:
    """A unit of work failed: if its connection to the server was lost on the driver, throw it
    away (the pool opens a new one in its place). SQLAlchemy does so for its own statements; a
    statement on the driver skips that, and the dead connection would go back to the pool and
    fail every unit of work handed it."""
    driver = session.info.get(_DRIVER)
    if driver is not None and driver.is_closed():
        with contextlib.suppress(Exception):
            await session.invalidate()


async def database(request: Request) -> Database:
    """FastAPI dependency: the Database of the app's runtime (a service with tables)."""
    db: Database | None = request.app.state.runtime.db
    assert db is not None
    return db
