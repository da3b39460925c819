"""Test fixtures every package's tests share (a pytest plugin, loaded by the root conftest).

Real servers only: Postgres and RabbitMQ at DATABASE_URL / RABBITMQ_URL (default: the local
ones), or throwaway containers with TESTCONTAINERS=1 where a Docker engine exists. Each test
session gets a database of its own; each test gets broker names of its own, so no test sees
another's leftovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest
import uvicorn
from aio_pika.abc import AbstractIncomingMessage
from fastapi import FastAPI

from booking.runtime.settings import DEFAULT_DATABASE_URL, DEFAULT_RABBITMQ_URL, RuntimeSettings

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T] | T],
    *,
    timeout: float = 15.0,
    interval: float = 0.02,
    what: str = "the condition",
) -> T:
    """Poll `probe` (sync or async) until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = probe()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
        except AssertionError as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s ({last_error})")
        await asyncio.sleep(interval)


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server_url(variable: str, default: str) -> Iterator[str]:
    """The server at `variable` (else `default`); with TESTCONTAINERS=1, a throwaway container's.

    The containers need Docker and the `testcontainers` package, imported only then. The fixture
    that calls this is session-scoped, so each container starts once per test session and is
    removed at its end.
    """
    if os.environ.get("TESTCONTAINERS") != "1":
        yield os.environ.get(variable, default)
    elif variable == "DATABASE_URL":
        from testcontainers.community.postgres import PostgresContainer

        with PostgresContainer("postgres:15", driver=None) as postgres:
            yield postgres.get_connection_url()  # postgresql://user:pass@host:port/db
    elif variable == "RABBITMQ_URL":
        with warnings.catch_warnings():  # its module uses a decorator testcontainers deprecates
            warnings.simplefilter("ignore", DeprecationWarning)
            from testcontainers.community.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13-management") as rabbitmq:
            host = rabbitmq.get_container_host_ip()
            port = rabbitmq.get_exposed_port(rabbitmq.port)
            yield f"amqp://{rabbitmq.username}:{rabbitmq.password}@{host}:{port}/"
    else:
        raise ValueError(f"no container for {variable}")


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    with server_url("RABBITMQ_URL", DEFAULT_RABBITMQ_URL) as url:
        yield url


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    """A fresh database for this test session, dropped at the end."""
    with server_url("DATABASE_URL", DEFAULT_DATABASE_URL) as server:
        name = f"booking_test_{uuid.uuid4().hex[:10]}"
        admin = await asyncpg.connect(server)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        yield with_database(server, name)
        admin = await asyncpg.connect(server)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
def make_settings(database_url: str, rabbitmq_url: str) -> Callable[..., RuntimeSettings]:
    """Settings with broker names unique to the test and fast retries; override anything."""

    def build(settings_type: type[RuntimeSettings] = RuntimeSettings, **overrides: Any):
        tag = uuid.uuid4().hex[:8]
        values: dict[str, Any] = {
            "database_url": database_url,
            "rabbitmq_url": rabbitmq_url,
            "events_exchange": f"test.{tag}.events",
            "admin_alerts_exchange": f"test.{tag}.alerts",
            "queue_prefix": f"test.{tag}.",
            "consumer_retry_base_delay_ms": 50,
            "consumer_max_attempts": 3,
            "outbox_poll_interval_seconds": 0.5,
            "broker_reconnect_interval_seconds": 0.3,
        }
        values.update(overrides)
        return settings_type.model_validate(values)

    return build


class TcpProxy:
    """A loopback TCP forwarder a test can cut and restore, to make a server 'unreachable'."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        with contextlib.suppress(Exception):
            dst.close()

    async def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        await self.start()

    async def stop(self) -> None:
        await self.cut()
        for task in list(self._pipes):
            task.cancel()


def url_via(url: str, proxy: TcpProxy) -> str:
    """`url` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{proxy.port}" if userinfo else f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@contextlib.asynccontextmanager
async def serving(app: FastAPI, port: int | None = None) -> AsyncIterator[str]:
    """Serve `app` (lifespan included) over real HTTP on a loopback port; yields its URL.

    `port` defaults to a free one; give it when the URL must be known before the app starts
    (an app that calls the other one back).
    """
    port = port or free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


# --- the test's view of an events exchange ----------------------------------------------------


@dataclass
class Spy:
    """Every message published on a test's events exchange, in the order the broker queued it."""

    channel: aio_pika.abc.AbstractChannel
    exchange_name: str
    messages: list[AbstractIncomingMessage] = field(default_factory=list)

    def of_type(self, type_: str) -> list[AbstractIncomingMessage]:
        return [m for m in self.messages if m.type == type_]

    def ids(self) -> list[str]:
        return [m.message_id for m in self.messages]

    async def settle(self) -> None:
        """Wait until everything published (and confirmed) before now has been received.

        A sentinel published now is queued after every message confirmed before it, so once it
        arrives nothing earlier is still on its way: "nothing (more) was published" can be
        asserted without sleeping.
        """
        sentinel = f"sentinel-{uuid.uuid4()}"
        exchange = await self.channel.get_exchange(self.exchange_name)
        await exchange.publish(aio_pika.Message(b"{}", message_id=sentinel), "test.sentinel")
        await eventually(
            lambda: any(m.message_id == sentinel for m in self.messages), what="the sentinel"
        )
        self.messages[:] = [m for m in self.messages if m.message_id != sentinel]


@pytest.fixture
async def spy_on(rabbitmq_url: str) -> AsyncIterator[Callable[..., Awaitable[Spy]]]:
    """`await spy_on(settings, binding="#", url=None)`: collect what reaches the exchange.

    The exchanges a test spied on are deleted at its end (durable ones would outlive it).
    """
    connections: list[aio_pika.abc.AbstractConnection] = []
    exchanges: set[str] = set()

    async def attach(settings: RuntimeSettings, binding: str = "#", url: str | None = None) -> Spy:
        connection = await aio_pika.connect(url or rabbitmq_url)
        connections.append(connection)
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            settings.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        exchanges.update((settings.events_exchange, settings.admin_alerts_exchange))
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, binding)
        spy = Spy(channel, settings.events_exchange)

        async def collect(message: AbstractIncomingMessage) -> None:
            spy.messages.append(message)

        await queue.consume(collect, no_ack=True)
        return spy

    yield attach
    for connection in connections:
        await connection.close()
    async with await aio_pika.connect(rabbitmq_url) as connection:
        channel = await connection.channel()
        for name in exchanges:
            await channel.exchange_delete(name)
