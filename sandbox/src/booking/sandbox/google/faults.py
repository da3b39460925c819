"""Fault switches: the next N matching Google calls answer a 5xx, a 429, a 403 or stall.

Only the five real calls (token, event insert, event read, event delete, freeBusy) take faults;
"any" means any of them. Other paths (the consent page, the control API, an unknown path) never
use one up, so nothing but the client under test can steal the fault a test set for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FaultKind = Literal["http_500", "http_503", "http_429", "rate_limit_403", "quota_403", "slow"]
FaultEndpoint = Literal["token", "insert", "get", "delete", "freebusy", "any"]
# What a call is, for matching.
CallKind = Literal["token", "insert", "get", "delete", "freebusy"]


@dataclass
class Fault:
    kind: FaultKind
    remaining: int
    endpoint: FaultEndpoint = "any"
    # For "slow": how long the call stalls before it answers normally.
    seconds: float = 0.0

    def matches(self, call: CallKind) -> bool:
        return self.endpoint == "any" or self.endpoint == call

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": self.kind,
            "count": self.remaining,
            "endpoint": self.endpoint,
        }
        if self.kind == "slow":
            body["seconds"] = self.seconds
        return body


@dataclass
class Faults:
    """Switches queue up in the order they were set; a call takes the first one it matches."""

    queue: list[Fault] = field(default_factory=list)

    def add(self, kind: FaultKind, count: int, endpoint: FaultEndpoint, seconds: float) -> None:
        self.queue.append(Fault(kind, count, endpoint, seconds))

    def take(self, call: CallKind) -> Fault | None:
        for fault in self.queue:
            if fault.matches(call):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self.queue.remove(fault)
                return fault
        return None

    def clear(self) -> None:
        self.queue.clear()

    def as_json(self) -> list[dict[str, Any]]:
        return [fault.as_json() for fault in self.queue]
