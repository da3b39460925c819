"""The host every service runs in: everything besides its own routes and handlers, wired once.

(A service's own `service.py` is its application layer; this is the process around it.) A
service's `app.py` builds a `ServiceRuntime` with its settings and schema, subscribes its
handlers once its use cases exist, and hands it to `create_service_app` with its routes. The
runtime owns the engine, the broker connection, the outbox and its relay, the consumer and the
health checks, and starts and stops them with the app's lifespan. Nothing here connects at
import time.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    MutableMapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.middleware import Middleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from booking.contracts import Event
from booking.runtime import context, metrics, tracing
from booking.runtime.auth import TokenVerifier
from booking.runtime.broker import Broker
from booking.runtime.health import Health, Observation, Status, timed_ms
from booking.runtime.outages import describe
from booking.runtime.problems import install_problem_handlers
from booking.runtime.settings import RuntimeSettings

if TYPE_CHECKING:
    from booking.runtime.consumer import Consumer, Handler
    from booking.runtime.db import Database
    from booking.runtime.dead_letters import DeadLetterKeeper, DeadLetters
    from booking.runtime.housekeeping import Housekeeping
    from booking.runtime.outbox import Outbox, OutboxRelay
    from booking.runtime.tables import MessagingTables

log = logging.getLogger(__name__)


class ServiceRuntime:
    def __init__(
        self,
        *,
        name: str,
        settings: RuntimeSettings,
        tables: MessagingTables | None = None,
        handlers: Mapping[type[Event], Handler] | None = None,
        relay: bool = True,
    ) -> None:
        self.name = name
        self.settings = settings
        # First: settings no deployment may run with (a known JWT secret) stop every service here.
        self.verifier = TokenVerifier(settings)
        self.broker = Broker(
            settings.rabbitmq_url.get_secret_value(),
            client_name=name,
            events_exchange=settings.events_exchange,
            alerts_exchange=settings.admin_alerts_exchange,
            reconnect_interval=settings.broker_reconnect_interval_seconds,
        )
        self.health = Health(service=name, timeout=settings.health_check_timeout_seconds)
        self.tables = tables
        self.db: Database | None = None
        self.outbox: Outbox | None = None
        self.relay: OutboxRelay | None = None
        self.consumer: Consumer | None = None
        self.dead_letter_keeper: DeadLetterKeeper | None = None
        self.dead_letters: DeadLetters | None = None
        self.housekeeping: Housekeeping | None = None
        self._scrape: list[Callable[[], Awaitable[None]]] = []
        if tables is not None:
            # Loaded only by a service with a database: the gateway never pays for SQLAlchemy.
            from booking.runtime.db import Database, create_engine
            from booking.runtime.dead_letters import DeadLetters
            from booking.runtime.housekeeping import Housekeeping
            from booking.runtime.outbox import Outbox, OutboxRelay

            self.db = Database(create_engine(settings), tables.schema)
            self.outbox = Outbox(tables, producer=name, exchange=settings.events_exchange)
            self.dead_letters = DeadLetters(name, self.db, tables, self.outbox)
            if relay:
                self.relay = OutboxRelay(
                    self.db.engine,
                    tables,
                    self.broker,
                    outbox=self.outbox,
                    listen_dsn=settings.database_url,
                    batch_size=settings.outbox_batch_size,
                    poll_interval=settings.outbox_poll_interval_seconds,
                    linger=settings.outbox_linger_ms / 1000,
                    concurrency=settings.outbox_relay_concurrency,
                    unroutable_retry_max=settings.outbox_unroutable_retry_max_seconds,
                    unroutable_alert_window=settings.outbox_unroutable_alert_window_seconds,
                )
            self.housekeeping = Housekeeping(
                self.db.engine,
                tables,
                outbox_retention=timedelta(hours=settings.outbox_retention_hours),
                inbox_retention=timedelta(hours=settings.inbox_retention_hours),
                interval=settings.housekeeping_interval_seconds,
            )
        self._add_standard_checks()
        if handlers:
            self.subscribe(handlers)

    def subscribe(self, handlers: Mapping[type[Event], Handler]) -> None:
        """Consume the events in `handlers` from this service's queue.

        Called by the composition root once the use cases the handlers call exist, so that no
        handler refers to something built after it."""
        from booking.runtime.consumer import Consumer
        from booking.runtime.dead_letters import DeadLetterKeeper

        if self.consumer is not None:
            raise RuntimeError(f"{self.name} already consumes its queue")
        if self.tables is None or self.db is None or self.outbox is None:
            raise RuntimeError(f"{self.name} has no database: it has no inbox to consume with")
        settings, tables = self.settings, self.tables
        self.consumer = Consumer(
            name=f"{settings.queue_prefix}{self.name}",
            db=self.db,
            tables=tables,
            outbox=self.outbox,
            broker=self.broker,
            handlers=handlers,
            max_attempts=settings.consumer_max_attempts,
            retry_base_delay_ms=settings.consumer_retry_base_delay_ms,
            prefetch=settings.consumer_prefetch,
            concurrency=settings.consumer_concurrency,
            max_batch=settings.consumer_max_batch,
        )
        self.dead_letter_keeper = DeadLetterKeeper(
            consumer=self.consumer,
            db=self.db,
            tables=tables,
            outbox=self.outbox,
            broker=self.broker,
        )
        self.health.add(
            "rabbitmq", "consumers", self._check_consumers, ready=True, component_type="system"
        )
        self.health.add(
            "rabbitmq", "queues", self._check_queue_depths, ready=False, component_type="system"
        )
        self.on_scrape(self._observe_queues)

    async def start(self) -> None:
        if self.consumer is not None and self.dead_letter_keeper is not None:
            self.consumer.start()
            self.dead_letter_keeper.start()
        self.broker.start()
        if self.relay is not None:
            self.relay.start()
        if self.housekeeping is not None:
            self.housekeeping.start()

    async def stop(self) -> None:
        if self.housekeeping is not None:
            await self.housekeeping.stop()
        if self.relay is not None:
            await self.relay.stop()
        if self.consumer is not None:
            await self.consumer.stop()
        if self.dead_letter_keeper is not None:
            await self.dead_letter_keeper.stop()
        await self.broker.stop()
        await self.verifier.aclose()
        if self.db is not None:
            await self.db.engine.dispose()

    async def declare_topology(self) -> None:
        """Declare the exchanges and this service's queues and bindings (the step before
        traffic, run with the migrations), without starting anything."""
        consumers = []
        if self.consumer is not None:
            consumers.append(self.consumer.topology())
        await self.broker.declare_topology(consumers)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    # --- gauges read on scrape -------------------------------------------------------------

    def on_scrape(self, refresh: Callable[[], Awaitable[None]]) -> None:
        """Await `refresh` (which sets gauges of booking.runtime.metrics) before each /metrics
        answer: a backlog is read when Prometheus asks, never on a message's path."""
        self._scrape.append(refresh)

    async def refresh_gauges(self) -> None:
        """Every refresher at once, each within HEALTH_CHECK_TIMEOUT_SECONDS. One that fails
        (the database or the broker away) leaves its gauges as they were: the scrape still
        answers, and `up` and the health checks tell of the outage."""
        if self._scrape:
            await asyncio.gather(*(self._refresh(refresh) for refresh in self._scrape))

    async def _refresh(self, refresh: Callable[[], Awaitable[None]]) -> None:
        try:
            async with asyncio.timeout(self.settings.health_check_timeout_seconds):
                await refresh()
        except Exception as exc:
            log.debug("a gauge was not refreshed for /metrics: %s", describe(exc))

    async def _observe_queues(self) -> None:
        assert self.consumer is not None
        if not self.broker.is_connected:
            return
        queues = self.consumer.queues
        (ready, consumers), (dead, _) = await asyncio.gather(
            self.broker.queue_stats(queues.main), self.broker.queue_stats(queues.dead_letter)
        )
        metrics.QUEUE_MESSAGES.labels(queues.main).set(ready)
        metrics.QUEUE_CONSUMERS.labels(queues.main).set(consumers)
        metrics.DEAD_LETTER_QUEUE_MESSAGES.labels(queues.dead_letter).set(dead)

    async def _observe_outbox(self) -> None:
        assert self.relay is not None and self.tables is not None
        age = await self.relay.oldest_unsent_age()
        metrics.OUTBOX_LAG.labels(self.tables.schema).set(age)

    async def _observe_dead_letters(self) -> None:
        assert self.tables is not None
        kept = await self._count_kept_dead_letters()
        metrics.DEAD_LETTERS_WAITING.labels(self.tables.schema).set(kept)

    # --- health -----------------------------------------------------------------------------

    def _add_standard_checks(self) -> None:
        if self.db is not None:
            self.health.add(
                "database",
                "responseTime",
                self._check_database,
                ready=True,
                component_type="datastore",
            )
        self.health.add(
            "rabbitmq", "connection", self._check_broker, ready=True, component_type="system"
        )
        if self.relay is not None:
            self.health.add(
                "outbox", "lag", self._check_outbox_lag, ready=False, component_type="component"
            )
            self.on_scrape(self._observe_outbox)
        if self.dead_letters is not None:
            self.health.add(
                "deadLetters",
                "kept",
                self._check_dead_letters,
                ready=False,
                component_type="component",
            )
            self.on_scrape(self._observe_dead_letters)

    async def _check_database(self) -> Observation:
        from sqlalchemy import text

        assert self.db is not None
        start = time.perf_counter()
        async with self.db.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return Observation("database", "responseTime", "pass", "datastore", timed_ms(start), "ms")

    async def _check_broker(self) -> Observation:
        if self.broker.is_connected:
            return Observation("rabbitmq", "connection", "pass", "system")
        return Observation(
            "rabbitmq", "connection", "fail", "system", output="not connected to RabbitMQ"
        )

    async def _check_consumers(self) -> Observation:
        assert self.consumer is not None
        if not self.broker.is_connected:
            return Observation(
                "rabbitmq", "consumers", "fail", "system", 0, output="not connected to RabbitMQ"
            )
        _, consumers = await self.broker.queue_stats(self.consumer.queues.main)
        status: Status = "pass" if consumers > 0 else "fail"
        output = None if consumers else f"no consumer attached to {self.consumer.queues.main}"
        return Observation("rabbitmq", "consumers", status, "system", consumers, output=output)

    async def _check_queue_depths(self) -> list[Observation]:
        assert self.consumer is not None
        ready, _ = await self.broker.queue_stats(self.consumer.queues.main)
        dead, _ = await self.broker.queue_stats(self.consumer.queues.dead_letter)
        return [
            Observation(
                "rabbitmq",
                "queues",
                "pass",
                "system",
                ready,
                "messages",
                output=f"{self.consumer.queues.main} ready messages",
            ),
            Observation(
                "rabbitmq",
                "queues",
                "warn" if dead else "pass",
                "system",
                dead,
                "messages",
                output=f"{self.consumer.queues.dead_letter} dead letters",
            ),
        ]

    async def _count_kept_dead_letters(self) -> int:
        from sqlalchemy import func, select

        assert self.db is not None and self.tables is not None
        dead = self.tables.dead_letters
        async with self.db.engine.connect() as conn:
            kept = await conn.scalar(
                select(func.count()).select_from(dead).where(dead.c.status == "kept")
            )
        return int(kept or 0)

    async def _check_dead_letters(self) -> Observation:
        kept = await self._count_kept_dead_letters()
        return Observation(
            "deadLetters",
            "kept",
            "warn" if kept else "pass",
            "component",
            kept,
            "messages",
            output="dead letters waiting for an admin to replay or discard",
        )

    async def _check_outbox_lag(self) -> Observation:
        assert self.relay is not None
        age = await self.relay.oldest_unsent_age()
        status: Status = "warn" if age > self.settings.outbox_lag_warn_seconds else "pass"
        return Observation(
            "outbox",
            "lag",
            status,
            "component",
            round(age, 3),
            "s",
            output="age of the oldest unsent event",
        )


ACCESS_LOGGER = "booking.access"
access_log = logging.getLogger(ACCESS_LOGGER)

# Probes and scrapes come every few seconds from the platform: logged only when they fail.
_QUIET_ROUTES = frozenset(
    {"/health", "/health/live", "/health/ready", "/internal/health", "/metrics"}
)

_requests = metrics.Children(metrics.HTTP_REQUESTS)
_latency = metrics.Children(metrics.HTTP_LATENCY)


def configure_access_log(enabled: bool) -> None:
    """ACCESS_LOG: one line per request at INFO on `booking.access`, whatever LOG_LEVEL says
    (off: the logger is silenced, and the middleware skips building the line)."""
    access_log.setLevel(logging.INFO if enabled else logging.CRITICAL + 1)


class RequestContextMiddleware:
    """Correlation id in (X-Correlation-ID) and out, request metrics and the access log line.
    Plain ASGI: cheap."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-correlation-id", b"").decode("latin-1")
        correlation = incoming if _valid_correlation_id(incoming) else str(uuid.uuid4())
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_with_header(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-correlation-id", correlation.encode()),
                ]
            await send(message)

        with context.correlated(correlation):
            try:
                await self.app(scope, receive, send_with_header)
            finally:
                elapsed = time.perf_counter() - started
                route = scope.get("route")
                path = getattr(route, "path", "unmatched")
                method, status = scope["method"], status_holder["status"]
                _requests(method, path, str(status)).inc()
                _latency(path).observe(elapsed)
                if access_log.isEnabledFor(logging.INFO) and (
                    status >= 400 or path not in _QUIET_ROUTES
                ):
                    _log_access(method, path, status, elapsed)


def _log_access(method: str, route: str, status: int, elapsed: float) -> None:
    """The request's line: its route template (never the path: it may hold ids and tokens);
    the correlation id (and a trace id, when tracing sets one) come with every log record."""
    access_log.info(
        "%s %s %d",
        method,
        route,
        status,
        extra={
            "method": method,
            "route": route,
            "status": status,
            "duration_ms": round(elapsed * 1000, 2),
        },
    )


def _valid_correlation_id(value: str) -> bool:
    return 0 < len(value) <= 128 and all(c.isalnum() or c in "-_.:" for c in value)


def create_service_app(
    runtime: ServiceRuntime,
    routers: Iterable[APIRouter] = (),
    *,
    title: str | None = None,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
    middleware: Sequence[Middleware] = (),
    edge: bool = False,
) -> FastAPI:
    """The service's FastAPI app around its runtime.

    `routers` come before the standard health routes, and a health path one of them serves is
    left to it (the gateway answers its own `/health` and `/internal/health`). `lifespan` runs
    inside the runtime's (the broker is being connected, the database is there); `middleware`
    sits inside the correlation middleware. While tracing is on, each request has a span
    (outermost, so the logs of every layer carry its ids); `edge`: the callers are outside the
    system, and their trace headers are ignored (booking.runtime.tracing.ServerSpans).
    """

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        async with runtime.lifespan(app):
            if lifespan is None:
                yield
            else:
                async with lifespan(app):
                    yield

    app = FastAPI(
        title=title or f"booking {runtime.name}",
        lifespan=run,
        openapi_url="/openapi.json",
        middleware=[
            *([Middleware(tracing.ServerSpans, edge=edge)] if tracing.enabled() else []),
            Middleware(RequestContextMiddleware),
            *middleware,
        ],
        # FastAPI's own tracing would start a second span per request, trusting any caller's
        # trace headers and keeping the query string: ServerSpans traces them instead.
        telemetry={"tracing": False},
    )
    configure_access_log(runtime.settings.access_log)
    app.state.settings = runtime.settings
    app.state.runtime = runtime
    app.state.token_verifier = runtime.verifier  # booking.runtime.auth.authenticated
    dependency_errors: list[type[Exception]] = []
    if runtime.db is not None:
        import asyncpg
        from sqlalchemy.exc import SQLAlchemyError

        # InternalClientError: a BEGIN on the driver of a connection the server dropped
        # mid-operation ("cannot switch to state"); not a subclass of the other two.
        dependency_errors += [
            SQLAlchemyError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
        ]
    install_problem_handlers(app, dependency_errors)
    served: set[str] = set()
    for router in routers:
        app.include_router(router)
        served.update(getattr(route, "path", "") for route in router.routes)
    if runtime.dead_letters is not None:
        from booking.runtime.dead_letters import dead_letters_router

        app.include_router(dead_letters_router(runtime.dead_letters))
    app.include_router(runtime.health.router(served_elsewhere=served))

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        await runtime.refresh_gauges()
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
