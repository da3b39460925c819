"""The generated AsyncAPI document covers every event, what each service receives and the admin
websocket, and the committed copy is current."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from booking.contracts import (
    ADMIN_ALERTS_EXCHANGE,
    ANY_PRODUCER,
    EXCHANGE,
    ORDER_CHANGES_EXCHANGE,
    AdminNotificationRaised,
    Event,
    OrderChanged,
    registered_events,
)
from booking.devtools.asyncapi import (
    WEBSOCKET_CHANNEL,
    WEBSOCKET_RECEIVED,
    WEBSOCKET_SENT,
    build_asyncapi,
    render,
    running_subscriptions,
)

COMMITTED = Path(__file__).resolve().parents[3] / "docs" / "asyncapi.json"
ENVELOPE_FIELDS = {
    "message_id",
    "type",
    "version",
    "occurred_at",
    "correlation_id",
    "causation_id",
    "producer",
    "payload",
    "traceparent",
    "tracestate",
}
# Set only while tracing is on (docs/operations.md, Traces).
OPTIONAL_ENVELOPE_FIELDS = {"causation_id", "traceparent", "tracestate"}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return build_asyncapi()


def resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow local `$ref`s (JSON pointers into the document) until a real node."""
    while "$ref" in node:
        pointer = node["$ref"].removeprefix("#/")
        node = document
        for part in pointer.split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def message_payload(document: dict[str, Any], channel: dict[str, Any]) -> dict[str, Any]:
    (message,) = channel["messages"].values()
    return resolve(document, resolve(document, message)["payload"])


def test_header(document: dict[str, Any]):
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["title"] == "Mentor booking events"
    assert document["info"]["version"] == "1.0.0"


def published(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: operation
        for name, operation in document["operations"].items()
        if operation["action"] == "send" and "amqp" in operation.get("bindings", {})
    }


def received(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: operation
        for name, operation in document["operations"].items()
        if operation["action"] == "receive" and "amqp" in operation.get("bindings", {})
    }


def test_one_channel_per_event_plus_the_admin_alerts(document: dict[str, Any]):
    # OrderChanged goes out on the order changes fanout alone, never on the topic exchange.
    names = {event.event_type() for event in registered_events()} - {"OrderChanged"}
    assert set(published(document)) == names | {
        "AdminAlerts.AdminNotificationRaised",
        "OrderChanges.OrderChanged",
    }
    for operation in published(document).values():
        assert operation["bindings"]["amqp"]["deliveryMode"] == 2  # persistent


def test_one_receiving_channel_per_event_each_service_subscribes_to(document: dict[str, Any]):
    subscriptions = running_subscriptions()
    assert set(received(document)) == {
        f"{service}.{event.event_type()}"
        for service, events in subscriptions.items()
        for event in events
    }
    for service, events in subscriptions.items():
        for event in events:
            channel = document["channels"][f"{service}.{event.event_type()}"]
            # The service's queue, bound with the event's key on the topic exchange.
            assert channel["address"] == event.binding_key()
            assert channel["bindings"]["amqp"]["queue"]["name"] == service
            assert channel["bindings"]["amqp"]["queue"]["durable"] is True
            envelope = message_payload(document, channel)
            assert envelope["properties"]["type"]["const"] == event.event_type()


def test_every_event_published_on_the_topic_exchange_has_a_receiver(document: dict[str, Any]):
    # Publishing is mandatory: an event no queue takes would wait in its outbox for ever. The
    # notifications and the order changes go out on fanouts instead, to every gateway replica.
    taken = {event for events in running_subscriptions().values() for event in events}
    untaken = [e for e in registered_events() if e not in taken]
    assert untaken == [AdminNotificationRaised, OrderChanged]


def test_the_admin_websocket_is_described_both_ways(document: dict[str, Any]):
    channel = document["channels"][WEBSOCKET_CHANNEL]
    assert channel["address"] == "/ws/admin"
    (server,) = channel["servers"]
    assert resolve(document, server)["protocol"] == "ws"
    sends = document["operations"][f"{WEBSOCKET_CHANNEL}.send"]
    receives = document["operations"][f"{WEBSOCKET_CHANNEL}.receive"]
    assert (sends["action"], receives["action"]) == ("send", "receive")

    def frame_types(operation: dict[str, Any]) -> set[str]:
        payloads = (
            resolve(document, resolve(document, resolve(document, m))["payload"])
            for m in operation["messages"]
        )
        return {payload["properties"]["type"]["const"] for payload in payloads}

    assert frame_types(sends) == {"hello", "notification", "resumed", "ping", "pong", "error"}
    assert frame_types(receives) == {"resume", "ping", "pong"}
    assert len(WEBSOCKET_SENT) == 6 and len(WEBSOCKET_RECEIVED) == 3
    notification = resolve(
        document, document["components"]["schemas"]["ws.NotificationFrame"]["properties"]["data"]
    )
    assert {"id", "type", "severity", "occurrences"} <= set(notification["properties"])


# OrderChanged is on its fanout alone (test_order_changes_are_on_their_fanout_exchange_only).
ON_THE_TOPIC_EXCHANGE = [event for event in registered_events() if event is not OrderChanged]


def channel_of(event: type[Event]) -> str:
    return "OrderChanges.OrderChanged" if event is OrderChanged else event.event_type()


@pytest.mark.parametrize("event", ON_THE_TOPIC_EXCHANGE, ids=lambda e: e.event_type())
def test_event_channel_is_its_routing_key_on_the_topic_exchange(
    document: dict[str, Any], event: type[Event]
):
    channel = document["channels"][event.event_type()]
    assert channel["address"] == event.routing_key()
    assert event.__doc__ is not None
    assert channel["description"] == " ".join(event.__doc__.split())
    exchange = channel["bindings"]["amqp"]["exchange"]
    assert exchange == exchange | {"name": EXCHANGE, "type": "topic", "durable": True}


@pytest.mark.parametrize("event", registered_events(), ids=lambda e: e.event_type())
def test_event_message_is_the_envelope_around_the_payload(
    document: dict[str, Any], event: type[Event]
):
    envelope = message_payload(document, document["channels"][channel_of(event)])
    assert set(envelope["properties"]) == ENVELOPE_FIELDS
    assert set(envelope["required"]) == ENVELOPE_FIELDS - OPTIONAL_ENVELOPE_FIELDS
    assert envelope["properties"]["type"]["const"] == event.event_type()
    assert envelope["properties"]["version"]["const"] == event.version
    producer = envelope["properties"]["producer"]
    if event.producer == ANY_PRODUCER:
        assert producer["type"] == "string"  # whichever service sent it
    else:
        assert producer["const"] == event.producer

    payload = resolve(document, envelope["properties"]["payload"])
    assert set(payload["properties"]) == set(event.model_fields)
    assert payload["additionalProperties"] is False


def test_money_is_documented_as_integers(document: dict[str, Any]):
    envelope = message_payload(document, document["channels"]["PaymentCompleted"])
    payment = resolve(document, envelope["properties"]["payload"])
    for field in ("amount", "amount_paid", "platform_fee", "escrow_amount"):
        assert payment["properties"][field]["type"] == "integer"
        assert payment["properties"][field]["minimum"] == 0
    assert payment["properties"]["currency"]["pattern"] == "^[A-Z]{3}$"


def test_admin_notifications_are_also_on_the_fanout_exchange(document: dict[str, Any]):
    channel = document["channels"]["AdminAlerts.AdminNotificationRaised"]
    exchange = channel["bindings"]["amqp"]["exchange"]
    assert exchange["name"] == ADMIN_ALERTS_EXCHANGE
    assert exchange["type"] == "fanout"
    envelope = message_payload(document, channel)
    payload = resolve(document, envelope["properties"]["payload"])
    assert set(payload["properties"]) == set(AdminNotificationRaised.model_fields)


def test_order_changes_are_on_their_fanout_exchange_only(document: dict[str, Any]):
    assert "OrderChanged" not in document["channels"]  # never on the topic exchange
    channel = document["channels"]["OrderChanges.OrderChanged"]
    exchange = channel["bindings"]["amqp"]["exchange"]
    assert (exchange["name"], exchange["type"]) == (ORDER_CHANGES_EXCHANGE, "fanout")
    envelope = message_payload(document, channel)
    payload = resolve(document, envelope["properties"]["payload"])
    order = resolve(document, payload["properties"]["order"])
    assert {"id", "status", "session", "version"} <= set(order["properties"])


def test_committed_document_is_current(document: dict[str, Any]):
    hint = "regenerate it: make asyncapi"
    assert COMMITTED.is_file(), f"{COMMITTED} is missing; {hint}"
    committed = COMMITTED.read_text(encoding="utf-8")
    assert json.loads(committed) == document, f"{COMMITTED} is stale; {hint}"
    assert committed == render(document), f"{COMMITTED} is not formatted as generated; {hint}"
