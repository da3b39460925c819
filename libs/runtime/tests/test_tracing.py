"""Traces (booking.runtime.tracing): off, nothing is loaded and every helper does nothing; on,
the trace goes from a request through the outbox, the relay and the consumer to what the
handler records, and work resumed later joins the trace it stored.

The in-process tests trace with an SDK provider of their own (`trace_with`) and an in-memory
exporter, without the instrumentations (they patch httpx and asyncpg for the whole process);
configure_tracing itself runs in a fresh interpreter, which is also how what it loads is seen.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import select
from starlette.middleware import Middleware

from booking.contracts import PaymentFailed, PaymentFailureReason, parse_envelope, wrap
from booking.devtools.fixtures import eventually
from booking.devtools.otlp import traced_in_memory
from booking.runtime import tracing
from booking.runtime.consumer import MessageContext
from booking.runtime.logs import configure_logging

# --- configure_tracing, in a fresh interpreter ------------------------------------------------

PROBE = """
import json, sys
import booking.runtime.cli, booking.runtime.consumer, booking.runtime.host
import booking.runtime.logs, booking.runtime.outbox
from booking.runtime.tracing import configure_tracing
on = configure_tracing("orders", database=sys.argv[1] == "database")
from opentelemetry import trace
provider = trace.get_tracer_provider()
resource = getattr(provider, "resource", None)
print(json.dumps({
    "on": on,
    "loaded": sorted(name for name in sys.modules if name.startswith("opentelemetry")),
    "service": resource.attributes.get("service.name") if resource else None,
    "sampler": provider.sampler.get_description() if hasattr(provider, "sampler") else None,
}))
"""

# What only tracing that is on may load.
SDK_PARTS = (
    "opentelemetry.sdk",
    "opentelemetry.exporter",
    "opentelemetry.instrumentation",
    "opentelemetry.proto",
)


def probe(*, database: bool = True, **env: str) -> dict[str, Any]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "database" if database else "none"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**environment, **env},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def sdk_modules(loaded: list[str]) -> list[str]:
    return [name for name in loaded if name.startswith(SDK_PARTS)]


class TestConfigure:
    def test_without_an_endpoint_tracing_is_off_and_nothing_but_the_api_is_loaded(self):
        found = probe()
        assert found["on"] is False
        assert sdk_modules(found["loaded"]) == []
        assert "opentelemetry.trace" in found["loaded"]  # the API alone: its no-op tracer

    def test_the_sdk_switched_off_keeps_it_off_whatever_the_endpoint(self):
        found = probe(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:1", OTEL_SDK_DISABLED="true")
        assert found["on"] is False
        assert sdk_modules(found["loaded"]) == []

    def test_an_endpoint_turns_it_on_named_after_the_service_with_asyncpg_traced(self):
        found = probe(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:1")
        assert found["on"] is True
        assert found["service"] == "orders"
        assert "opentelemetry.sdk.trace" in found["loaded"]
        assert "opentelemetry.exporter.otlp.proto.http.trace_exporter" in found["loaded"]
        assert "opentelemetry.instrumentation.httpx" in found["loaded"]
        assert "opentelemetry.instrumentation.asyncpg" in found["loaded"]
        # The SDK's default sampler, within our rule for spans outside any work.
        assert found["sampler"].startswith("WithinWork{ParentBased")

    def test_the_traces_endpoint_alone_turns_it_on_and_the_environment_names_and_samples(self):
        found = probe(
            database=False,
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://127.0.0.1:1/v1/traces",
            OTEL_SERVICE_NAME="orders-eu",
            OTEL_TRACES_SAMPLER="always_off",
        )
        assert found["on"] is True
        assert found["service"] == "orders-eu"
        assert found["sampler"] == "WithinWork{AlwaysOffSampler}"
        # Without a database (the gateway) asyncpg is neither instrumented nor loaded.
        assert not any(
            name.startswith("opentelemetry.instrumentation.asyncpg") for name in found["loaded"]
        )


# --- the helpers, in process ------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for the test, every span kept in memory."""
    with traced_in_memory() as (_, exporter):
        yield exporter


def tracer() -> trace.Tracer:
    return trace.get_tracer("test", tracer_provider=tracing._provider)


def hex_ids(span: trace.Span | ReadableSpan) -> tuple[str, str]:
    context = span.get_span_context()
    assert context is not None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def named(traceparent: str | None) -> tuple[str, str]:
    """The trace and span a traceparent names (its flags aside: the SDK may set more than
    sampled)."""
    assert traceparent is not None
    _, trace_id, span_id, _ = traceparent.split("-")
    return trace_id, span_id


def parent_of(span: ReadableSpan) -> str | None:
    return format(span.parent.span_id, "016x") if span.parent else None


def finished(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    [span] = [s for s in exporter.get_finished_spans() if s.name == name]
    return span


def envelope_with(traceparent: str | None) -> Any:
    event = PaymentFailed(
        order_id=uuid.uuid4(), payment_ref="p", reason=PaymentFailureReason.EXPIRED
    )
    return wrap(event, message_id=uuid.uuid4(), correlation_id="c", traceparent=traceparent)


class TestOff:
    async def test_every_helper_does_nothing(self):
        assert not tracing.enabled()
        assert tracing.current_headers() == (None, None)
        assert tracing.log_ids() is None
        envelope = envelope_with("00-" + "1" * 32 + "-" + "2" * 16 + "-01")
        with tracing.consuming(envelope, "q") as consumed:
            assert consumed is None

        async def step() -> None:
            pass

        assert tracing.carried(step, "later") is step
        with tracing.joined(envelope.traceparent, "webhook") as joined:
            assert joined is None
        headers: dict[str, str] = {}
        with tracing.outgoing("GET", "http://orders/x", headers, peer="orders") as span:
            assert span is None
        assert headers == {}


class TestAcrossTheBroker:
    def test_the_span_in_progress_is_what_an_event_records(self, spans):
        with tracer().start_as_current_span("request") as request:
            traceparent, tracestate = tracing.current_headers()
        trace_id, span_id = hex_ids(request)
        assert named(traceparent) == (trace_id, span_id)
        assert tracestate is None
        assert tracing.current_headers() == (None, None)  # outside any span

    def test_a_consumed_event_is_handled_in_a_consumer_span_under_its_envelopes(self, spans):
        with tracer().start_as_current_span("request") as request:
            traceparent, _ = tracing.current_headers()
        envelope = envelope_with(traceparent)

        with tracing.consuming(envelope, "payments"):
            recorded, _ = tracing.current_headers()

        consumer = finished(spans, "PaymentFailed process")
        assert consumer.kind is SpanKind.CONSUMER
        assert hex_ids(consumer)[0] == hex_ids(request)[0]
        assert parent_of(consumer) == hex_ids(request)[1]
        assert consumer.attributes["messaging.message.id"] == str(envelope.message_id)
        # What the handler records continues the trace, under the consumer's span.
        assert named(recorded) == hex_ids(consumer)

    def test_an_event_with_no_trace_starts_one(self, spans):
        with (
            tracer().start_as_current_span("unrelated work"),
            tracing.consuming(envelope_with(None), "payments"),
        ):
            pass
        consumer = finished(spans, "PaymentFailed process")
        assert consumer.parent is None  # not the work that happened to be in progress

    def test_the_relay_publishes_in_a_producer_span_under_the_envelopes(self, spans):
        with tracer().start_as_current_span("request") as request:
            traceparent, _ = tracing.current_headers()
        body = envelope_with(traceparent).model_dump_json()

        with tracing.publishing(
            body=body, event_type="PaymentFailed", exchange="x", routing_key="k", message_id="m"
        ):
            pass
        with tracing.publishing(
            body=envelope_with(None).model_dump_json(),
            event_type="Untraced",
            exchange="x",
            routing_key="k",
            message_id="n",
        ):
            pass

        producer = finished(spans, "PaymentFailed publish")
        assert producer.kind is SpanKind.PRODUCER
        assert parent_of(producer) == hex_ids(request)[1]
        assert hex_ids(producer)[0] == hex_ids(request)[0]
        assert [s.name for s in spans.get_finished_spans()] == ["request", "PaymentFailed publish"]

    async def test_a_step_after_the_commit_runs_in_the_trace_of_its_message(self, spans):
        seen: list[str | None] = []

        async def step() -> None:
            seen.append(tracing.current_headers()[0])

        with tracer().start_as_current_span("consumer") as consumer:
            later = tracing.carried(step, "OrderPaid after commit")
        await later()  # outside the span, as the consumer runs it

        after = finished(spans, "OrderPaid after commit")
        assert parent_of(after) == hex_ids(consumer)[1]
        assert [named(traceparent) for traceparent in seen] == [hex_ids(after)]


class TestJoined:
    def test_work_with_no_trace_joins_the_stored_one_linked_to_its_own(self, spans):
        with tracer().start_as_current_span("booking") as booking:
            stored, _ = tracing.current_headers()
        with (
            tracer().start_as_current_span("webhook request") as request,
            tracing.joined(stored, "payment webhook"),
        ):
            recorded, _ = tracing.current_headers()

        webhook = finished(spans, "payment webhook")
        assert hex_ids(webhook)[0] == hex_ids(booking)[0] != hex_ids(request)[0]
        assert parent_of(webhook) == hex_ids(booking)[1]
        [link] = webhook.links
        linked = (format(link.context.trace_id, "032x"), format(link.context.span_id, "016x"))
        assert linked == hex_ids(request)
        assert recorded is not None and recorded.split("-")[1] == hex_ids(booking)[0]

    def test_work_already_in_the_stored_trace_is_a_child_of_the_span_in_progress(self, spans):
        with tracer().start_as_current_span("booking") as booking:
            stored, _ = tracing.current_headers()
            with (
                tracer().start_as_current_span("consumer") as consumer,
                tracing.joined(stored, "initiate payment"),
            ):
                pass
        initiate = finished(spans, "initiate payment")
        assert hex_ids(initiate)[0] == hex_ids(booking)[0]
        assert parent_of(initiate) == hex_ids(consumer)[1]
        assert not initiate.links

    def test_nothing_stored_or_nothing_readable_is_nothing_to_join(self, spans):
        for stored in (None, "", "not-a-traceparent"):
            with tracing.joined(stored, "payment webhook") as joined:
                assert joined is None
        assert spans.get_finished_spans() == ()


class TestSampling:
    def test_a_statement_or_call_outside_any_work_is_dropped(self, spans):
        with tracer().start_as_current_span("relay claim", kind=SpanKind.CLIENT):
            pass
        with tracer().start_as_current_span("orphan publish", kind=SpanKind.PRODUCER):
            pass
        with (
            tracer().start_as_current_span("request", kind=SpanKind.SERVER),
            tracer().start_as_current_span("INSERT", kind=SpanKind.CLIENT),
        ):
            pass
        assert [s.name for s in spans.get_finished_spans()] == ["INSERT", "request"]


class TestHttp:
    def app(self, edge: bool) -> FastAPI:
        app = FastAPI(middleware=[Middleware(tracing.ServerSpans, edge=edge)])

        @app.get("/api/orders/{order_id}")
        async def order(order_id: str) -> dict[str, str | None]:
            return {"order_id": order_id, "traceparent": tracing.current_headers()[0]}

        @app.get("/health/live")
        async def live() -> dict[str, str]:
            return {"status": "pass"}

        return app

    async def get(self, app: FastAPI, path: str, **headers: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orders") as http:
            return await http.get(path, headers=headers)

    async def test_a_request_is_a_server_span_named_by_its_route_without_its_query(self, spans):
        answer = await self.get(self.app(edge=False), "/api/orders/o-1?access_token=secret")

        [server] = spans.get_finished_spans()
        assert server.name == "GET /api/orders/{order_id}"
        assert server.kind is SpanKind.SERVER
        assert server.attributes["http.route"] == "/api/orders/{order_id}"
        assert "secret" not in json.dumps(dict(server.attributes))
        assert answer.json()["traceparent"].split("-")[2] == hex_ids(server)[1]

    async def test_inside_the_system_a_callers_trace_is_continued(self, spans):
        caller = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
        await self.get(self.app(edge=False), "/api/orders/o-1", traceparent=caller)
        [server] = spans.get_finished_spans()
        assert (hex_ids(server)[0], parent_of(server)) == ("a" * 32, "b" * 16)

    async def test_on_the_edge_a_callers_trace_is_ignored(self, spans):
        caller = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
        await self.get(self.app(edge=True), "/api/orders/o-1", traceparent=caller)
        [server] = spans.get_finished_spans()
        assert hex_ids(server)[0] != "a" * 32
        assert server.parent is None

    async def test_health_is_not_traced(self, spans):
        answer = await self.get(self.app(edge=False), "/health/live")
        assert answer.status_code == 200
        assert spans.get_finished_spans() == ()

    def test_a_call_without_httpx_carries_its_client_span(self, spans):
        headers: dict[str, str] = {}
        url = "http://calendar/api/oauth?code=secret"
        with (
            tracer().start_as_current_span("request") as request,
            tracing.outgoing("GET", url, headers, peer="calendar") as span,
        ):
            assert span is not None
            tracing.answered(span, 502)
        client = finished(spans, "GET")
        assert client.kind is SpanKind.CLIENT
        assert parent_of(client) == hex_ids(request)[1]
        assert named(headers["traceparent"]) == hex_ids(client)
        assert client.attributes["url.full"] == "http://calendar/api/oauth"
        assert client.attributes["http.response.status_code"] == 502
        assert not client.status.is_ok


class TestLogs:
    def test_a_line_in_a_span_carries_its_ids_and_one_outside_none(self, spans, monkeypatch):
        root = logging.getLogger()
        kept_handlers, kept_level = root.handlers[:], root.level
        out = io.StringIO()
        try:
            monkeypatch.setattr(sys, "stdout", out)
            configure_logging("orders")
            log = logging.getLogger("booking.test")
            with tracer().start_as_current_span("request") as request:
                log.warning("inside")
            log.warning("outside")
        finally:
            root.handlers[:] = kept_handlers
            root.setLevel(kept_level)
        inside, outside = (json.loads(line) for line in out.getvalue().splitlines())
        assert (inside["trace_id"], inside["span_id"]) == hex_ids(request)
        assert "trace_id" not in outside and "span_id" not in outside


# --- through a service's outbox, relay and consumer, on the real servers ---------------------


class TestThroughTheServers:
    async def test_a_recorded_event_is_published_consumed_and_followed_in_one_trace(
        self, spans, make_service, spy_on, new_event
    ):
        async def handle(event: Any, ctx: MessageContext) -> None:
            # A follow-up, as a service records one; and an outside call after the commit.
            await ctx.record(
                PaymentFailed(
                    order_id=uuid.uuid4(), payment_ref="p", reason=PaymentFailureReason.FAILED
                )
            )

            async def after() -> None:
                pass

            ctx.call_after_commit(after)

        service = await make_service(handle)
        await spy_on(service.settings)  # binds "#": the follow-up has a queue to go to
        with tracer().start_as_current_span("request") as request:
            [recorded_id] = await service.record(new_event())
        trace_id, request_id = hex_ids(request)

        def spans_named(name: str) -> list[ReadableSpan]:
            return [s for s in spans.get_finished_spans() if s.name == name]

        await eventually(
            lambda: (
                spans_named("MentorRegistered after commit")
                and spans_named("PaymentFailed publish")
            ),
            what="the event consumed and its follow-up published",
        )
        [producer] = spans_named("MentorRegistered publish")
        [consumer] = spans_named("MentorRegistered process")
        [after] = spans_named("MentorRegistered after commit")
        [follow_up] = spans_named("PaymentFailed publish")
        assert {hex_ids(s)[0] for s in (producer, consumer, after, follow_up)} == {trace_id}
        assert parent_of(producer) == request_id
        assert parent_of(consumer) == request_id
        assert consumer.attributes["messaging.message.id"] == str(recorded_id)
        assert parent_of(after) == hex_ids(consumer)[1]
        assert parent_of(follow_up) == hex_ids(consumer)[1]
        # The follow-up's envelope, as the outbox keeps it, names the consumer's span.
        outbox = service.tables.outbox
        async with service.db.engine.connect() as conn:
            body = await conn.scalar(
                select(outbox.c.body).where(outbox.c.event_type == "PaymentFailed")
            )
        assert named(parse_envelope(body).traceparent) == (trace_id, hex_ids(consumer)[1])
