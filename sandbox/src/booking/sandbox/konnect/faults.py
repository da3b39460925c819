"""Fault switches: the next N matching Konnect calls answer a 5xx, a 429 or hang.

Only the two real endpoints (init-payment, the payment read) take faults; "any" means either.
Other /api/v2 paths (a health probe's ping, say) never use one up, so a probe cannot steal the
fault a test set for the payments client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FaultKind = Literal["http_500", "http_503", "http_429", "timeout"]
FaultEndpoint = Literal["init", "get", "any"]
# What a call is, for matching: init-payment or a payment read.
CallKind = Literal["init", "get"]


@dataclass
class Fault:
    kind: FaultKind
    remaining: int
    endpoint: FaultEndpoint = "any"

    def matches(self, call: CallKind) -> bool:
        return self.endpoint == "any" or self.endpoint == call

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "count": self.remaining, "endpoint": self.endpoint}


@dataclass
class Faults:
    """Switches queue up in the order they were set; a call takes the first one it matches."""

    queue: list[Fault] = field(default_factory=list)

    def add(self, kind: FaultKind, count: int, endpoint: FaultEndpoint) -> None:
        self.queue.append(Fault(kind, count, endpoint))

    def take(self, call: CallKind) -> FaultKind | None:
        for fault in self.queue:
            if fault.matches(call):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self.queue.remove(fault)
                return fault.kind
        return None

    def clear(self) -> None:
        self.queue.clear()

    def as_json(self) -> list[dict[str, Any]]:
        return [fault.as_json() for fault in self.queue]
