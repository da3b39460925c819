"""Parsing and decoding envelopes: unknown events and malformed bodies are told apart."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4

import pytest

from booking.contracts import (
    Envelope,
    Event,
    MalformedMessage,
    MentorRegistered,
    PaymentCompleted,
    SystemErrorReported,
    UnknownEvent,
    decode,
    event_class,
    parse_envelope,
    register,
    wrap,
)

MESSAGE_ID = UUID("3f2504e0-4f89-41d3-9a0c-0305e82c3301")


def payment_completed() -> PaymentCompleted:
    return PaymentCompleted(
        order_id=uuid4(),
        payment_ref="pay_123",
        amount=45_000,
        amount_paid=45_000,
        platform_fee=4_500,
        escrow_amount=40_500,
        currency="TND",
        paid_at=datetime(2025, 3, 1, 10, 0, tzinfo=UTC),
    )


def envelope_dict(**changes: Any) -> dict[str, Any]:
    """A valid PaymentCompleted envelope as JSON data, with top-level keys replaced."""
    data = wrap(payment_completed(), message_id=MESSAGE_ID, correlation_id="c-1").model_dump(
        mode="json"
    )
    data.update(changes)
    return data


def with_payload(**changes: Any) -> bytes:
    data = envelope_dict()
    data["payload"].update(changes)
    return json.dumps(data).encode()


def parse_and_decode(body: bytes | str) -> Event:
    return decode(parse_envelope(body))


def test_wrap_fills_the_envelope_from_the_event():
    event = payment_completed()
    envelope = wrap(event, message_id=MESSAGE_ID, correlation_id="c-1", causation_id="m-0")
    assert envelope.type == "PaymentCompleted"
    assert envelope.version == 1
    assert envelope.producer == "payments"
    assert envelope.routing_key == PaymentCompleted.routing_key()
    assert envelope.causation_id == "m-0"
    assert envelope.occurred_at.utcoffset() == timedelta(0)
    assert envelope.payload["amount"] == 45_000


def test_occurred_at_is_normalised_to_utc():
    local = datetime(2025, 3, 1, 12, 0, tzinfo=timezone(timedelta(hours=1)))
    envelope = wrap(
        payment_completed(), message_id=MESSAGE_ID, correlation_id="c", occurred_at=local
    )
    assert envelope.occurred_at.utcoffset() == timedelta(0)
    assert envelope.occurred_at == local
    assert envelope.model_dump(mode="json")["occurred_at"] == "2025-03-01T11:00:00Z"


def test_a_valid_body_decodes():
    event = payment_completed()
    body = wrap(event, message_id=MESSAGE_ID, correlation_id="c-1").model_dump_json()
    assert parse_and_decode(body) == event
    assert parse_and_decode(body.encode()) == event


def test_unknown_version_names_the_type_and_version():
    envelope = parse_envelope(json.dumps(envelope_dict(version=99)))
    with pytest.raises(UnknownEvent, match=r"PaymentCompleted v99") as caught:
        decode(envelope)
    assert "known versions: [1]" in str(caught.value)


def test_unknown_type_names_the_type():
    envelope = parse_envelope(json.dumps(envelope_dict(type="PaymentRefunded")))
    with pytest.raises(UnknownEvent, match=r"PaymentRefunded v1 \(no such event type\)"):
        decode(envelope)
    with pytest.raises(UnknownEvent):
        event_class("PaymentRefunded", 1)


def test_unknown_event_is_not_a_malformed_message():
    assert not issubclass(UnknownEvent, MalformedMessage)
    assert not issubclass(MalformedMessage, UnknownEvent)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b"\xff\xfe",
        b"[]",
        b"null",
        b'{"type": "PaymentCompleted"',
    ],
    ids=["text", "empty", "binary", "array", "null", "truncated"],
)
def test_a_body_that_is_not_a_json_object_is_malformed(body: bytes):
    with pytest.raises(MalformedMessage):
        parse_envelope(body)


@pytest.mark.parametrize(
    "field",
    ["message_id", "type", "version", "occurred_at", "correlation_id", "producer", "payload"],
)
def test_a_missing_envelope_field_is_malformed(field: str):
    data = envelope_dict()
    del data[field]
    with pytest.raises(MalformedMessage, match=field):
        parse_envelope(json.dumps(data))


@pytest.mark.parametrize(
    "changes",
    [
        {"message_id": "not-a-uuid"},
        {"occurred_at": "2025-03-01T10:00:00"},
        {"version": 0},
        {"correlation_id": ""},
        {"payload": [1, 2]},
        {"unexpected": True},
    ],
    ids=["bad-message-id", "naive-occurred-at", "version-0", "empty-correlation", "list", "extra"],
)
def test_an_invalid_envelope_field_is_malformed(changes: dict[str, Any]):
    with pytest.raises(MalformedMessage):
        parse_envelope(json.dumps(envelope_dict(**changes)))


@pytest.mark.parametrize(
    "changes",
    [
        {"paid_at": "2025-03-01T10:00:00"},
        {"amount": 1.5},
        {"amount": 45000.0},
        {"amount": "45000"},
        {"platform_fee": True},
        {"escrow_amount": -1},
        {"currency": "tnd"},
        {"currency": "DINAR"},
        {"order_id": "42"},
        {"refund_id": "r-1"},
    ],
    ids=[
        "naive-datetime",
        "float-amount",
        "integral-float-amount",
        "string-amount",
        "bool-amount",
        "negative-amount",
        "lowercase-currency",
        "long-currency",
        "bad-uuid",
        "extra-field",
    ],
)
def test_an_invalid_payload_is_malformed(changes: dict[str, Any]):
    body = with_payload(**changes)
    envelope = parse_envelope(body)  # the envelope itself is fine
    with pytest.raises(MalformedMessage, match=r"PaymentCompleted v1 payload invalid"):
        decode(envelope)


def test_a_missing_payload_field_is_malformed():
    data = envelope_dict()
    del data["payload"]["payment_ref"]
    with pytest.raises(MalformedMessage, match="payment_ref"):
        parse_and_decode(json.dumps(data))


def test_an_event_without_a_producer_cannot_be_registered():
    class Nameless(Event):
        """Has no producer."""

    with pytest.raises(TypeError, match="producer"):
        register(Nameless)


def test_registering_the_same_event_twice_fails():
    with pytest.raises(RuntimeError, match="registered twice"):
        register(PaymentCompleted)


def test_envelope_is_frozen():
    envelope = Envelope.model_validate(envelope_dict())
    with pytest.raises(ValueError):
        envelope.type = "Other"  # type: ignore[misc]


@pytest.mark.parametrize("email", ["not-an-email", "a@b", "two@@example.com", "sp ace@example.com"])
def test_an_email_that_is_not_shaped_like_one_is_malformed(email: str):
    event = MentorRegistered(
        mentor_id=uuid4(), name="A", email="a@example.com", timezone="Africa/Tunis"
    )
    envelope = wrap(event, message_id=uuid4(), correlation_id="c")
    bad = envelope.model_copy(update={"payload": {**envelope.payload, "email": email}})
    with pytest.raises(MalformedMessage, match="email"):
        decode(bad)


def test_an_event_from_any_service_names_its_sender():
    report = SystemErrorReported(
        service="orders",
        consumer="orders",
        message_type=None,
        error="boom",
        dead_lettered_message_id=None,
        attempts=1,
    )
    with pytest.raises(ValueError, match="name the producer"):
        wrap(report, message_id=uuid4(), correlation_id="c")
    envelope = wrap(report, message_id=uuid4(), correlation_id="c", producer="orders")
    assert envelope.producer == "orders"
    assert envelope.routing_key == "orders.system_error_reported"
    assert decode(parse_envelope(envelope.model_dump_json())) == report


def test_an_event_cannot_claim_another_producer():
    with pytest.raises(ValueError, match="produced by payments"):
        wrap(payment_completed(), message_id=uuid4(), correlation_id="c", producer="orders")


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_the_trace_an_event_was_recorded_in_goes_with_it():
    event = payment_completed()
    envelope = wrap(
        event,
        message_id=MESSAGE_ID,
        correlation_id="c-1",
        traceparent=TRACEPARENT,
        tracestate="vendor=opaque",
    )

    read = parse_envelope(envelope.model_dump_json())

    assert (read.traceparent, read.tracestate) == (TRACEPARENT, "vendor=opaque")
    assert read == envelope
    assert decode(read) == event


def test_an_event_recorded_outside_any_trace_carries_no_trace_field():
    # A consumer that predates the fields refuses any field it does not know: while tracing
    # is off, the body is what it was before them.
    envelope = wrap(payment_completed(), message_id=MESSAGE_ID, correlation_id="c-1")

    written = json.loads(envelope.model_dump_json())

    assert "traceparent" not in written and "tracestate" not in written
    assert written["causation_id"] is None  # the other optional field stays as it was
    assert parse_envelope(envelope.model_dump_json()).traceparent is None


@pytest.mark.parametrize(
    "changes",
    [
        {"traceparent": "not-a-traceparent"},
        {"traceparent": TRACEPARENT.upper()},
        {"traceparent": TRACEPARENT + "-extra"},
        {"traceparent": TRACEPARENT, "tracestate": "k=" + "v" * 600},
    ],
    ids=["garbage", "uppercase", "extra-field", "tracestate-too-long"],
)
def test_a_malformed_trace_field_is_malformed(changes: dict[str, Any]):
    with pytest.raises(MalformedMessage, match="trace"):
        parse_envelope(json.dumps(envelope_dict(**changes)))
