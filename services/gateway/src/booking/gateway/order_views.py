"""The latest view of the orders read lately, kept from the order changes feed.

A client that reads an order again and again (a page polling it) is answered here, without a
request to orders, once the gateway knows the order's latest view and that this caller may
read it. The view is orders' own answer, kept byte for byte, and replaced by every OrderChanged
of a higher version (the feed the order streams listen to): what a read shows is as current as
what a stream shows.

What is known of whom may read: admins read every order; a mentee reads an order once orders
answered them 200 for it (an order's mentee never changes). Anyone else, and anything not
kept, goes on to orders, which decides (its 404 for another mentee's order included).

Never older than the feed: a view is answered only while the feed consumes, and forgotten
when it had no queue for a while (changes may have been missed). A read sent on to orders
leaves a placeholder first, so that a change arriving while orders answers is not lost to the
older answer; an answer that comes back across a gap is not kept.

This trusts that a version names one state of the order: orders grows it in the UPDATE that
changes what the view shows, and records OrderChanged with that view in the same transaction,
the order and its session both locked (so neither is read from before another's change).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import UUID

from fastapi import Request
from starlette.responses import Response

from booking.gateway.upstreams import Service, Unanswered, Upstreams, pass_back
from booking.runtime import metrics
from booking.runtime.auth import Identity, Role

JSON = "application/json"

KEPT_ORDERS = 10_000  # the most orders kept; the least recently read go first

READS = metrics.ORDER_READS
ANSWERED_HERE, SENT_ON = READS.labels("gateway"), READS.labels("orders")


@dataclass(slots=True)
class _View:
    version: int = 0  # 0: a placeholder, nothing known yet
    body: bytes | None = None
    readers: set[str] = field(default_factory=set)  # mentees orders answered 200


@dataclass(frozen=True, slots=True)
class Ticket:
    """A read sent on to orders: which order, and the feed's epoch when it was sent."""

    order_id: str
    epoch: int


class OrderViews:
    """`current` says whether the feed consumes now (no view is answered nor kept otherwise);
    `forget_all` belongs to the feed's gaps."""

    def __init__(self, current: Callable[[], bool], size: int = KEPT_ORDERS) -> None:
        self.current = current
        self.size = size
        self.epoch = 0  # grows with every gap in the feed
        self._views: OrderedDict[str, _View] = OrderedDict()

    def __len__(self) -> int:
        return len(self._views)

    def answer(self, order_id: UUID, reader: Identity) -> bytes | None:
        """The order's view for `reader`, or None: ask orders."""
        key = str(order_id)
        view = self._views.get(key)
        if (
            view is None
            or not self.current()
            or view.body is None
            or not (reader.role is Role.ADMIN or reader.sub in view.readers)
        ):
            SENT_ON.inc()
            return None
        self._views.move_to_end(key)
        ANSWERED_HERE.inc()
        return view.body

    def expect(self, order_id: UUID) -> Ticket:
        """A read of `order_id` goes on to orders: changes of it are kept from now on."""
        key = str(order_id)
        if key in self._views:
            self._views.move_to_end(key)
        else:
            self._views[key] = _View()
            self._trim()
        return Ticket(key, self.epoch)

    def answered(self, ticket: Ticket, reader: Identity, body: bytes, version: int) -> None:
        """Orders answered `reader` 200 with `body` (the order at `version`)."""
        view = self._views.get(ticket.order_id)
        if view is None or ticket.epoch != self.epoch or not self.current():
            return  # let go meanwhile, or the feed had a gap: nothing known to be current
        if reader.role is Role.MENTEE:
            view.readers.add(reader.sub)
        if version > view.version:  # else the feed brought a newer one meanwhile
            view.version, view.body = version, body

    def not_answered(self, ticket: Ticket) -> None:
        """Orders answered anything but 200: the placeholder goes, unless something is known."""
        view = self._views.get(ticket.order_id)
        if view is not None and view.body is None and not view.readers:
            del self._views[ticket.order_id]

    def watches(self, order_id: str) -> bool:
        return order_id in self._views

    def changed(self, order_id: str, version: int, body: bytes) -> None:
        """The feed brought the order's view at `version` (kept only for orders read lately)."""
        view = self._views.get(order_id)
        if view is not None and version > view.version:
            view.version, view.body = version, body

    def forget(self, order_id: UUID) -> None:
        """The order was just changed through this replica: read it from orders next."""
        self._views.pop(str(order_id), None)

    def forget_all(self) -> None:
        """The feed had a gap: whatever is kept may be old."""
        self.epoch += 1
        self._views.clear()

    def _trim(self) -> None:
        while len(self._views) > self.size:
            self._views.popitem(last=False)


async def read_order(
    views: OrderViews, up: Upstreams, request: Request, order_id: UUID, reader: Identity
) -> Response:
    """GET /api/orders/{order_id}: from the views when they have it for `reader`, else as
    orders answers (and its view kept)."""
    kept = views.answer(order_id, reader)
    if kept is not None:
        return Response(kept, media_type=JSON)
    ticket = views.expect(order_id)
    try:
        answer = await up.send(request, Service.ORDERS)
    except Unanswered as failed:
        views.not_answered(ticket)
        return failed.problem
    version = _version(answer.content) if answer.status_code == 200 else None
    if version is None:
        views.not_answered(ticket)
    else:
        views.answered(ticket, reader, answer.content, version)
    return pass_back(answer, Service.ORDERS)


def _version(body: bytes) -> int | None:
    try:
        version = json.loads(body)["version"]
    except (ValueError, TypeError, KeyError):
        return None
    return version if isinstance(version, int) else None
