"""One service, traced as it runs: `python -m booking.orders serve` with an OTLP endpoint exports
its spans to a receiver of the test's, and a booking's request, its statements, the relay's
publish and an event consumed in reply are one trace with each span under the right parent."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import httpx
import pytest

from booking.contracts import PaymentInitiated, parse_envelope, wrap
from booking.devtools.fixtures import eventually, free_port, serving_process
from booking.devtools.otlp import ReceivedSpan, SpanReceiver, receiving_spans
from booking.orders.settings import OrdersSettings
from booking.runtime.auth import issue_token
from booking.runtime.settings import RuntimeSettings


@pytest.fixture
async def receiver() -> AsyncIterator[SpanReceiver]:
    async with receiving_spans() as receiver:
        yield receiver


def service_environment(settings: OrdersSettings, port: int, endpoint: str) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return {
        **environment,
        "DATABASE_URL": settings.database_url,
        "RABBITMQ_URL": settings.rabbitmq_url.get_secret_value(),
        "EVENTS_EXCHANGE": settings.events_exchange,
        "ADMIN_ALERTS_EXCHANGE": settings.admin_alerts_exchange,
        "ORDER_CHANGES_EXCHANGE": settings.order_changes_exchange,
        "QUEUE_PREFIX": settings.queue_prefix,
        # Its retry delays as make_settings names its queues, which is what its teardown deletes.
        "CONSUMER_RETRY_BASE_DELAY_MS": str(settings.consumer_retry_base_delay_ms),
        "ORDERS_PORT": str(port),
        "BIND_HOST": "127.0.0.1",
        "DEVELOPMENT_MODE": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: the spans come in a moment, not in 5 s
    }


@pytest.fixture
async def orders(
    make_settings: Callable[..., Any], receiver: SpanReceiver
) -> AsyncIterator[tuple[OrdersSettings, httpx.AsyncClient]]:
    """The orders service as a process of its own, migrated and ready, tracing to `receiver`."""
    # The default attempt count, as the process has it: its retry queues are the ones the
    # teardown deletes.
    settings = make_settings(
        OrdersSettings, consumer_max_attempts=RuntimeSettings().consumer_max_attempts
    )
    port = free_port()
    env = service_environment(settings, port, receiver.url)
    migrated = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "booking.orders", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrated.returncode == 0, migrated.stderr
    async with serving_process("orders", env, port) as http:
        yield settings, http


def bearer(settings: OrdersSettings, sub: str, role: str) -> dict[str, str]:
    token = issue_token(settings.auth_jwt_secret.get_secret_value(), sub, role)
    return {"Authorization": f"Bearer {token}"}


async def book(settings: OrdersSettings, http: httpx.AsyncClient) -> str:
    """A mentor, an offering, and a booking of it: the order's id."""
    admin = bearer(settings, "admin-1", "admin")
    mentor = await http.post(
        "/api/mentors",
        json={"name": "Amira", "email": "amira@example.com", "timezone": "Africa/Tunis"},
        headers=admin,
    )
    assert mentor.status_code == 201, mentor.text
    mentor_id = mentor.json()["id"]
    offering = await http.post(
        f"/api/mentors/{mentor_id}/offerings",
        json={
            "title": "System design review",
            "duration_minutes": 60,
            "price": {"amount": 120_000, "currency": "TND"},
        },
        headers=bearer(settings, mentor_id, "mentor"),
    )
    assert offering.status_code == 201, offering.text
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=7)
    booked = await http.post(
        "/api/bookings",
        json={
            "offering_id": offering.json()["id"],
            "start_at": start.isoformat(),
            "mentee": {
                "first_name": "Youssef",
                "last_name": "Trabelsi",
                "email": "youssef@example.com",
                "phone": "+216 20 123 456",
            },
        },
        headers=bearer(settings, "mentee-1", "mentee"),
    )
    assert booked.status_code == 202, booked.text
    return str(booked.json()["order_id"])


def statements_under(receiver: SpanReceiver, parent: ReceivedSpan) -> list[ReceivedSpan]:
    return [
        span
        for span in receiver.trace(parent.trace_id)
        if span.parent_id == parent.span_id
        and span.kind == "CLIENT"
        and span.attributes.get("db.system") == "postgresql"
    ]


async def test_a_request_its_statements_and_an_event_consumed_in_reply_are_one_trace(
    orders, receiver, spy_on
):
    settings, http = orders
    spy = await spy_on(settings)
    order_id = await book(settings, http)
    await spy.one("BookingRequested", order_id=order_id)
    [requested] = [parse_envelope(m.body) for m in spy.of_type("BookingRequested")]
    assert requested.traceparent is not None
    # Payments' answer, as it would send it: in the trace BookingRequested carried.
    reply = wrap(
        PaymentInitiated(
            order_id=uuid.UUID(order_id),
            payment_ref="a" * 24,
            pay_url="https://pay.example/a",
            expires_at=datetime.now(UTC) + timedelta(minutes=30),
        ),
        message_id=uuid.uuid4(),
        correlation_id=requested.correlation_id,
        traceparent=requested.traceparent,
    )
    exchange = await spy.channel.get_exchange(settings.events_exchange)
    await exchange.publish(
        aio_pika.Message(reply.model_dump_json().encode(), message_id=str(reply.message_id)),
        reply.routing_key,
    )

    def consumed() -> list[ReceivedSpan]:
        return [
            span
            for span in receiver.named("PaymentInitiated process", "orders")
            if statements_under(receiver, span)
        ]

    await eventually(consumed, timeout=30, what="PaymentInitiated consumed, its spans exported")
    await eventually(
        lambda: receiver.named("BookingRequested publish", "orders"), what="the publish span"
    )

    [request] = receiver.named("POST /api/bookings", "orders")
    assert request.kind == "SERVER" and request.parent_id is None  # the trace starts there
    assert request.attributes["http.route"] == "/api/bookings"
    assert statements_under(receiver, request), "the booking's statements, under its request"
    # What the request recorded names the request's span; the relay's publish is under it.
    assert requested.traceparent.split("-")[1:3] == [request.trace_id, request.span_id]
    # At least once: a relay whose confirm came late publishes again, in a span of its own.
    publishes = receiver.named("BookingRequested publish", "orders")
    assert publishes
    for publish in publishes:
        assert (publish.kind, publish.trace_id, publish.parent_id) == (
            "PRODUCER",
            request.trace_id,
            request.span_id,
        )
    # The reply is handled in a consumer span of the same trace, its statements under it.
    [consumer] = consumed()
    assert (consumer.kind, consumer.trace_id, consumer.parent_id) == (
        "CONSUMER",
        request.trace_id,
        request.span_id,
    )
    assert consumer.attributes["messaging.message.id"] == str(reply.message_id)
    # Every span of the trace is the service's, and each one's parent is in it.
    spans = receiver.trace(request.trace_id)
    ids = {span.span_id for span in spans}
    assert {span.service for span in spans} == {"orders"}
    assert [span for span in spans if span.parent_id and span.parent_id not in ids] == []
    # The relay's claims and the health checks' statements belong to no work: no trace.
    assert all(span.parent_id is not None or span.kind == "SERVER" for span in receiver.spans)
