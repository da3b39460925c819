"""The AsyncAPI 3.0 document of the system's messaging, generated, never written by hand.

- Every event, published on the topic exchange (AdminNotificationRaised on the admin alerts
  fanout too; OrderChanged on the order changes fanout only): generated from the registered
  event models.
- What each service receives: one `receive` operation per binding of its queue, generated from
  the runtime's topology (booking.runtime.broker: the exchanges and the consumer's queue, as its
  FastStream subscriber declares them) and from the consumer each service's composition root
  builds.
- The gateway's `/ws/admin` websocket (docs/websocket.md): its frames, both ways.

`make asyncapi` regenerates the committed document. A development tool: it builds every
service's app (in development mode, connecting to nothing), which no shipped package may do.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from faststream.rabbit import RabbitBroker
from faststream.specification import AsyncAPI
from pydantic import BaseModel, Field, create_model

import booking.contracts  # noqa: F401  (registers every event)
from booking.contracts.envelope import (
    ADMIN_ALERTS_EXCHANGE,
    ANY_PRODUCER,
    EXCHANGE,
    ORDER_CHANGES_EXCHANGE,
    Envelope,
    Event,
    registered_events,
)
from booking.contracts.http import Notification

TITLE = "Mentor booking events"
VERSION = "1.0.0"

# The services with a queue of their own (the gateway consumes only the fanouts).
CONSUMING_SERVICES = ("orders", "payments", "calendar", "notifications")

# The events fanned out live to every gateway replica: their exchange, the channel's prefix,
# what the gateway does with them, and whether they go out on the topic exchange too.
FANOUTS: dict[str, tuple[str, str, str, bool]] = {
    "AdminNotificationRaised": (
        ADMIN_ALERTS_EXCHANGE,
        "AdminAlerts",
        "Fanned out live to every gateway.",
        True,
    ),
    "OrderChanged": (
        ORDER_CHANGES_EXCHANGE,
        "OrderChanges",
        "Fanned out live to every gateway, which streams it to whoever watches the order "
        "(GET /api/orders/{id}/events); on this fanout only.",
        False,
    ),
}


def envelope_model(event: type[Event]) -> type[Envelope]:
    """The envelope of one event: its type, version and producer fixed, its payload typed."""
    name = _channel_name(event)
    # Types built at run time, which a type checker cannot follow.
    type_: Any = Literal[event.event_type()]
    version: Any = Literal[event.version]
    producer: Any = str if event.producer == ANY_PRODUCER else Literal[event.producer]
    return create_model(
        f"{name}Envelope",
        __base__=Envelope,
        __doc__=f"The envelope of a {event.event_type()} v{event.version} event.",
        type=(type_, ...),
        version=(version, ...),
        producer=(producer, ...),
        payload=(event, ...),
    )


def running_subscriptions() -> dict[str, list[type[Event]]]:
    """The events each service's queue takes, read from the consumer its composition root
    builds (`create_app`): what runs, not a list kept beside it. Nothing connects."""
    subscriptions = {}
    for service in CONSUMING_SERVICES:
        app = importlib.import_module(f"booking.{service}.app").create_app()
        consumer = app.state.runtime.consumer
        subscriptions[service] = sorted(consumer.handlers, key=lambda event: event.event_type())
    return subscriptions


def build_broker(subscriptions: Mapping[str, Sequence[type[Event]]] | None = None) -> RabbitBroker:
    """A never-connected broker whose publishers document every event, and whose subscribers
    document what each service receives, on the runtime's own topology."""
    from booking.runtime.broker import (
        ConsumerQueues,
        events_exchange_named,
        fanout_exchange_named,
    )

    broker = RabbitBroker()
    events_exchange = events_exchange_named(EXCHANGE)

    for event in registered_events():
        schema = envelope_model(event)
        description = _docstring(event)
        fanout = FANOUTS.get(event.event_type())
        if fanout is None or fanout[3]:
            broker.publisher(
                exchange=events_exchange,
                routing_key=event.binding_key(),
                persist=True,
                title=_channel_name(event),
                description=description,
                schema=schema,
            )
        if fanout is not None:
            exchange, prefix, live, _ = fanout
            broker.publisher(
                exchange=fanout_exchange_named(exchange),
                persist=True,
                title=f"{prefix}.{_channel_name(event)}",
                description=f"{description} {live}",
                schema=schema,
            )

    if subscriptions is None:
        subscriptions = running_subscriptions()
    for service, events in subscriptions.items():
        # Named as the runtime names it with its default settings (no queue prefix); the
        # retry budget does not show in the document.
        queues = ConsumerQueues.named(service, max_attempts=1, base_delay_ms=1)
        for event in events:
            subscriber = broker.subscriber(
                queues.main_queue(routing_key=event.binding_key()),
                events_exchange,
                title=f"{service}.{_channel_name(event)}",
                description=(
                    f"{service} receives {event.event_type()} v{event.version} on its queue, "
                    "acked once handled (manual acks, at least once, deduplicated by message_id)."
                ),
            )
            subscriber(_receiver(envelope_model(event)))
    return broker


def _receiver(schema: type[Envelope]) -> Any:
    """A handler that only documents: FastStream reads the message's schema off its signature."""

    async def receive(envelope: Any) -> None:
        raise NotImplementedError("documents the subscription; never runs")

    receive.__annotations__ = {"envelope": schema, "return": None}
    return receive


# --- the gateway's /ws/admin websocket (docs/websocket.md) ------------------------------------


class Hello(BaseModel):
    """First, always: the id of the newest notification (0 when there is none); null, with a
    detail, when the notifications service could not be asked."""

    type: Literal["hello"]
    last_id: int | None
    detail: str | None = None


class NotificationFrame(BaseModel):
    """A notification was stored, or counted up (the same id with more occurrences)."""

    type: Literal["notification"]
    data: Notification


class Resumed(BaseModel):
    """A replay is over: `replayed` notifications after `after_id` were sent; live again."""

    type: Literal["resumed"]
    after_id: int
    replayed: int


class Ping(BaseModel):
    """A heartbeat: answer it (any message will do)."""

    type: Literal["ping"]


class Pong(BaseModel):
    """The answer to a ping."""

    type: Literal["pong"]


class ErrorFrame(BaseModel):
    """Something the client should know; the connection stays open."""

    type: Literal["error"]
    code: Literal["bad_message", "resume_busy", "resume_failed", "feed_interrupted"]
    detail: str


class Resume(BaseModel):
    """Replay every notification with an id above `after_id`, oldest first, then go on live."""

    type: Literal["resume"]
    after_id: int = Field(ge=0)


WEBSOCKET_CHANNEL = "AdminWebSocket"
WEBSOCKET_SERVER = "gateway"
WEBSOCKET_SENT: tuple[type[BaseModel], ...] = (
    Hello,
    NotificationFrame,
    Resumed,
    Ping,
    Pong,
    ErrorFrame,
)
WEBSOCKET_RECEIVED: tuple[type[BaseModel], ...] = (Resume, Ping, Pong)


def add_admin_websocket(document: dict[str, Any]) -> None:
    """Describe `/ws/admin` in `document`: a server of its own (the gateway), one channel, the
    frames the gateway sends and those it receives (JSON text frames)."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    messages = components.setdefault("messages", {})
    frames = {*WEBSOCKET_SENT, *WEBSOCKET_RECEIVED}
    for frame in sorted(frames, key=lambda model: model.__name__):
        schema = frame.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in schema.pop("$defs", {}).items():
            schemas.setdefault(name, definition)
        schemas[f"ws.{frame.__name__}"] = schema
        messages[f"ws.{frame.__name__}"] = {
            "name": frame.__name__,
            "title": frame.__name__,
            "summary": " ".join((frame.__doc__ or "").split()),
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/ws.{frame.__name__}"},
        }
    document.setdefault("servers", {})[WEBSOCKET_SERVER] = {
        "host": "127.0.0.1:8000",
        "protocol": "ws",
        "description": (
            "The gateway's admin websocket (wss in a deployment); an admin's bearer token in "
            "the Authorization header or the access_token query parameter."
        ),
    }
    document["channels"][WEBSOCKET_CHANNEL] = {
        "address": "/ws/admin",
        "description": (
            "Every admin notification, pushed the moment it is stored or counted up; a resume "
            "replays what a client missed (docs/websocket.md)."
        ),
        "servers": [{"$ref": f"#/servers/{WEBSOCKET_SERVER}"}],
        "messages": {
            frame.__name__: {"$ref": f"#/components/messages/ws.{frame.__name__}"}
            for frame in sorted(frames, key=lambda model: model.__name__)
        },
    }
    channel = {"$ref": f"#/channels/{WEBSOCKET_CHANNEL}"}
    document["operations"][f"{WEBSOCKET_CHANNEL}.send"] = {
        "action": "send",
        "channel": channel,
        "summary": "The gateway pushes these frames to the admin.",
        "messages": [
            {"$ref": f"#/channels/{WEBSOCKET_CHANNEL}/messages/{frame.__name__}"}
            for frame in WEBSOCKET_SENT
        ],
    }
    document["operations"][f"{WEBSOCKET_CHANNEL}.receive"] = {
        "action": "receive",
        "channel": channel,
        "summary": "The gateway answers these frames from the admin.",
        "messages": [
            {"$ref": f"#/channels/{WEBSOCKET_CHANNEL}/messages/{frame.__name__}"}
            for frame in WEBSOCKET_RECEIVED
        ],
    }


def build_asyncapi(
    subscriptions: Mapping[str, Sequence[type[Event]]] | None = None,
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document as plain JSON-able data."""
    spec = AsyncAPI(
        build_broker(subscriptions), title=TITLE, version=VERSION, schema_version="3.0.0"
    )
    document: dict[str, Any] = spec.to_specification().to_jsonable()
    add_admin_websocket(document)
    return document


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
