"""Async database access: one engine per process, one transaction per unit of work."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

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
        """One unit of work: commits at the end, rolls back on error. Nothing else commits."""
        async with self.sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def single_statement(self) -> AsyncIterator[AsyncSession]:
        """For a unit of work that is ONE statement (a read, or a claim by UPDATE ... RETURNING):
        it commits by itself, as atomic as in a transaction, and saves the BEGIN and the COMMIT
        (or ROLLBACK) round trips. Two statements here would be two units of work: use
        `transaction()` for those."""
        async with self._single() as session:
            yield session

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


async def database(request: Request) -> Database:
    """FastAPI dependency: the Database of the app's runtime (a service with tables)."""
    db: Database | None = request.app.state.runtime.db
    assert db is not None
    return db
