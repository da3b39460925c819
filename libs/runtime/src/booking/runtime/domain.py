"""The vocabulary every service's pure domain shares: its errors, the rules of money, the ids of
the events it reports, and the sample kept of a long run of refs.

No I/O and no framework here, so a service's `domain.py` may import it and stay pure.
"""

from __future__ import annotations

import re
import uuid
from enum import StrEnum
from typing import Any

_CURRENCY = re.compile(r"^[A-Z]{3}$")


class EventIds:
    """Message ids derived from the fact an event reports (uuid5 under a service's namespace), so
    that recording one fact twice stores it once: `event_ids("OrderCancelled", order_id)`."""

    def __init__(self, namespace: uuid.UUID) -> None:
        self.namespace = namespace

    def __call__(self, *parts: object) -> uuid.UUID:
        return uuid.uuid5(self.namespace, ":".join(str(part) for part in parts))


class DomainError(Exception):
    """Base of every rule a domain refuses."""


class IllegalTransition(DomainError):
    """A move the status machine does not allow; the entity is left as it was."""

    def __init__(self, entity: str, entity_id: Any, from_state: StrEnum, to_state: StrEnum) -> None:
        self.entity = entity
        self.entity_id = entity_id
        self.from_state = from_state
        self.to_state = to_state
        super().__init__(
            f"{entity} {entity_id} cannot go from {from_state.value} to {to_state.value}"
        )


class InvalidMoney(DomainError, ValueError):
    """An amount that is not a non-negative integer of minor units, or a bad currency code."""


def minor_units(value: object, what: str) -> int:
    """`value` if it is a whole, non-negative number of minor units (millimes for TND)."""
    # bool is an int subclass; True is not one millime.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidMoney(f"{what} must be an integer in minor units, got {value!r}")
    if value < 0:
        raise InvalidMoney(f"{what} must not be negative, got {value}")
    return value


def currency_code(value: object) -> str:
    """`value` if it is an ISO 4217 code: three upper-case letters."""
    if not isinstance(value, str) or not _CURRENCY.fullmatch(value):
        raise InvalidMoney(f"currency must be three upper-case letters (ISO 4217), got {value!r}")
    return value


def keep_ends(first: list[str], last: list[str], item: str, size: int) -> None:
    """Keep `item` in a bounded sample of a long run (webhooks' refs, say): the first `size`
    distinct items stay in `first`; after them the latest `size` are in `last`, an item seen
    again moving to its end. Changes the lists in place; memory stays bounded by `size`."""
    if item in first:
        return
    if len(first) < size:
        first.append(item)
        return
    if item in last:
        last.remove(item)
    last.append(item)
    del last[:-size]
