"""Database: the pool, and single statements without a transaction around them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from booking.devtools.fixtures import TcpProxy, private_database, url_via
from booking.runtime.db import Database, create_engine, driver_connection
from booking.runtime.settings import RuntimeSettings


async def log_queries(session: AsyncSession) -> list[str]:
    """The commands asyncpg sends on the session's connection from now on (BEGIN, COMMIT...)."""
    conn = await session.connection()
    raw = (await conn.get_raw_connection()).driver_connection
    assert raw is not None  # an open connection has its driver's
    sent: list[str] = []
    raw.add_query_logger(lambda record: sent.append(record.query))
    return sent


@pytest.fixture
async def db(make_settings: Callable[..., RuntimeSettings]) -> AsyncIterator[Database]:
    # One connection: what single_statement sets on it must not follow it into transaction().
    engine = create_engine(make_settings(), pool_size=1)
    try:
        yield Database(engine, "public")
    finally:
        await engine.dispose()


async def test_single_statement_sends_no_begin(db: Database) -> None:
    async with db.single_statement() as session:
        sent = await log_queries(session)
        assert await session.scalar(text("SELECT 1")) == 1
    assert sent == [], "no BEGIN, COMMIT or ROLLBACK around a single statement"
    # The same connection (a pool of one) still begins and commits a transaction.
    async with db.transaction() as session:
        assert await session.scalar(text("SELECT 1")) == 1
    assert [q.split()[0] for q in sent] == ["BEGIN", "COMMIT;"]


async def test_a_transaction_after_a_single_statement_still_begins_and_rolls_back(
    db: Database,
) -> None:
    table = f"rt_db_{id(db)}"
    async with db.transaction() as session:
        await session.execute(text(f"CREATE TABLE {table} (n int)"))
    try:
        async with db.single_statement() as session:
            await session.execute(text(f"INSERT INTO {table} VALUES (1)"))
        with pytest.raises(RuntimeError):
            async with db.transaction() as session:
                await session.execute(text(f"INSERT INTO {table} VALUES (2)"))
                raise RuntimeError("undo")
        async with db.single_statement() as session:
            # The single statement committed by itself; the failed transaction left nothing.
            assert (await session.scalars(text(f"SELECT n FROM {table}"))).all() == [1]
    finally:
        async with db.transaction() as session:
            await session.execute(text(f"DROP TABLE {table}"))


async def test_the_pool_keeps_every_connection_it_opens(
    make_settings: Callable[..., RuntimeSettings],
) -> None:
    engine = create_engine(make_settings(), pool_size=3)
    try:
        conns = [await engine.connect() for _ in range(3)]
        pids = {await c.scalar(text("SELECT pg_backend_pid()")) for c in conns}
        for c in conns:
            await c.close()
        # Returned connections stay open: the same backends answer again (no new connections).
        again = [await engine.connect() for _ in range(3)]
        assert {await c.scalar(text("SELECT pg_backend_pid()")) for c in again} == pids
        for c in again:
            await c.close()
    finally:
        await engine.dispose()


async def test_the_driver_connection_is_inside_the_unit_of_work(db: Database) -> None:
    """A statement on the driver, first in a unit of work, runs in its transaction: it rolls
    back with it, and what it wrote is what the session reads (one connection, one snapshot)."""
    table = f"rt_driver_{id(db)}"
    async with db.transaction() as session:
        await session.execute(text(f"CREATE TABLE {table} (n int)"))
    try:
        with pytest.raises(RuntimeError):
            async with db.transaction() as session:
                driver = await driver_connection(session)
                await driver.execute(f"INSERT INTO {table} VALUES (1)")
                assert await session.scalar(text(f"SELECT count(*) FROM {table}")) == 1
                raise RuntimeError("undo")
        async with db.transaction() as session:
            driver = await driver_connection(session)
            assert driver is await driver_connection(session)
            await driver.execute(f"INSERT INTO {table} VALUES (2)")
        async with db.single_statement() as session:
            assert await session.scalar(text(f"SELECT array_agg(n) FROM {table}")) == [2]
    finally:
        async with db.transaction() as session:
            await session.execute(text(f"DROP TABLE {table}"))


@pytest.mark.servers  # a private database of its own
async def test_a_connection_lost_under_the_driver_is_not_handed_out_again() -> None:
    """Connections the server dropped while idle in the pool: a unit of work whose first
    statement runs on the driver fails once on each (as through SQLAlchemy), and the pool
    replaces them, so every later unit of work succeeds."""
    async with private_database("rt_driver_lost") as url:
        proxy = TcpProxy("127.0.0.1", urlsplit(url).port or 5432)
        await proxy.start()
        engine = create_engine(RuntimeSettings(database_url=url_via(url, proxy)), pool_size=4)
        db = Database(engine, "public")

        async def unit_of_work() -> None:
            async with db.transaction() as session:
                assert await (await driver_connection(session)).fetchval("SELECT 1") == 1

        async def held_a_while() -> None:
            async with db.transaction() as session:
                await (await driver_connection(session)).fetchval("SELECT pg_sleep(0.05)")

        try:
            await asyncio.gather(*(held_a_while() for _ in range(4)))  # four in the pool
            await proxy.cut()
            await proxy.restore()
            failures: list[Exception] = []
            for _ in range(12):
                try:
                    await unit_of_work()
                except Exception as exc:  # the lost connections' own failures
                    failures.append(exc)
            assert len(failures) <= 4, "a lost connection went back to the pool"
            # The driver's own errors (as every driver statement raises), which the routes
            # answer 503 with Retry-After; not SQLAlchemy's adapter's, answered 500.
            driver_errors = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)
            assert all(isinstance(exc, driver_errors) for exc in failures), failures
            await unit_of_work()
        finally:
            await engine.dispose()
            await proxy.stop()
