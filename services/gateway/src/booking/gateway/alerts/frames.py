"""What travels on `/ws/admin`: the frames the server sends, the messages a client may send, and
the rule that tells a notification worth sending from one the client already has. Pure: no I/O.

A notification is identified by `(id, occurrences)`: a counted-up notification comes again with
the same id and more occurrences, and is news; the same pair again (a redelivery) or a lower
count arriving late (the outbox relay publishes concurrently) is not.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from booking.contracts import AdminNotificationRaised

MAX_CLIENT_MESSAGE_CHARS = 4096
"""A client only ever sends a few small control messages."""


def _dumps(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Alert:
    """One notification as it goes out, its frame serialised once for every admin."""

    id: int
    occurrences: int
    frame: str
    seq: int = 0  # the feed's arrival order on this replica; 0 for replayed ones

    @classmethod
    def of(cls, notification: AdminNotificationRaised, seq: int = 0) -> Alert:
        data = notification.model_dump(mode="json")
        return cls(
            id=notification.id,
            occurrences=notification.occurrences,
            frame=_dumps({"type": "notification", "data": data}),
            seq=seq,
        )

    @classmethod
    def from_item(cls, item: Any) -> Alert:
        """A notification as the notifications service lists it: the event's fields (anything
        more is left out), so a replayed notification reads exactly as a live one. ValueError if
        it is not one."""
        if isinstance(item, dict):
            item = {k: v for k, v in item.items() if k in AdminNotificationRaised.model_fields}
        try:
            return cls.of(AdminNotificationRaised.model_validate(item))
        except ValidationError as exc:
            raise ValueError(f"not a notification: {exc.errors()[0]['msg']}") from None

    @property
    def key(self) -> tuple[int, int]:
        return (self.id, self.occurrences)


class Sent:
    """The newest occurrences count known per notification id, for at most `limit` ids.

    Ids are kept in the order they were last seen, so when the limit is reached the ids seen
    longest ago are forgotten first: repeats of those are rare, and a forgotten one is at worst
    sent twice, never lost.
    """

    __slots__ = ("_counts", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: OrderedDict[int, int] = OrderedDict()

    def is_news(self, alert: Alert) -> bool:
        return alert.occurrences > self._counts.get(alert.id, 0)

    def record(self, alert: Alert) -> None:
        if alert.occurrences > self._counts.get(alert.id, 0):
            self._counts[alert.id] = alert.occurrences
        self._counts.move_to_end(alert.id)
        if len(self._counts) > self.limit:
            self._counts.popitem(last=False)

    def take(self, alert: Alert) -> bool:
        """Record `alert` and say whether it was news."""
        news = self.is_news(alert)
        self.record(alert)
        return news

    def extend(self, other: Sent) -> None:
        """Record what `other` knows, in its order (its newest stay newest)."""
        for id_, occurrences in other._counts.items():
            if occurrences > self._counts.get(id_, 0):
                self._counts[id_] = occurrences
            self._counts.move_to_end(id_)
        self.trim(self.limit)

    def trim(self, limit: int) -> None:
        self.limit = limit
        while len(self._counts) > limit:
            self._counts.popitem(last=False)

    def __len__(self) -> int:
        return len(self._counts)


# --- server frames ----------------------------------------------------------------------------


def hello(last_id: int | None) -> str:
    body: dict[str, Any] = {"type": "hello", "last_id": last_id}
    if last_id is None:
        body["detail"] = (
            "the notifications service could not be asked for the newest notification; "
            "live notifications still arrive"
        )
    return _dumps(body)


def error(code: str, detail: str) -> str:
    return _dumps({"type": "error", "code": code, "detail": detail})


def resumed(after_id: int, replayed: int) -> str:
    """Sent once a replay is over and the feed continues live: what came, for the client's log."""
    return _dumps({"type": "resumed", "after_id": after_id, "replayed": replayed})


PING = _dumps({"type": "ping"})
PONG = _dumps({"type": "pong"})


# --- client messages --------------------------------------------------------------------------


@dataclass(frozen=True)
class Resume:
    after_id: int


@dataclass(frozen=True)
class Pong:
    pass


@dataclass(frozen=True)
class Ping:
    pass


ClientMessage = Resume | Pong | Ping


class BadMessage(ValueError):
    """A client message the server cannot act on; answered with an error frame."""


def parse_client_message(text: str) -> ClientMessage:
    if len(text) > MAX_CLIENT_MESSAGE_CHARS:
        raise BadMessage(f"messages are at most {MAX_CLIENT_MESSAGE_CHARS} characters")
    try:
        body = json.loads(text)
    except ValueError:
        raise BadMessage('a message is a JSON object, e.g. {"type": "pong"}') from None
    if not isinstance(body, dict):
        raise BadMessage('a message is a JSON object, e.g. {"type": "pong"}')
    kind = body.get("type")
    if kind == "pong":
        return Pong()
    if kind == "ping":
        return Ping()
    if kind == "resume":
        after_id = body.get("after_id")
        # bool is an int in Python; `true` is no id.
        if not isinstance(after_id, int) or isinstance(after_id, bool) or after_id < 0:
            raise BadMessage("resume needs after_id: the last notification id received (>= 0)")
        unknown = set(body) - {"type", "after_id"}
        if unknown:
            raise BadMessage(f"resume takes only after_id, not {', '.join(sorted(unknown))}")
        return Resume(after_id)
    raise BadMessage(
        f"unknown message type {kind!r}; a client sends resume, pong or ping"
        if kind is not None
        else "a message needs a type: resume, pong or ping"
    )
