"""A throwaway service on the real servers: its own schema, exchange and queues per test."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, Text, func, select, text
from sqlalchemy.dialects.postgresql import insert

from booking.contracts import MentorRegistered
from booking.devtools.fixtures import TcpProxy, delete_broker_objects
from booking.runtime.consumer import MessageContext
from booking.runtime.host import ServiceRuntime
from booking.runtime.settings import RuntimeSettings
from booking.runtime.tables import MessagingTables


def mentor_registered(name: str = "Ada") -> MentorRegistered:
    return MentorRegistered(
        mentor_id=uuid.uuid4(), name=name, email="ada@example.com", timezone="Africa/Tunis"
    )


@pytest.fixture
def new_event() -> Callable[..., MentorRegistered]:
    """A fresh event for the test service to record or receive (mentor ids are unique)."""
    return mentor_registered


@pytest.fixture
async def postgres_proxy(database_url: str) -> AsyncIterator[TcpProxy]:
    """A proxy a test can cut to make Postgres unreachable. Ask for it before `make_service`:
    it then outlives the service's teardown, which still needs the database."""
    parts = urlsplit(database_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    yield proxy
    await proxy.stop()


@dataclass
class TestService:
    runtime: ServiceRuntime
    tables: MessagingTables
    effects: Table
    settings: RuntimeSettings

    @property
    def db(self):
        assert self.runtime.db is not None
        return self.runtime.db

    async def record(self, *events: Any) -> list[uuid.UUID]:
        assert self.runtime.outbox is not None
        async with self.db.transaction() as session:
            return [await self.runtime.outbox.record(session, e) for e in events]

    async def unsent(self) -> int:
        outbox = self.tables.outbox
        async with self.db.engine.connect() as conn:
            return await conn.scalar(
                select(func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None))
            )

    async def effect_count(self, key: str) -> int:
        async with self.db.engine.connect() as conn:
            value = await conn.scalar(select(self.effects.c.count).where(self.effects.c.key == key))
        return value or 0


async def count_effect(event: MentorRegistered, ctx: MessageContext, effects: Table) -> None:
    """The handler under test: one state change per handled message."""
    await ctx.session.execute(
        insert(effects)
        .values(key=str(event.mentor_id), count=1)
        .on_conflict_do_update(index_elements=[effects.c.key], set_={"count": effects.c.count + 1})
    )


@pytest.fixture
async def make_service(
    make_settings: Callable[..., RuntimeSettings], rabbitmq_url: str
) -> AsyncIterator[Callable[..., Any]]:
    """Build (not start) a service with its own schema; `handlers` default to count_effect."""
    made: list[TestService] = []

    async def build(
        handler=None, *, start: bool = True, event_type: type = MentorRegistered, **overrides: Any
    ) -> TestService:
        settings = make_settings(**overrides)
        schema = f"rt_{uuid.uuid4().hex[:10]}"
        metadata = MetaData()
        tables = MessagingTables(metadata, schema)
        effects = Table(
            "effects",
            metadata,
            Column("key", Text, primary_key=True),
            Column("count", Integer, nullable=False),
            schema=schema,
        )

        async def default_handler(event: MentorRegistered, ctx: MessageContext) -> None:
            await count_effect(event, ctx, effects)

        runtime = ServiceRuntime(
            name=f"svc-{schema}",
            settings=settings,
            tables=tables,
            handlers={event_type: handler or default_handler},
        )
        assert runtime.db is not None
        async with runtime.db.engine.begin() as conn:
            await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
            await conn.run_sync(metadata.create_all)
        service = TestService(runtime, tables, effects, settings)
        made.append(service)
        if start:
            await runtime.start()
            await runtime.broker.wait_ready(timeout=15)
        return service

    yield build
    for service in made:
        try:
            # Bounded, so that a runtime which does not stop fails here, by name, and what it
            # made is still deleted (left behind, it would fail the tests that come after).
            async with asyncio.timeout(30):
                await service.runtime.stop()
        finally:
            # Its consumer is named for its schema, not a service: make_settings would not find it.
            await delete_broker_objects(rabbitmq_url, service.settings, [service.runtime.name])
            engine = service.runtime.db.engine if service.runtime.db else None
            if engine is not None:
                async with engine.begin() as conn:
                    await conn.execute(text(f'DROP SCHEMA "{service.tables.schema}" CASCADE'))
                await engine.dispose()
