"""Konnect's webhook joins the booking's trace: Konnect sends no trace context, so the payment
keeps the trace of the BookingRequested that opened it, and what the webhook sets off (the
lookup, PaymentCompleted) continues it, linked to the webhook request's own trace."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from booking.devtools.fixtures import deliver
from booking.devtools.otlp import traced_in_memory
from booking.payments.tables import SCHEMA

# The span of orders that recorded BookingRequested (it is not ours to see).
ORDERS_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
ORDERS_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def traced() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    with traced_in_memory() as traced:
        yield traced


def ids(span: ReadableSpan | trace.Span) -> tuple[str, str]:
    context = span.get_span_context()
    assert context is not None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def parent_of(span: ReadableSpan) -> str | None:
    return format(span.parent.span_id, "016x") if span.parent else None


def one(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    [span] = [s for s in exporter.get_finished_spans() if s.name == name]
    return span


async def recorded_trace(db, event_type: str) -> tuple[str, str] | None:
    """The trace and span the last `event_type` recorded names in its envelope."""
    body = await db.fetchval(
        f"SELECT body FROM {SCHEMA}.outbox WHERE event_type = $1 ORDER BY id DESC LIMIT 1",
        event_type,
    )
    traceparent = json.loads(body).get("traceparent")
    if traceparent is None:
        return None
    _, trace_id, span_id, _ = traceparent.split("-")
    return trace_id, span_id


async def test_the_webhook_and_what_it_records_join_the_bookings_trace(
    payments, sandbox, traced, db
):
    provider, spans = traced
    booking = payments.new_booking()
    await deliver(
        payments.app.state.runtime, booking, traceparent=f"00-{ORDERS_TRACE}-{ORDERS_SPAN}-01"
    )
    ref = (await payments.initiated(booking.order_id))["payment_ref"]
    consumed = one(spans, "BookingRequested process")
    assert (ids(consumed)[0], parent_of(consumed)) == (ORDERS_TRACE, ORDERS_SPAN)
    # Konnect was asked after the commit, in the same trace; PaymentInitiated continues it.
    initiate = one(spans, "initiate payment")
    assert ids(initiate)[0] == ORDERS_TRACE
    assert parent_of(one(spans, "BookingRequested after commit")) == ids(consumed)[1]
    assert await recorded_trace(db, "PaymentInitiated") == (ORDERS_TRACE, ids(initiate)[1])
    await sandbox.complete(ref, webhook="none")

    # The request Konnect's call came in, a trace of its own (as the host's middleware starts).
    with trace.get_tracer("test", tracer_provider=provider).start_as_current_span("GET") as call:
        answer = await payments.service.notify(ref)

    assert answer.status == "completed"
    webhook = one(spans, "payment webhook")
    assert ids(webhook)[0] == ORDERS_TRACE != ids(call)[0]
    assert parent_of(webhook) == ids(consumed)[1]  # the span the payment was opened in
    [link] = webhook.links
    assert (format(link.context.trace_id, "032x"), format(link.context.span_id, "016x")) == ids(
        call
    )
    assert await recorded_trace(db, "PaymentCompleted") == (ORDERS_TRACE, ids(webhook)[1])


async def test_a_payment_opened_while_tracing_was_off_answers_its_webhook_untraced(
    payments, sandbox, db
):
    booking = await payments.request_booking()
    ref = (await payments.initiated(booking.order_id))["payment_ref"]
    await sandbox.complete(ref, webhook="none")

    with traced_in_memory() as (_, spans):
        answer = await payments.service.notify(ref)

    assert answer.status == "completed"
    assert spans.get_finished_spans() == ()  # no stored trace: nothing to join
    assert await recorded_trace(db, "PaymentCompleted") is None
