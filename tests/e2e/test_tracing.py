"""Traces across the whole system: with an OTLP endpoint set, one booking paid through the
sandbox Konnect and scheduled in the sandbox Google is one connected trace, from the gateway's
`POST /api/bookings` to the confirmation, with spans of the gateway, orders, payments and
calendar, Konnect's webhook included (its call carries no trace: payments joins the booking's).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from booking.devtools.fixtures import eventually
from booking.devtools.otlp import ReceivedSpan, SpanReceiver, receiving_spans

from .conftest import FLOW_SECONDS

pytestmark = pytest.mark.e2e

# What one paid, scheduled booking must show in its trace: (service, span).
EXPECTED = {
    ("gateway", "POST /api/bookings"),
    ("orders", "POST /api/bookings"),
    ("orders", "BookingRequested publish"),
    ("payments", "BookingRequested process"),
    ("payments", "initiate payment"),
    ("payments", "PaymentInitiated publish"),
    ("orders", "PaymentInitiated process"),
    ("payments", "payment webhook"),
    ("payments", "PaymentCompleted publish"),
    ("orders", "PaymentCompleted process"),
    ("calendar", "OrderPaid process"),
    ("calendar", "CalendarBookingConfirmed publish"),
    ("orders", "CalendarBookingConfirmed process"),
    ("payments", "OrderConfirmed process"),
}


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[SpanReceiver]:
    async with receiving_spans() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def system_overrides(receiver: SpanReceiver) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # ms: spans arrive within a moment of ending
    }


def orphans(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    ids = {span.span_id for span in spans}
    return [span for span in spans if span.parent_id is not None and span.parent_id not in ids]


async def test_one_paid_booking_is_one_connected_trace_across_the_services(market, receiver):
    offering = await market.offering()
    await market.connect_calendar(offering["mentor_id"])
    order_id = await market.booked(offering)
    await market.pay(await market.payment_ref(order_id))  # the sandbox calls the webhook
    await market.order_when(order_id, "the order confirmed", lambda o: o["status"] == "confirmed")

    [booking] = await eventually(
        lambda: receiver.named("POST /api/bookings", "gateway"), what="the booking's request"
    )

    def whole() -> list[ReceivedSpan] | None:
        spans = receiver.trace(booking.trace_id)
        found = {(span.service, span.name) for span in spans}
        return spans if found >= EXPECTED and not orphans(spans) else None

    spans = await eventually(whole, timeout=FLOW_SECONDS, what="the booking's whole trace")

    described = "\n".join(map(str, spans))
    assert [span for span in spans if span.parent_id is None] == [booking], described
    assert {"gateway", "orders", "payments", "calendar"} <= {span.service for span in spans}
    # The outside calls are in it: Konnect (opening the payment, the webhook's lookup), Google.
    outside = [
        span
        for span in spans
        if span.kind == "CLIENT" and not {"db.system", "db.system.name"} & set(span.attributes)
    ]
    assert {span.service for span in outside} >= {"payments", "calendar"}, described
    # Konnect's webhook came with no trace: its request is a trace of its own, which the
    # booking's webhook span (under the span the payment was opened in) links to.
    [webhook] = [span for span in spans if span.name == "payment webhook"]
    assert webhook.parent_id in {s.span_id for s in spans if s.name == "BookingRequested process"}
    [(linked_trace, linked_span)] = webhook.links
    webhook_request = {
        ("gateway", "GET /api/payments/webhook"),
        ("payments", "GET /api/payments/webhook"),
    }

    def request() -> list[ReceivedSpan] | None:
        spans = receiver.trace(linked_trace)
        return spans if webhook_request <= {(s.service, s.name) for s in spans} else None

    linked = await eventually(request, what="the webhook request's own trace")
    assert linked_span in {span.span_id for span in linked}
