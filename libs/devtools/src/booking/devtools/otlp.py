"""Traces for tests: a local OTLP/HTTP receiver, and tracing in process to memory.

The receiver takes `POST /v1/traces` as an OpenTelemetry collector does (protobuf, gzip or not)
and keeps every span, named by the `service.name` of its resource: a test points the services'
OTEL_EXPORTER_OTLP_ENDPOINT at `receiver.url` and reads `receiver.spans`. `traced_in_memory`
turns booking.runtime.tracing on in the test's own process, without the instrumentations (they
patch httpx and asyncpg for the whole process).
"""

from __future__ import annotations

import contextlib
import gzip
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, Response
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from booking.devtools.fixtures import serving
from booking.runtime import tracing

PROTOBUF = "application/x-protobuf"


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span: ids in lowercase hex, as a traceparent writes them."""

    service: str
    name: str
    kind: str  # "SERVER", "CLIENT", "PRODUCER", "CONSUMER", "INTERNAL"
    trace_id: str
    span_id: str
    parent_id: str | None
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...]  # (trace id, span id) of each linked span

    def __str__(self) -> str:
        return f"{self.service}: {self.kind} {self.name!r} {self.span_id} <- {self.parent_id}"


@dataclass
class SpanReceiver:
    url: str = ""
    spans: list[ReceivedSpan] = field(default_factory=list)
    _seen: set[tuple[str, str]] = field(default_factory=set)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        """Every span of the trace received so far."""
        return [span for span in self.spans if span.trace_id == trace_id]

    def named(self, name: str, service: str | None = None) -> list[ReceivedSpan]:
        return [
            span
            for span in self.spans
            if span.name == name and (service is None or span.service == service)
        ]

    def receive(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            service = str(resource.get("service.name", "?"))
            for scope_spans in resource_spans.scope_spans:
                for proto in scope_spans.spans:
                    span = _span(service, proto)
                    # An export retried after a timeout sends the same spans again: one each.
                    if (span.trace_id, span.span_id) not in self._seen:
                        self._seen.add((span.trace_id, span.span_id))
                        self.spans.append(span)


def _span(service: str, span: ProtoSpan) -> ReceivedSpan:
    return ReceivedSpan(
        service=service,
        name=span.name,
        kind=ProtoSpan.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_id=span.parent_span_id.hex() or None,
        attributes=_attributes(span.attributes),
        links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
    )


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind)


def receiver_app(receiver: SpanReceiver) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/traces")
    async def traces(request: Request) -> Response:
        body = await request.body()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        receiver.receive(body)
        return Response(ExportTraceServiceResponse().SerializeToString(), media_type=PROTOBUF)

    return app


@contextlib.asynccontextmanager
async def receiving_spans(port: int | None = None) -> AsyncIterator[SpanReceiver]:
    """A receiver served on a loopback port (free, unless given) until the block ends."""
    receiver = SpanReceiver()
    async with serving(receiver_app(receiver), port) as url:
        receiver.url = url
        yield receiver


@contextlib.contextmanager
def traced_in_memory() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """Tracing on in this process until the block ends, every span sampled (but for the
    runtime's rule on spans outside any work) and exported to memory as it ends."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=tracing.within_work(ALWAYS_ON))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.trace_with(provider)
    try:
        yield provider, exporter
    finally:
        tracing.trace_with(None)
        provider.shutdown()
