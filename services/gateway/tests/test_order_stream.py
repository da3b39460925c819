"""GET /api/orders/{order_id}/events: an order's changes as Server-Sent Events.

The gateway served over real HTTP in front of a stand-in orders service (conftest), on the real
RabbitMQ: the test publishes OrderChanged to the test's own order changes fanout, as the orders
service's relay does. What orders is asked is what the stand-in recorded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi.responses import JSONResponse
from prometheus_client import REGISTRY

from booking.contracts import OrderChanged, http
from booking.devtools.fixtures import eventually, publish_event
from booking.gateway.order_stream import Change, OrderStream, OrderStreams, Signal
from booking.gateway.upstreams import Service
from booking.runtime.auth import Role, issue_order_token
from booking.runtime.problems import problem as problem_answer

from .conftest import NOW, SESSION_ID, System

EVENT_TIMEOUT = 15.0  # seconds to wait for an event that must come (a bound, not a measure)


def view(order_id: str, version: int, status: str = "pending", **changes: Any) -> dict[str, Any]:
    """An order as GET /api/orders/{id} shows it, at `version`."""
    money = {"amount": 120000, "currency": "TND"}
    return {
        "id": order_id,
        "status": status,
        "amount": money,
        "amount_paid": money if status in ("paid", "confirmed") else {**money, "amount": 0},
        "payment": None,
        "session": {
            "id": SESSION_ID,
            "status": "scheduled" if status == "confirmed" else "pending_payment",
            "start_at": NOW,
            "end_at": "2030-05-01T10:00:00Z",
            "meet_link": None,
            "calendar_event_id": None,
        },
        "escrow": None,
        "version": version,
        **changes,
    }


def one_line(order: dict[str, Any]) -> str:
    """The order's JSON as GET's body has it (compact, one line)."""
    return http.Order.model_validate(order).model_dump_json()


class Orders:
    """The stand-in orders service's side: what it answers for the order, what it was asked."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.upstream = system.upstreams[Service.ORDERS]
        self.current: dict[str, dict[str, Any]] = {}
        self.upstream.answer = self._answer

    def _answer(self, recorded: Any) -> JSONResponse:
        order_id = recorded.path.rsplit("/", 1)[-1]
        if order_id not in self.current:
            return problem_answer(404, f"there is no order {order_id}")
        return JSONResponse(self.current[order_id])

    def reads(self, order_id: str) -> list[Any]:
        return [r for r in self.upstream.requests if r.path == f"/api/orders/{order_id}"]

    async def change(self, order: dict[str, Any]) -> None:
        """The order changed: orders shows it, and its relay publishes OrderChanged."""
        self.current[order["id"]] = order
        await publish_event(
            self.system.app,
            self.system.settings.order_changes_exchange,
            OrderChanged(order=http.Order.model_validate(order)),
        )


@pytest.fixture
async def world(start_system) -> AsyncIterator[tuple[System, Orders]]:
    async with start_system(
        health_monitor_interval_seconds=3600, order_stream_keepalive_seconds=0.3
    ) as system:
        streams: OrderStreams = system.app.state.order_streams
        await eventually(lambda: streams.feed.consuming, what="the order change queue consumed")
        yield system, Orders(system)


class Events:
    """One client's stream: its events as they arrive, parsed."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()
        self.comments = 0

    async def next(self) -> dict[str, str] | None:
        """The next event's fields (None once the stream closed); comments are counted."""
        fields: dict[str, str] = {}
        async with asyncio.timeout(EVENT_TIMEOUT):
            async for line in self.lines:
                if line == "":
                    if fields:
                        return fields
                    continue
                if line.startswith(":"):
                    self.comments += 1
                    continue
                name, _, value = line.partition(": ")
                fields[name] = value
        return None

    async def orders(self, count: int) -> list[tuple[int, dict[str, Any]]]:
        found: list[tuple[int, dict[str, Any]]] = []
        for _ in range(count):
            event = await self.next()
            assert event is not None, f"the stream closed after {found}"
            assert event["event"] == "order"
            found.append((int(event["id"]), json.loads(event["data"])))
        return found


@contextlib.asynccontextmanager
async def stream(
    system: System, order_id: str, *, token: str | None = None, **request: Any
) -> AsyncIterator[Events]:
    headers = request.pop("headers", {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with system.client.stream(
        "GET", f"/api/orders/{order_id}/events", headers=headers, **request
    ) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        yield Events(response)


def problem(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    return answer.json()


def link(system: System, order_id: str, ttl: int = 600) -> str:
    return issue_order_token(system.settings.order_link_key, uuid.UUID(order_id), ttl)


class TestFollowingAnOrder:
    async def test_the_current_state_then_each_change_until_the_order_ends(self, world) -> None:
        system, orders = world
        order_id = str(uuid.uuid4())
        orders.current[order_id] = view(order_id, 1)
        token = system.token(Role.MENTEE)
        async with stream(system, order_id, token=token) as events:
            assert await events.orders(1) == [(1, view(order_id, 1))]
            await orders.change(view(order_id, 2, "awaiting_payment"))
            await orders.change(view(order_id, 3, "paid"))
            await orders.change(view(order_id, 4, "confirmed"))
            received = await events.orders(3)
            assert [(v, o["status"]) for v, o in received] == [
                (2, "awaiting_payment"),
                (3, "paid"),
                (4, "confirmed"),
            ]
            assert received[-1][1] == view(order_id, 4, "confirmed")
            assert await events.next() is None  # the order ended: the stream closed
        # Asked once, as the stream opened, with the caller's own token.
        [read] = orders.reads(order_id)
        assert read.headers["authorization"] == f"Bearer {token}"

    async def test_data_is_the_order_exactly_as_get_shows_it_on_one_line(self, world) -> None:
        system, orders = world
        order_id = str(uuid.uuid4())
        orders.current[order_id] = view(order_id, 1)
        token = system.token(Role.ADMIN)
        shown = await system.client.get(
            f"/api/orders/{order_id}", headers={"Authorization": f"Bearer {token}"}
        )
        async with stream(system, order_id, token=token) as events:
            first = await events.next()
        assert first == {"event": "order", "id": "1", "data": shown.text}
        assert shown.text == one_line(view(order_id, 1))

    async def test_repeats_and_older_changes_are_not_sent_again(self, world) -> None:
        system, orders = world
        order_id = str(uuid.uuid4())
        orders.current[order_id] = view(order_id, 2, "awaiting_payment")
        async with stream(system, order_id, token=system.token(Role.MENTEE)) as events:
            assert [v for v, _ in await events.orders(1)] == [2]
            for order in (
                view(order_id, 1),  # older than what the client has
                view(order_id, 2, "awaiting_payment"),  # delivered twice
                view(order_id, 3, "payment_failed"),
            ):
                await orders.change(order)
            assert [v for v, _ in await events.orders(1)] == [3]
            assert await events.next() is None

    async def test_an_idle_stream_keeps_alive_and_asks_orders_nothing(self, world) -> None:
        """Measured on the orders side: the stand-in records every request it is sent."""
        system, orders = world
        order_id = str(uuid.uuid4())
        orders.current[order_id] = view(order_id, 1)
        async with stream(system, order_id, token=system.token(Role.MENTEE)) as events:
            await events.orders(1)
            await orders.change(view(str(uuid.uuid4()), 1))  # someone else's order
            while events.comments < 3:  # a keepalive every 0.3 s here
                async with asyncio.timeout(EVENT_TIMEOUT):
                    line = await anext(events.lines)
                if line.startswith(":"):
                    assert line == ": keepalive"
                    events.comments += 1
                else:
                    assert line == "", line  # no event for another order
        assert len(orders.reads(order_id)) == 1

    async def test_a_client_that_goes_away_stops_being_watched(self, world) -> None:
        system, orders = world
        streams: OrderStreams = system.app.state.order_streams
        order_id = str(uuid.uuid4())
        orders.current[order_id] = view(order_id, 1)
        async with stream(system, order_id, token=system.token(Role.MENTEE)) as events:
            await events.orders(1)
            assert order_id in streams.watching
        await eventually(lambda: order_id not in streams.watching, what="the stream forgotten")


class TestResuming:
    async def test_nothing_at_or_below_last_event_id_is_sent_again(self, world) -> None:
        system, orders = world
        order_id = str(uuid.uuid4())
        orders.current[order_id] = view(order_id, 3, "paid")
        token = system.token(Role.MENTEE)
        for resume in ({"headers": {"Last-Event-ID": "3"}}, {"params": {"last_event_id": 3}}):
            async with stream(system, order_id, token=token, **resume) as events:
                await orders.change(view(order_id, 4, "confirmed"))
                assert [v for v, _ in await events.orders(1)] == [4]  # not 3 first
            orders.current[order_id] = view(order_id, 3, "paid")

    async def test_an_order_that_ended_at_or_below_it_is_204(self, world) -> None:
        system, orders = world
        order_id = str(uuid.uuid4())
        orders.current[order_id] = view(order_id, 4, "confirmed")
        headers = {"Authorization": f"Bearer {system.token(Role.MENTEE)}"}
        for last in ("4", "9"):
            answer = await system.client.get(
                f"/api/orders/{order_id}/events", headers={**headers, "Last-Event-ID": last}
            )
            assert (answer.status_code, answer.content) == (204, b"")
        # Below it: the last state, then the end.
        async with stream(system, order_id, headers={**headers, "Last-Event-ID": "3"}) as events:
            assert [v for v, _ in await events.orders(1)] == [4]
            assert await events.next() is None

    async def test_a_last_event_id_that_is_no_version_is_422(self, world) -> None:
        system, orders = world
        order_id = str(uuid.uuid4())
        orders.current[order_id] = view(order_id, 1)
        headers = {"Authorization": f"Bearer {system.token(Role.MENTEE)}"}
        for bad in (
            {"headers": {**headers, "Last-Event-ID": "x"}},
            {"params": {"last_event_id": -1}},
        ):
            request = {"headers": headers, **bad}
            problem(await system.client.get(f"/api/orders/{order_id}/events", **request), 422)
        assert orders.reads(order_id) == []


class TestWhoMayFollow:
    async def test_refusals_are_problems_before_any_stream(self, world) -> None:
        system, orders = world
        order_id = str(uuid.uuid4())
        orders.current[order_id] = view(order_id, 1)
        url = f"/api/orders/{order_id}/events"
        problem(await system.client.get(url), 401)
        problem(await system.client.get(url, params={"access_token": "not-a-jwt"}), 401)
        mentor = {"Authorization": f"Bearer {system.token(Role.MENTOR)}"}
        problem(await system.client.get(url, headers=mentor), 403)
        other_link = link(system, str(uuid.uuid4()))
        detail = problem(await system.client.get(url, params={"access_token": other_link}), 403)
        assert detail["detail"] == "this order link is for another order"
        expired = link(system, order_id, ttl=-60)
        problem(await system.client.get(url, params={"access_token": expired}), 401)
        assert orders.reads(order_id) == []  # none of them reached orders

    async def test_orders_404_for_another_mentees_order_comes_back_as_it_is(self, world) -> None:
        system, _ = world
        order_id = str(uuid.uuid4())  # the stand-in knows no such order
        answer = await system.client.get(
            f"/api/orders/{order_id}/events",
            headers={"Authorization": f"Bearer {system.token(Role.MENTEE)}"},
        )
        problem(answer, 404)
        assert order_id not in system.app.state.order_streams.watching

    async def test_an_order_link_in_the_query_is_sent_on_as_the_bearer(self, world) -> None:
        system, orders = world
        order_id = str(uuid.uuid4())
        orders.current[order_id] = view(order_id, 1)
        token = link(system, order_id)
        async with stream(system, order_id, params={"access_token": token}) as events:
            assert [v for v, _ in await events.orders(1)] == [1]
        [read] = orders.reads(order_id)
        assert read.headers["authorization"] == f"Bearer {token}"
        assert read.query == ""  # the token never goes into orders' URL

    async def test_a_login_token_in_the_query_works_too(self, world) -> None:
        system, orders = world
        order_id = str(uuid.uuid4())
        orders.current[order_id] = view(order_id, 1)
        params = {"access_token": system.token(Role.MENTEE)}
        async with stream(system, order_id, params=params) as events:
            assert [v for v, _ in await events.orders(1)] == [1]

    async def test_a_stream_ends_when_its_token_expires(self, world) -> None:
        system, orders = world
        order_id = str(uuid.uuid4())
        orders.current[order_id] = view(order_id, 1)
        token = system.token(Role.MENTEE, ttl_seconds=2)
        async with stream(system, order_id, token=token) as events:
            assert [v for v, _ in await events.orders(1)] == [1]
            assert await events.next() is None


class TestAfterTheFeedLostItsQueue:
    async def test_every_stream_reads_its_order_once_and_sends_what_it_missed(self, world) -> None:
        system, orders = world
        streams: OrderStreams = system.app.state.order_streams
        ids = [str(uuid.uuid4()) for _ in range(2)]
        for order_id in ids:
            orders.current[order_id] = view(order_id, 1)
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    stream(system, order_id, token=system.token(Role.ADMIN))
                )
                for order_id in ids
            ]
            for events in clients:
                await events.orders(1)
            # Changed while the replica had no queue: never published to it.
            orders.current[ids[0]] = view(ids[0], 2, "awaiting_payment")
            streams.feed.on_gap()  # what the feed calls once its new queue consumes
            assert [v for v, _ in await clients[0].orders(1)] == [2]
            await eventually(lambda: len(orders.reads(ids[1])) == 2, what="the second re-read")
        assert [len(orders.reads(order_id)) for order_id in ids] == [2, 2]


class TestSlowClients:
    """In process: the feed's fan-out never waits on a client."""

    def streams(self, system: System) -> OrderStreams:
        return system.app.state.order_streams

    async def test_a_full_queue_drops_that_client_and_no_other(self, world) -> None:
        system, _ = world
        streams = self.streams(system)
        order_id = uuid.uuid4()
        slow = OrderStream(order_id, "t", 0, queue_size=2, expires_at=None)
        fine = OrderStream(order_id, "t", 0, queue_size=2, expires_at=None)
        unwatch = [streams._watch(slow), streams._watch(fine)]
        try:
            for version in (1, 2, 3):
                change = Change.of(http.Order.model_validate(view(str(order_id), version)))
                slow.offer(change)
                fine.offer(change)
                await fine.queue.get()  # this one keeps up
            assert slow.overflowed and not fine.overflowed
            fine.offer(Signal.REREAD)
            assert fine.queue.get_nowait() is Signal.REREAD
        finally:
            for forget in unwatch:
                forget()
        assert str(order_id) not in streams.watching

    async def test_a_write_the_client_does_not_take_gives_up_when_the_queue_overflows(
        self,
    ) -> None:
        stream = OrderStream(uuid.uuid4(), "t", 0, queue_size=2, expires_at=None)
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def stuck(_: Any) -> None:
            await never  # a client that reads nothing: its socket buffer is full

        writing = asyncio.create_task(stream.write(stuck, b"x", timeout=60))
        await asyncio.sleep(0)
        change = Change(version=1, ended=False, data=b"", frame=b"")
        for _ in range(3):
            stream.offer(change)
        with pytest.raises(Exception) as gone:
            async with asyncio.timeout(5):
                await writing
        assert getattr(gone.value, "reason", None) == "too_slow"


class TestReadingAnOrder:
    """GET /api/orders/{id}: answered by the gateway from the same feed once orders answered
    the caller, as current as the streams."""

    @staticmethod
    def owned_by(orders: Orders, mentee: str) -> None:
        """The stand-in answers like orders: another mentee's order is a 404."""
        answer = orders.upstream.answer
        assert answer is not None

        def owner_only(recorded: Any) -> Any:
            token = recorded.headers["authorization"].removeprefix("Bearer ")
            claims = json.loads(_payload(token))
            if claims["role"] == "mentee" and claims["sub"] != mentee:
                order_id = recorded.path.rsplit("/", 1)[-1]
                return problem_answer(404, f"there is no order {order_id}")
            return answer(recorded)

        orders.upstream.answer = owner_only

    async def test_a_read_again_is_answered_by_the_gateway_as_orders_answered(self, world):
        system, orders = world
        order_id = str(uuid.uuid4())
        orders.current[order_id] = view(order_id, 2, "awaiting_payment")
        mentee = system.auth(Role.MENTEE)
        counted = {by: _reads_answered_by(by) for by in ("gateway", "orders")}
        first = await system.client.get(f"/api/orders/{order_id}", headers=mentee)
        again = [await system.client.get(f"/api/orders/{order_id}", headers=mentee) for _ in "ab"]
        assert len(orders.reads(order_id)) == 1
        assert _reads_answered_by("orders") - counted["orders"] == 1
        assert _reads_answered_by("gateway") - counted["gateway"] == 2
        for answer in again:
            assert answer.status_code == 200
            assert answer.headers["content-type"] == first.headers["content-type"]
            assert answer.content == first.content
        assert first.json() == view(order_id, 2, "awaiting_payment")

    async def test_a_change_on_the_feed_shows_in_the_next_read_without_asking_orders(self, world):
        system, orders = world
        order_id = str(uuid.uuid4())
        orders.current[order_id] = view(order_id, 1)
        admin = system.auth(Role.ADMIN)
        await system.client.get(f"/api/orders/{order_id}", headers=admin)
        await orders.change(view(order_id, 2, "awaiting_payment"))

        async def shows_version_2() -> bool:
            answer = await system.client.get(f"/api/orders/{order_id}", headers=admin)
            return answer.json()["version"] == 2

        await eventually(shows_version_2, what="version 2 read")
        assert len(orders.reads(order_id)) == 1

    async def test_another_mentee_is_sent_on_to_orders_and_gets_its_404(self, world):
        system, orders = world
        order_id = str(uuid.uuid4())
        orders.current[order_id] = view(order_id, 1)
        self.owned_by(orders, "mentee-a")
        owner = system.auth(Role.MENTEE, "mentee-a")
        for _ in range(2):
            assert (await system.client.get(f"/api/orders/{order_id}", headers=owner)).is_success
        stranger = system.auth(Role.MENTEE, "mentee-b")
        for _ in range(2):
            refused = await system.client.get(f"/api/orders/{order_id}", headers=stranger)
            assert problem(refused, 404)["detail"] == f"there is no order {order_id}"
        admin = await system.client.get(f"/api/orders/{order_id}", headers=system.auth(Role.ADMIN))
        assert admin.json() == view(order_id, 1)
        # The owner's first read, and each of the stranger's; the admin's came from the feed's view.
        assert len(orders.reads(order_id)) == 3

    async def test_after_an_admins_cancel_through_this_replica_the_read_asks_orders(self, world):
        system, orders = world
        order_id = str(uuid.uuid4())
        orders.current[order_id] = view(order_id, 1)
        read_order = orders.upstream.answer
        assert read_order is not None

        def cancel_or_read(recorded: Any) -> Any:
            if recorded.path.endswith("/cancel"):
                orders.current[order_id] = view(order_id, 2, "cancelled")
                return JSONResponse(orders.current[order_id])
            return read_order(recorded)

        orders.upstream.answer = cancel_or_read
        admin = system.auth(Role.ADMIN)
        await system.client.get(f"/api/orders/{order_id}", headers=admin)
        cancelled = await system.client.post(
            f"/api/admin/orders/{order_id}/cancel", headers=admin, json={"reason": "a test"}
        )
        assert cancelled.status_code == 200, cancelled.text
        # Read at once, before any OrderChanged: the change the admin just made shows.
        answer = await system.client.get(f"/api/orders/{order_id}", headers=admin)
        assert answer.json()["status"] == "cancelled"
        assert len(orders.reads(order_id)) == 2

    async def test_after_a_gap_in_the_feed_the_next_read_asks_orders(self, world):
        system, orders = world
        streams: OrderStreams = system.app.state.order_streams
        order_id = str(uuid.uuid4())
        orders.current[order_id] = view(order_id, 1)
        admin = system.auth(Role.ADMIN)
        await system.client.get(f"/api/orders/{order_id}", headers=admin)
        orders.current[order_id] = view(order_id, 2, "awaiting_payment")  # never published
        streams.feed.on_gap()
        answer = await system.client.get(f"/api/orders/{order_id}", headers=admin)
        assert answer.json()["version"] == 2
        assert len(orders.reads(order_id)) == 2


def _payload(token: str) -> bytes:
    """A JWT's claims, unverified (the stand-in's own reading of the token it was sent)."""
    segment = token.split(".")[1]
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _reads_answered_by(where: str) -> float:
    """The gateway's `booking_order_reads_total` for `where` (this process's registry)."""
    return REGISTRY.get_sample_value("booking_order_reads_total", {"answered_by": where}) or 0.0
