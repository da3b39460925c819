"""Test fixtures every package's tests share (a pytest plugin, loaded by the root conftest).

Real servers only: Postgres and RabbitMQ at DATABASE_URL / RABBITMQ_URL (default: the local
ones), or throwaway containers with TESTCONTAINERS=1 where a Docker engine exists. Each test
session gets a database of its own; each test gets broker names of its own, so no test sees
another's leftovers, and deletes them at its end: durable quorum queues left in the shared vhost
pile up, and a node with hundreds of them stalls recovering them on restart.

Also here, for whole-system runs (tests/e2e, bench): a private database and vhost, free ports,
and `rabbitmqctl`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import shutil
import signal
import socket
import sys
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar, overload
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aio_pika
import asyncpg
import httpx
import pytest
import uvicorn
from aio_pika.abc import AbstractIncomingMessage
from fastapi import FastAPI
from faststream.rabbit import RabbitBroker
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

from booking.contracts import Event, wrap
from booking.devtools.devrun import MIGRATED
from booking.runtime.broker import ConsumerQueues, OutgoingMessage
from booking.runtime.host import ServiceRuntime
from booking.runtime.settings import (
    DEFAULT_DATABASE_URL,
    DEFAULT_RABBITMQ_URL,
    RuntimeSettings,
    async_database_url,
)

T = TypeVar("T")


@overload
async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    *,
    timeout: float = ...,
    interval: float = ...,
    what: str = ...,
) -> T: ...


@overload
async def eventually(
    probe: Callable[[], T | None],
    *,
    timeout: float = ...,
    interval: float = ...,
    what: str = ...,
) -> T: ...


async def eventually(
    probe: Callable[[], Any],
    *,
    timeout: float = 15.0,
    interval: float = 0.02,
    what: str = "the condition",
) -> Any:
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
        port: int = sock.getsockname()[1]
        return port


def pick_free_ports(count: int) -> list[int]:
    """`count` distinct ports nothing listens on right now."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


# --- a database and a vhost of one's own, for whole-system runs ----------------------------------


async def rabbitmqctl(*args: str, timeout: float = 60.0) -> str | None:
    """`rabbitmqctl -q args`: its output, or None when it fails or outlasts `timeout`.

    The script runs an Erlang VM of its own: on a timeout (or a cancel) its whole process group
    is killed, else that VM lives on, one more client of a node that is already not answering.
    """
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "-q",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(timeout):
            output, _ = await process.communicate()
    except TimeoutError:
        return None
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    return output.decode(errors="replace") if process.returncode == 0 else None


@contextlib.asynccontextmanager
async def private_database(name_prefix: str) -> AsyncIterator[str]:
    """The URL of a new, empty database on the server of DATABASE_URL; dropped afterwards."""
    server = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    name = f"{name_prefix}_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield with_database(server, name)
    finally:
        conn = await asyncpg.connect(server, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@contextlib.asynccontextmanager
async def private_vhost(name_prefix: str) -> AsyncIterator[dict[str, str]]:
    """Settings (environment variables) for a RabbitMQ vhost of one's own, deleted afterwards.

    Without `rabbitmqctl` the default vhost is shared, so queue and exchange names get a unique
    prefix instead (those are then left behind in that vhost).
    """
    base_url = os.environ.get("RABBITMQ_URL") or DEFAULT_RABBITMQ_URL
    run_id = f"{name_prefix}_{uuid.uuid4().hex[:12]}"
    user = urlsplit(base_url).username or "guest"
    if shutil.which("rabbitmqctl") and await rabbitmqctl("add_vhost", run_id) is not None:
        try:
            if await rabbitmqctl("set_permissions", "-p", run_id, user, ".*", ".*", ".*") is None:
                raise RuntimeError(f"rabbitmqctl could not give {user} the vhost {run_id}")
            vhost_url = urlunsplit(urlsplit(base_url)._replace(path="/" + quote(run_id, safe="")))
            yield {"RABBITMQ_URL": vhost_url}
        finally:
            await rabbitmqctl("delete_vhost", run_id)
        return
    yield {
        "RABBITMQ_URL": base_url,
        "QUEUE_PREFIX": f"{run_id}.",
        "EVENTS_EXCHANGE": f"{run_id}.booking.events",
        "ADMIN_ALERTS_EXCHANGE": f"{run_id}.admin.alerts",
        "ORDER_CHANGES_EXCHANGE": f"{run_id}.order.changes",
    }


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


# --- a service's migrated schema and its health report -----------------------------------------


async def schema_differences(
    database_url: str, schema: str, metadata: MetaData | None = None
) -> list[Any]:
    """What alembic's autogenerate would change to make `schema` in the database match the
    tables of `metadata` (default: SQLModel's) in that schema: [] when the migrations and the
    tables agree. Only `schema` is compared: one metadata holds every service's tables when
    the whole suite runs, and the database holds every service's schema."""
    # Imported here: most test sessions never compare a schema, and the plugin loads in all.
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    def ours(name: str | None, type_: str, parents: dict[str, Any]) -> bool:
        if type_ == "schema":
            return name == schema
        if type_ == "table":
            return parents.get("schema_name") == schema and name != "alembic_version"
        return True

    def in_schema(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        table = obj if type_ == "table" else getattr(obj, "table", None)
        return table is None or table.schema == schema

    def differences(connection: Any) -> list[Any]:
        context = MigrationContext.configure(
            connection,
            opts={"include_schemas": True, "include_name": ours, "include_object": in_schema},
        )
        found: list[Any] = compare_metadata(
            context, metadata if metadata is not None else SQLModel.metadata
        )
        return found

    engine = create_async_engine(async_database_url(database_url))
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(differences)
    finally:
        await engine.dispose()


@pytest.fixture
async def db(migrated: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection for a test to look at (and stage) rows with, on the database of the
    package's own session-scoped `migrated` fixture (its URL, once its migrations ran)."""
    conn = await asyncpg.connect(migrated)
    try:
        yield conn
    finally:
        await conn.close()


def health_checks(report: dict[str, Any], prefix: str) -> dict[str, dict[str, Any]]:
    """The checks of a health report (RFC draft "health+json") named `prefix`..., each by its
    first (only) entry: `health_checks(report, "google:")["google:reachable"]["status"]`."""
    return {k: v[0] for k, v in report["checks"].items() if k.startswith(prefix)}


# --- broker objects a test leaves behind ----------------------------------------------------

TEST_PREFIX = "test."


def consumer_queue_names(settings: RuntimeSettings, consumer: str) -> list[str]:
    """Every queue the runtime declares for `consumer` (a ServiceRuntime name) under `settings`."""
    queues = ConsumerQueues.named(
        f"{settings.queue_prefix}{consumer}",
        settings.consumer_max_attempts,
        settings.consumer_retry_base_delay_ms,
    )
    retries = [queues.retry(attempt) for attempt in range(1, queues.max_attempts)]
    return [queues.main, *retries, queues.dead_letter]


async def delete_broker_objects(
    url: str, settings: RuntimeSettings, consumers: Iterable[str] = MIGRATED
) -> None:
    """Delete the exchanges `settings` names and the queues of `consumers` (retry, dead-letter).

    Durable quorum queues outlive the test that declared them. Names come from the settings and
    the topology, not from a listing (no management plugin is assumed); `consumers` defaults to
    every service that has one. Deleting what does not exist is no error. Only names under a
    non-empty `queue_prefix` are touched, so a real system's queues never are.
    """
    prefix = settings.queue_prefix
    if not prefix:
        raise ValueError("no queue_prefix: these would be the real system's queues")
    queues = [name for consumer in consumers for name in consumer_queue_names(settings, consumer)]
    exchanges = [
        settings.events_exchange,
        settings.admin_alerts_exchange,
        settings.order_changes_exchange,
    ]
    async with asyncio.timeout(30):
        async with await aio_pika.connect(url, timeout=10) as connection:
            channel = await connection.channel()
            for name in queues:
                await channel.queue_delete(name)
            for name in exchanges:
                if name.startswith(prefix):
                    await channel.exchange_delete(name)


async def leftover_queues(url: str, prefixes: Iterable[str]) -> list[str] | None:
    """Queues whose names start with one of `prefixes`, by `rabbitmqctl list_queues`.

    None when that cannot be told: no rabbitmqctl, or a broker it does not reach (a container,
    another host).
    """
    parts = urlsplit(url)
    local = parts.hostname in ("127.0.0.1", "localhost", "::1")
    if not local or os.environ.get("TESTCONTAINERS") == "1" or not shutil.which("rabbitmqctl"):
        return None
    vhost = unquote(parts.path[1:]) or "/"
    args = ("list_queues", "-p", vhost, "--no-table-headers", "name")
    listing = await rabbitmqctl(*args, timeout=30)
    if listing is None:
        return None
    prefixes = tuple(prefixes)
    return [name for name in listing.split() if name.startswith(prefixes)]


@pytest.fixture(scope="session")
async def broker_prefixes(rabbitmq_url: str) -> AsyncIterator[set[str]]:
    """Every queue prefix make_settings hands out this session; at its end, none names a queue."""
    prefixes: set[str] = set()
    yield prefixes
    if prefixes:
        left = await leftover_queues(rabbitmq_url, prefixes)
        assert not left, f"tests left these queues in RabbitMQ: {sorted(left)}"


@pytest.fixture
async def make_settings(
    database_url: str, rabbitmq_url: str, broker_prefixes: set[str]
) -> AsyncIterator[Callable[..., RuntimeSettings]]:
    """Settings with broker names unique to the test and fast retries; override anything.

    At the test's end the exchanges and every service's queues under those names are deleted
    (a test that runs a consumer of another name deletes its queues itself).
    """
    made: list[RuntimeSettings] = []

    def build(
        settings_type: type[RuntimeSettings] = RuntimeSettings, **overrides: Any
    ) -> RuntimeSettings:
        tag = uuid.uuid4().hex[:8]
        values: dict[str, Any] = {
            "database_url": database_url,
            "rabbitmq_url": rabbitmq_url,
            "events_exchange": f"{TEST_PREFIX}{tag}.events",
            "admin_alerts_exchange": f"{TEST_PREFIX}{tag}.alerts",
            "order_changes_exchange": f"{TEST_PREFIX}{tag}.order-changes",
            "queue_prefix": f"{TEST_PREFIX}{tag}.",
            "consumer_retry_base_delay_ms": 50,
            "consumer_max_attempts": 3,
            "outbox_poll_interval_seconds": 0.5,
            "broker_reconnect_interval_seconds": 0.3,
        }
        values.update(overrides)
        settings = settings_type.model_validate(values)
        if settings.queue_prefix.startswith(TEST_PREFIX):
            made.append(settings)
            broker_prefixes.add(settings.queue_prefix)
        return settings

    yield build
    # Last: the fixtures that run services with these settings depend on this one, so every
    # consumer has stopped (and cannot declare its queues again) by now.
    for settings in made:
        await delete_broker_objects(rabbitmq_url, settings)


class TcpProxy:
    """A loopback TCP forwarder a test can cut and restore, to make a server 'unreachable'."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
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


async def scrape_metrics(http: httpx.AsyncClient) -> dict[tuple[str, frozenset[Any]], float]:
    """A service's /metrics, each sample's value by (name, its labels)."""
    answer = await http.get("/metrics")
    assert answer.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


@contextlib.asynccontextmanager
async def serving_process(
    service: str, env: dict[str, str], port: int, *, health: str = "/health/ready"
) -> AsyncIterator[httpx.AsyncClient]:
    """`python -m booking.<service> serve` as a process of its own, with `env` and listening on
    `port`: a client on it once it answers 200 on `health`. It is stopped at the end."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        f"booking.{service}",
        "serve",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=10, trust_env=False
        ) as http:

            async def answering() -> bool:
                assert process.returncode is None, f"{service} exited"
                try:
                    return (await http.get(health)).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(answering, timeout=60, interval=0.1, what=f"{service} serving")
            yield http
    finally:
        if process.returncode is None:
            process.terminate()
        async with asyncio.timeout(30):
            await process.wait()


@contextlib.asynccontextmanager
async def serving(app: FastAPI, port: int | None = None) -> AsyncIterator[str]:
    """Serve `app` (lifespan included) over real HTTP on a loopback port; yields its URL.

    `port` defaults to a free one; give it when the URL must be known before the app starts
    (an app that calls the other one back).
    """
    port = port or free_port()
    server = uvicorn.Server(
        # proxy_headers off, as `serve` runs: the peer is never rewritten from X-Forwarded-For.
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_config=None, lifespan="on", proxy_headers=False
        )
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
        async with asyncio.timeout(15):
            await task


@contextlib.asynccontextmanager
async def serving_with_client(
    app: FastAPI, port: int | None = None
) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """`serving(app, port)`, and a client for it: yields (its URL, the client)."""
    async with (
        serving(app, port) as url,
        # trust_env=False: a proxy in the environment must not stand between a test and loopback.
        httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http,
    ):
        yield url, http


async def publish_event(
    app: FastAPI, exchange: str, event: Event, *, message_id: uuid.UUID | None = None
) -> None:
    """Publish `event` on `exchange` through the app's broker, as its producer would."""
    envelope = wrap(event, message_id=message_id or uuid.uuid4(), correlation_id=str(uuid.uuid4()))
    await app.state.runtime.broker.publish(
        OutgoingMessage(
            body=envelope.model_dump_json().encode(),
            exchange=exchange,
            routing_key=envelope.routing_key,
            message_id=str(envelope.message_id),
            correlation_id=envelope.correlation_id,
            type=envelope.type,
        )
    )


@contextlib.asynccontextmanager
async def on_test_broker(runtime: ServiceRuntime) -> AsyncIterator[RabbitBroker]:
    """The runtime's subscribers on FastStream's `TestRabbitBroker`: in process, no RabbitMQ.

    For handler tests where a real broker is not the point: `deliver` hands an event to the
    service's consumer, whose handler runs with the inbox in one transaction on the test's
    database, as it would from the queue. The delivery guarantees (acks after commit, delay
    queues, dead letters, the pause) are tested against the real RabbitMQ. The runtime is not
    started: no relay, no connection.
    """
    from faststream.rabbit import TestRabbitBroker

    consumer, keeper = runtime.consumer, runtime.dead_letter_keeper
    if consumer is None or keeper is None:
        raise RuntimeError(f"{runtime.name} consumes nothing: there is no handler to test")
    consumer.start()
    keeper.start()
    try:
        async with TestRabbitBroker(runtime.broker.faststream) as broker:
            yield broker
    finally:
        await consumer.stop()
        await keeper.stop()


async def deliver(
    runtime: ServiceRuntime,
    event: Event,
    *,
    message_id: uuid.UUID | None = None,
    correlation_id: str | None = None,
    occurred_at: datetime | None = None,
    producer: str | None = None,
    traceparent: str | None = None,
) -> uuid.UUID:
    """Deliver `event` to the runtime's consumer (under `on_test_broker`) as its queue would:
    in its envelope (dated `occurred_at`, from `producer` for an event any service may send,
    in the trace `traceparent` names), with its message id; returns that id. The handler runs
    in the consumer's workers: wait for its effect with `eventually`."""
    assert runtime.consumer is not None
    envelope = wrap(
        event,
        message_id=message_id or uuid.uuid4(),
        correlation_id=correlation_id or str(uuid.uuid4()),
        occurred_at=occurred_at,
        producer=producer,
        traceparent=traceparent,
    )
    await runtime.broker.faststream.publish(
        aio_pika.Message(
            envelope.model_dump_json().encode(),
            message_id=str(envelope.message_id),
            correlation_id=envelope.correlation_id,
            type=envelope.type,
            content_type="application/json",
        ),
        routing_key=runtime.consumer.queues.main,
    )
    return envelope.message_id


@dataclass
class SandboxClient:
    """A test's handle on a sandbox server (the fake Konnect or Google): its URL, and its
    `/_sandbox` control API. Each sandbox's own controls are methods of a subclass."""

    url: str
    http: httpx.AsyncClient

    async def _control(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.http.request(method, f"/_sandbox{path}", **kwargs)
        assert response.is_success, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    async def clear_faults(self) -> None:
        await self._control("DELETE", "/faults")


# --- the test's view of an events exchange ----------------------------------------------------


@dataclass
class Spy:
    """Every message published on a test's events exchange, in the order the broker queued it."""

    channel: aio_pika.abc.AbstractChannel
    exchange_name: str
    messages: list[AbstractIncomingMessage] = field(default_factory=list)

    def of_type(self, type_: str) -> list[AbstractIncomingMessage]:
        return [m for m in self.messages if m.type == type_]

    def ids(self) -> list[str | None]:
        return [m.message_id for m in self.messages]

    def payloads(self, type_: str, **about: Any) -> list[dict[str, Any]]:
        """Payloads of the `type_` messages whose fields equal `about` (as JSON renders them:
        a UUID as its string); a None in `about` matches anything."""
        wanted = {k: str(v) for k, v in about.items() if v is not None}
        payloads = [json.loads(m.body)["payload"] for m in self.of_type(type_)]
        return [p for p in payloads if all(p.get(k) == v for k, v in wanted.items())]

    async def one(self, type_: str, **about: Any) -> dict[str, Any]:
        """Wait for a `type_` message about `about`, then make sure it came once."""
        await eventually(lambda: self.payloads(type_, **about), what=f"{type_} for {about}")
        await self.settle()
        found = self.payloads(type_, **about)
        assert len(found) == 1, found
        return found[0]

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
    spied: list[RuntimeSettings] = []

    async def attach(settings: RuntimeSettings, binding: str = "#", url: str | None = None) -> Spy:
        connection = await aio_pika.connect(url or rabbitmq_url)
        connections.append(connection)
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            settings.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        spied.append(settings)
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
    for settings in spied:
        await delete_broker_objects(rabbitmq_url, settings, consumers=())


@dataclass
class Served:
    """A service's app served over HTTP, a client for it, and the spy on its events exchange."""

    app: FastAPI
    url: str
    http: httpx.AsyncClient
    spy: Spy


@pytest.fixture
async def serve_service(
    make_settings: Callable[..., RuntimeSettings], spy_on: Callable[..., Awaitable[Spy]]
) -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    """`await serve_service(create_app, settings, port=None)`: the app `create_app(settings)`
    builds, served until the test's end, returned once its broker is connected. Its spy is
    attached before it starts, so it misses nothing the service publishes.
    """
    # Requests make_settings so that its teardown (deleting the queues) runs after this one's.
    del make_settings
    async with contextlib.AsyncExitStack() as stack:

        async def serve(
            create_app: Callable[[Any], FastAPI], settings: RuntimeSettings, port: int | None = None
        ) -> Served:
            spy = await spy_on(settings)
            app = create_app(settings)
            url, http = await stack.enter_async_context(serving_with_client(app, port))
            await app.state.runtime.broker.wait_ready(15)
            return Served(app, url, http, spy)

        yield serve
