"""OpenTelemetry traces: one trace per booking, across HTTP and events (docs/operations.md,
"Traces").

Off unless an OTLP endpoint is set (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
OTEL_EXPORTER_OTLP_ENDPOINT): `configure_tracing` then builds the SDK's tracer provider (OTLP
over HTTP, batched), instruments httpx and asyncpg, and the host adds `ServerSpans` to the app.
The SDK reads the other OTEL_* variables itself (the sampler, the batch sizes, the exporter's
headers and timeout). While tracing is off nothing but OpenTelemetry's API is imported, and
every helper here returns at its first line: an outbox row, a consumed message and a log line
each pay one read of a global.

The context crosses the broker in the envelope (`traceparent`, `tracestate`): the outbox writes
the span in progress into each event it records (`current_headers`), the relay publishes each
row in a PRODUCER span under it (`publishing`), and the consumer runs the handler in a CONSUMER
span under it (`consuming`), so what the handler records continues the same trace. Work that
resumes later from a stored context (the payments webhook, which Konnect sends with no trace)
joins it with `joined`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Tracer, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from booking.contracts.envelope import TRACESTATE_MAX_CHARS

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.sampling import Sampler
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from booking.contracts import Envelope

log = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
"""Either turns tracing on (the first is the whole URL, the second a base + /v1/traces)."""

# Set by `configure_tracing` (`trace_with`); None while tracing is off, which every helper
# checks first.
_tracer: Tracer | None = None
_provider: TracerProvider | None = None

# W3C Trace Context, the format of the envelope's fields and of the HTTP headers.
_PROPAGATOR = TraceContextTextMapPropagator()
_NOTHING: contextlib.nullcontext[None] = contextlib.nullcontext()
_NO_HEADERS: tuple[None, None] = (None, None)

# Polled by the gateway, the probes and Prometheus many times a minute: no trace of their own.
_UNTRACED_PATHS = frozenset(("/health", "/internal/health", "/metrics"))
# What a caller outside the system may send that would make our spans part of its trace.
_TRACE_HEADERS = frozenset((b"traceparent", b"tracestate", b"baggage"))


def tracing_endpoint(environ: Mapping[str, str] | None = None) -> str | None:
    """Where spans go, or None: tracing is off (no endpoint set, or OTEL_SDK_DISABLED=true)."""
    environ = os.environ if environ is None else environ
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    for name in ENDPOINT_VARIABLES:
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def configure_tracing(service: str, *, database: bool = True) -> bool:
    """Turn tracing on for this process if an OTLP endpoint is set; whether it is on.

    Call it once, before the app is built (the host adds its middleware only when on). The
    service is named `service` unless OTEL_SERVICE_NAME (or service.name in
    OTEL_RESOURCE_ATTRIBUTES) says otherwise. `database`: instrument asyncpg too (the gateway
    has no database, and never loads asyncpg).
    """
    if _tracer is not None:
        return True
    endpoint = tracing_endpoint()
    if endpoint is None:
        return False
    # Only now: a process that traces nothing never loads the SDK, the exporter or these.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # The environment's name wins over ours (Resource.create alone would do the opposite).
    resource = Resource.create({SERVICE_NAME: service}).merge(OTELResourceDetector().detect())
    provider = SdkTracerProvider(resource=resource)  # its sampler: OTEL_TRACES_SAMPLER's
    provider.sampler = within_work(provider.sampler)  # before any tracer takes it
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    if database:
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    trace_with(provider)
    parts = urlsplit(endpoint)
    port = f":{parts.port}" if parts.port else ""
    log.info(
        "tracing on: spans of %s go to %s",
        resource.attributes.get(SERVICE_NAME, service),
        f"{parts.scheme}://{parts.hostname}{port}{parts.path}",  # never a credential in it
    )
    return True


def trace_with(provider: TracerProvider | None) -> None:
    """Trace with `provider` from now on (None: stop). `configure_tracing` calls it with the
    provider it built; a test may with one of its own (an in-memory exporter), and without the
    instrumentations, which patch libraries for the whole process."""
    global _tracer, _provider
    _provider = provider
    _tracer = None if provider is None else provider.get_tracer("booking.runtime")


def within_work(sampler: Sampler) -> Sampler:
    """`sampler`, except that a client or producer span with no parent is dropped.

    Those are the statements and calls of background work that belongs to no request or
    message: the outbox relay's claims every second, the sweepers' rounds, the health checks.
    Kept, each would be a trace of one span. (The events such work records carry no trace
    either; their consumer starts one.)
    """
    from opentelemetry.sdk.trace.sampling import Decision, SamplingResult
    from opentelemetry.sdk.trace.sampling import Sampler as SamplerBase

    dropped = SamplingResult(Decision.DROP)
    unparented = (SpanKind.CLIENT, SpanKind.PRODUCER)

    class WithinWork(SamplerBase):
        def should_sample(
            self,
            parent_context: otel_context.Context | None,
            trace_id: int,
            name: str,
            kind: SpanKind | None = None,
            attributes: Attributes = None,
            links: Sequence[Link] | None = None,
            trace_state: trace.TraceState | None = None,
        ) -> SamplingResult:
            if (
                kind in unparented
                and not trace.get_current_span(parent_context).get_span_context().is_valid
            ):
                return dropped
            return sampler.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )

        def get_description(self) -> str:
            return f"WithinWork{{{sampler.get_description()}}}"

    return WithinWork()


def enabled() -> bool:
    return _tracer is not None


# --- across the broker: the envelope's fields ----------------------------------------------


def current_headers() -> tuple[str | None, str | None]:
    """The `traceparent` and `tracestate` of the span in progress, for an event's envelope;
    (None, None) while tracing is off or outside any span."""
    if _tracer is None:
        return _NO_HEADERS
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    tracestate = carrier.get("tracestate")
    if tracestate is not None and len(tracestate) > TRACESTATE_MAX_CHARS:
        tracestate = None  # W3C lets a carrier drop it; the envelope would refuse it
    return carrier.get("traceparent"), tracestate


def _context_of(traceparent: str | None, tracestate: str | None) -> otel_context.Context:
    """The context these headers name; an empty one (a new trace) when they name none."""
    carrier = {"traceparent": traceparent} if traceparent else {}
    if carrier and tracestate:
        carrier["tracestate"] = tracestate
    return _PROPAGATOR.extract(carrier, context=otel_context.Context())


def publishing(
    *, body: str, event_type: str, exchange: str, routing_key: str, message_id: str
) -> AbstractContextManager[object]:
    """The relay's PRODUCER span around publishing one outbox row, under the trace its
    envelope (`body`) names; nothing for an event recorded outside any trace."""
    if _tracer is None:
        return _NOTHING
    try:
        envelope = json.loads(body)
        traceparent, tracestate = envelope.get("traceparent"), envelope.get("tracestate")
    except (ValueError, AttributeError):
        return _NOTHING  # not ours to judge here: its consumer dead-letters it
    if not traceparent:
        return _NOTHING
    return _tracer.start_as_current_span(
        f"{event_type} publish",
        context=_context_of(traceparent, tracestate),
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            "messaging.destination.name": exchange,
            "messaging.rabbitmq.destination.routing_key": routing_key,
            "messaging.message.id": message_id,
        },
    )


def consuming(envelope: Envelope, consumer: str) -> AbstractContextManager[object]:
    """The CONSUMER span a handler runs in, under the trace its envelope names (a new trace
    when it names none): what the handler records continues that trace."""
    if _tracer is None:
        return _NOTHING
    return _tracer.start_as_current_span(
        f"{envelope.type} process",
        context=_context_of(envelope.traceparent, envelope.tracestate),
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": consumer,
            "messaging.consumer.group.name": consumer,
            "messaging.message.id": str(envelope.message_id),
            "messaging.message.conversation_id": envelope.correlation_id,
        },
    )


def carried(step: Callable[[], Awaitable[None]], name: str) -> Callable[[], Awaitable[None]]:
    """`step`, to run later (after a commit) in a span of its own under the span in progress
    now; `step` itself while tracing is off."""
    tracer = _tracer
    if tracer is None:
        return step
    now = otel_context.get_current()

    async def traced() -> None:
        with tracer.start_as_current_span(name, context=now):
            await step()

    return traced


def joined(traceparent: str | None, name: str) -> AbstractContextManager[object]:
    """A span named `name` in the trace `traceparent` names (one stored with the work it
    resumes), linked to the span in progress if that is another trace's: work that comes
    with no trace of its own (Konnect's webhook) joins the booking's. Under the span in
    progress when that is already in the stored trace; nothing while off or with none stored.
    """
    if _tracer is None or not traceparent:
        return _NOTHING
    stored = _context_of(traceparent, None)
    stored_span = trace.get_current_span(stored).get_span_context()
    if not stored_span.is_valid:
        return _NOTHING  # not a traceparent: nothing to join
    current = trace.get_current_span().get_span_context()
    if current.is_valid and current.trace_id == stored_span.trace_id:
        return _tracer.start_as_current_span(name)
    links = [Link(current)] if current.is_valid else None
    return _tracer.start_as_current_span(name, context=stored, links=links)


# --- HTTP ------------------------------------------------------------------------------------


def outgoing(
    method: str, url: str, headers: MutableMapping[str, str], *, peer: str
) -> AbstractContextManager[Span | None]:
    """A CLIENT span around one HTTP call made without httpx (the gateway's aiohttp hop), its
    `traceparent` written into `headers`; it yields the span (None while off) for `answered`.
    The URL is kept without its query, which may hold a token or an OAuth code."""
    if _tracer is None:
        return _NOTHING
    return _client_span(_tracer, method, url.partition("?")[0], headers, peer)


@contextlib.contextmanager
def _client_span(
    tracer: Tracer, method: str, url: str, headers: MutableMapping[str, str], peer: str
) -> Iterator[Span]:
    with tracer.start_as_current_span(
        method,
        kind=SpanKind.CLIENT,
        attributes={"http.request.method": method, "url.full": url, "peer.service": peer},
    ) as span:
        _PROPAGATOR.inject(headers)
        yield span


def answered(span: Span, status: int) -> None:
    """The status of the call `span` (from `outgoing`) made; a 5xx marks it failed."""
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(trace.StatusCode.ERROR)


class ServerSpans:
    """A SERVER span for each HTTP request, from OpenTelemetry's ASGI middleware, named by its
    route's template once routed (`POST /api/bookings`, `GET /api/orders/{order_id}`).

    Health and metrics requests, and websockets (an admin's lasts hours), get none. On the
    `edge` (the gateway: its callers are outside the system), a caller's trace headers are
    ignored: every trace starts with us, and no caller decides what is sampled. No span keeps
    a query string: an order stream's access token and Google's OAuth code travel in one.
    """

    def __init__(self, app: ASGIApp, *, edge: bool = False) -> None:
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        self.app = app
        self.edge = edge
        self.traced = OpenTelemetryMiddleware(
            _named_by_route(app),
            tracer_provider=_provider,
            default_span_details=_method_only,
            server_request_hook=_without_query,
            exclude_spans=["receive", "send"],  # a span per ASGI message is noise
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _UNTRACED_PATHS:
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith("/health/"):
            await self.app(scope, receive, send)
            return
        if self.edge and any(name in _TRACE_HEADERS for name, _ in scope["headers"]):
            scope = dict(scope)
            scope["headers"] = [(n, v) for n, v in scope["headers"] if n not in _TRACE_HEADERS]
        await self.traced(scope, receive, send)


def _method_only(scope: Scope) -> tuple[str, dict[str, Any]]:
    # Until the request is routed: the method alone (a raw path would name a span per order).
    return scope.get("method", "HTTP"), {}


# Where the ASGI middleware records a query string (either semantic conventions' version).
_WITH_QUERY = ("http.url", "http.target", "url.full")


def _without_query(span: Span, scope: Scope) -> None:
    """Overwrite what the middleware recorded of the query string (it keeps it whole)."""
    if not scope.get("query_string") or not span.is_recording():
        return
    recorded: Mapping[str, Any] = getattr(span, "attributes", None) or {}
    for name in _WITH_QUERY:
        value = recorded.get(name)
        if isinstance(value, str) and "?" in value:
            span.set_attribute(name, value.partition("?")[0])
    if "url.query" in recorded:
        span.set_attribute("url.query", "")


def _named_by_route(app: ASGIApp) -> ASGIApp:
    async def named(scope: Scope, receive: Receive, send: Send) -> None:
        span = trace.get_current_span()  # the request's, which the middleware just started

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", None)
                if route is not None:
                    span.update_name(f"{scope['method']} {route}")
                    span.set_attribute("http.route", route)
            await send(message)

        await app(scope, receive, send_named)

    return named


# --- logs ------------------------------------------------------------------------------------


def log_ids() -> tuple[str, str] | None:
    """The trace and span ids of the span in progress, for a log line; None while off, outside
    any span, or in a trace that is not sampled (it will not exist to look up)."""
    if _tracer is None:
        return None
    span = trace.get_current_span().get_span_context()
    if not span.is_valid or not span.trace_flags.sampled:
        return None
    return format(span.trace_id, "032x"), format(span.span_id, "016x")
