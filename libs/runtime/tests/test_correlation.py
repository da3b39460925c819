"""One correlation id follows a booking: from the HTTP request into its events, and into logs."""

from __future__ import annotations

import json
import logging

import httpx
from fastapi import APIRouter, Request

from booking.contracts import parse_envelope
from booking.devtools.fixtures import eventually
from booking.runtime import context
from booking.runtime.host import create_service_app
from booking.runtime.logs import configure_logging


async def test_an_event_recorded_by_a_request_carries_the_requests_correlation_id(
    make_service, spy_on, new_event
):
    service = await make_service()
    spy = await spy_on(service.settings)
    router = APIRouter()

    @router.post("/things")
    async def create_thing(request: Request) -> dict:
        await service.record(new_event("from-http"))
        return {}

    app = create_service_app(service.runtime, [router])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        given = await client.post("/things", headers={"X-Correlation-ID": "booking-42"})
        generated = await client.post("/things")

    assert given.headers["x-correlation-id"] == "booking-42"
    minted = generated.headers["x-correlation-id"]
    assert minted and minted != "booking-42"
    await eventually(lambda: len(spy.messages) == 2, what="both events")
    correlations = {parse_envelope(m.body).correlation_id for m in spy.messages}
    assert correlations == {"booking-42", minted}


async def test_a_malformed_correlation_header_is_replaced_not_trusted(make_service):
    service = await make_service()
    app = create_service_app(service.runtime)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        response = await client.get("/health/live", headers={"X-Correlation-ID": "x" * 500})
    assert len(response.headers["x-correlation-id"]) == 36  # a fresh uuid


def test_log_lines_are_json_with_the_service_and_correlation_id(capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("orders", "INFO")
        with context.correlated("booking-7", "message-1"):
            logging.getLogger("booking.test").info("paid %s", "order-1")
        line = capsys.readouterr().out.strip().splitlines()[-1]
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    record = json.loads(line)
    assert record["message"] == "paid order-1"
    assert record["service"] == "orders"
    assert record["correlation_id"] == "booking-7"
    assert record["causation_id"] == "message-1"
    assert record["level"] == "INFO"
