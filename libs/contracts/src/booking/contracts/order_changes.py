"""OrderChanged: the order as `GET /api/orders/{id}` shows it, sent on every change.

Its own module: the payload holds the HTTP contract's order view (`booking.contracts.http.Order`),
which the events module cannot import (the HTTP contract imports it). The view sits under
`order` rather than being the payload itself: its `version` (the order's) would clash with the
event's own (the envelope's schema version). It goes out on the order changes fanout, not on the
events exchange: the gateways' streams are its only readers.
"""

from __future__ import annotations

from booking.contracts.envelope import Event, register
from booking.contracts.http import Order


@register
class OrderChanged(Event):
    """An order, its payment, session or escrow changed: the whole view, at its new version."""

    producer = "orders"

    order: Order
