"""The AsyncAPI 3.0 document of every event, generated from the registered event models.

`python -m booking.contracts.asyncapi > docs/asyncapi.json` regenerates the committed document.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange
from faststream.specification import AsyncAPI
from pydantic import create_model

import booking.contracts.events  # noqa: F401  (registers every event)
from booking.contracts.envelope import (
    ADMIN_ALERTS_EXCHANGE,
    ANY_PRODUCER,
    EXCHANGE,
    Envelope,
    Event,
    registered_events,
)

TITLE = "Mentor booking events"
VERSION = "1.0.0"


def envelope_model(event: type[Event]) -> type[Envelope]:
    """The envelope of one event: its type, version and producer fixed, its payload typed."""
    name = _channel_name(event)
    return create_model(
        f"{name}Envelope",
        __base__=Envelope,
        __doc__=f"The envelope of a {event.event_type()} v{event.version} event.",
        type=(Literal[event.event_type()], ...),
        version=(Literal[event.version], ...),
        producer=(str if event.producer == ANY_PRODUCER else Literal[event.producer], ...),
        payload=(event, ...),
    )


def build_broker() -> RabbitBroker:
    """A never-connected broker whose publishers document every event."""
    broker = RabbitBroker()
    events_exchange = RabbitExchange(EXCHANGE, type=ExchangeType.TOPIC, durable=True)
    alerts_exchange = RabbitExchange(ADMIN_ALERTS_EXCHANGE, type=ExchangeType.FANOUT, durable=True)

    for event in registered_events():
        schema = envelope_model(event)
        description = _docstring(event)
        broker.publisher(
            exchange=events_exchange,
            routing_key=event.binding_key(),
            persist=True,
            title=_channel_name(event),
            description=description,
            schema=schema,
        )
        if event.event_type() == "AdminNotificationRaised":
            broker.publisher(
                exchange=alerts_exchange,
                persist=True,
                title=f"AdminAlerts.{_channel_name(event)}",
                description=f"{description} Fanned out live to every gateway.",
                schema=schema,
            )
    return broker


def build_asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document as plain JSON-able data."""
    spec = AsyncAPI(build_broker(), title=TITLE, version=VERSION, schema_version="3.0.0")
    return spec.to_specification().to_jsonable()


def render(document: dict[str, Any]) -> str:
    """The committed form of the document: pretty-printed, sorted keys, trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _channel_name(event: type[Event]) -> str:
    # Version 1 keeps the plain name; later versions get their own channel and schema.
    if event.version == 1:
        return event.event_type()
    return f"{event.event_type()}V{event.version}"


def _docstring(event: type[Event]) -> str:
    return " ".join((event.__doc__ or "").split())


if __name__ == "__main__":
    print(render(build_asyncapi()), end="")
