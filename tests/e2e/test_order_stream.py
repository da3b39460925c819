"""An order followed through the gateway as Server-Sent Events, against the running system.

A mentee books, follows the order at GET /api/orders/{id}/events, pays at the sandbox Konnect
with the pay link the stream brought, and the stream ends at the confirmed order (the mentor's
Google Calendar is connected): every event carries the order as GET shows it, under an id that
grows. Resuming sends nothing already seen; who may follow is who may read; an order link
follows its own order only; an idle stream asks orders nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from booking.runtime.auth import issue_order_token
from booking.runtime.settings import RuntimeSettings

from .conftest import FLOW_SECONDS

pytestmark = pytest.mark.e2e

KEEPALIVE_SECONDS = 0.5


@pytest.fixture(scope="module")
def system_overrides() -> dict[str, str]:
    return {
        "GOOGLE_MAX_ATTEMPTS": "3",
        "GOOGLE_RETRY_BASE_SECONDS": "0.05",
        # An idle stream's keepalives come fast enough to count several in a test.
        "ORDER_STREAM_KEEPALIVE_SECONDS": str(KEEPALIVE_SECONDS),
    }


class Events:
    """A stream's events as they arrive (fields by name); keepalive comments counted."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.aiter_lines()
        self.keepalives = 0

    async def next(self, timeout: float = FLOW_SECONDS) -> dict[str, str] | None:
        """The next event, or None once the stream closed."""
        fields: dict[str, str] = {}
        async with asyncio.timeout(timeout):
            async for line in self.lines:
                if not line:
                    if fields:
                        return fields
                elif line.startswith(":"):
                    self.keepalives += 1
                else:
                    name, _, value = line.partition(": ")
                    fields[name] = value
        return None

    async def order(self) -> tuple[int, dict[str, Any]]:
        event = await self.next()
        assert event is not None, "the stream closed"
        assert event["event"] == "order"
        return int(event["id"]), json.loads(event["data"])


@contextlib.asynccontextmanager
async def follow(api: httpx.AsyncClient, order_id: str, **request: Any) -> AsyncIterator[Events]:
    async with api.stream("GET", f"/api/orders/{order_id}/events", **request) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Events(response)


def link(running_system, order_id: str) -> str:
    """An order link as payments gives one, signed with the running system's key."""
    env = running_system.env
    secret = env.get("AUTH_JWT_SECRET") or RuntimeSettings().auth_jwt_secret.get_secret_value()
    own = env.get("ORDER_LINK_SECRET")
    key = RuntimeSettings(
        auth_jwt_secret=SecretStr(secret), order_link_secret=SecretStr(own) if own else None
    ).order_link_key
    return issue_order_token(key, uuid.UUID(order_id), 600)


async def orders_reads(running_system) -> float:
    """How many GET /api/orders/{id} the orders service itself has answered (its /metrics)."""
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        metrics = await client.get(f"{running_system.url('ORDERS_PORT')}/metrics")
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics.text)
        for sample in family.samples
        if sample.name == "booking_http_requests_total"
        and sample.labels.get("route") == "/api/orders/{order_id}"
        and sample.labels.get("method") == "GET"
    )


class TestFollowingABooking:
    async def test_from_the_first_state_to_confirmed_with_growing_ids(self, market, api):
        offering = await market.offering()
        await market.connect_calendar(offering["mentor_id"])
        order_id = await market.booked(offering)

        seen: list[tuple[int, dict[str, Any]]] = []
        async with follow(api, order_id, headers=market.mentee) as events:
            paid = False
            while True:
                event = await events.next()
                if event is None:
                    break
                version, order = int(event["id"]), json.loads(event["data"])
                seen.append((version, order))
                payment = order["payment"]
                if not paid and payment and payment["pay_url"]:
                    await market.pay(payment["ref"])  # the pay link, from the stream
                    paid = True

        versions = [version for version, _ in seen]
        assert versions == sorted(set(versions)), versions  # growing, never repeated
        assert [order["version"] for _, order in seen] == versions
        assert seen[0][1]["status"] in ("pending", "awaiting_payment")
        assert "paid" in [order["status"] for _, order in seen]
        last = seen[-1][1]
        assert (last["status"], last["session"]["status"]) == ("confirmed", "scheduled")
        assert last == await market.order(order_id)  # exactly what GET shows

        # Resumed at a version in the middle: only what came after it.
        middle = versions[len(versions) // 2 - 1]
        resume = {**market.mentee, "Last-Event-ID": str(middle)}
        async with follow(api, order_id, headers=resume) as events:
            assert await events.order() == seen[-1]  # the current state, newer than `middle`
            assert await events.next() is None  # ended: closed
        # Resumed at the last one: nothing more will come, and EventSource stops on a 204.
        ended = await api.get(
            f"/api/orders/{order_id}/events",
            headers={**market.mentee, "Last-Event-ID": str(versions[-1])},
        )
        assert (ended.status_code, ended.content) == (204, b"")

    async def test_a_resumed_stream_sends_nothing_already_seen(self, market, api):
        offering = await market.offering()
        order_id = await market.booked(offering)
        ref = await market.payment_ref(order_id)  # awaiting payment: a version the client saw
        shown = await market.order(order_id)
        resume = {**market.mentee, "Last-Event-ID": str(shown["version"])}
        async with follow(api, order_id, headers=resume) as events:
            await market.pay(ref)
            version, order = await events.order()
        assert version > shown["version"]
        assert order["status"] == "paid"


class TestWhoMayFollow:
    async def test_another_mentees_order_is_answered_as_get_answers_it(
        self, market, api, running_system
    ):
        offering = await market.offering()
        order_id = await market.booked(offering)
        someone_else = running_system.token("mentee")
        read = await api.get(f"/api/orders/{order_id}", headers=someone_else)
        follow_ = await api.get(f"/api/orders/{order_id}/events", headers=someone_else)
        assert read.status_code == follow_.status_code == 404
        assert follow_.headers["content-type"] == "application/problem+json"

    async def test_an_order_link_follows_its_order_and_no_other(self, market, api, running_system):
        offering = await market.offering()
        order_id = await market.booked(offering)
        other_id = await market.booked(offering, market.next_week(hours=3))
        token = link(running_system, order_id)
        async with follow(api, order_id, params={"access_token": token}) as events:
            _, order = await events.order()
        assert order["id"] == order_id
        refused = await api.get(f"/api/orders/{other_id}/events", params={"access_token": token})
        assert refused.status_code == 403
        assert refused.headers["content-type"] == "application/problem+json"
        # Nor is it a login anywhere else.
        elsewhere = await api.get(
            f"/api/orders/{order_id}", headers={"Authorization": f"Bearer {token}"}
        )
        assert elsewhere.status_code == 401


class TestAnIdleStream:
    async def test_it_keeps_alive_and_asks_orders_nothing(self, market, api, running_system):
        """Measured where it would cost: the orders service's own count of the GET
        /api/orders/{id} it answered (its /metrics). Nothing else in this module runs meanwhile,
        and the stream's order does not change (its payment stays open, unpaid)."""
        offering = await market.offering()
        order_id = await market.booked(offering)
        await market.payment_ref(order_id)  # settled: awaiting payment
        async with follow(api, order_id, headers=market.mentee) as events:
            await events.order()
            before = await orders_reads(running_system)
            # Several keepalives, and no event: the order did not change.
            await _read_keepalives(events, 4)
            after = await orders_reads(running_system)
        assert after == before


class TestReadingAnOrderAgain:
    async def test_reads_follow_the_order_without_asking_orders_and_answer_as_orders_does(
        self, market, api, running_system
    ):
        """A page that polls its order: once orders answered the first read, the gateway answers
        the rest from the order changes feed (orders' own count of the GET does not grow), each
        answer as orders itself would give it."""
        offering = await market.offering()
        await market.connect_calendar(offering["mentor_id"])
        order_id = await market.booked(offering)
        ref = await market.payment_ref(order_id)  # read through the gateway until it shows
        before = await orders_reads(running_system)
        await market.pay(ref)
        await market.order_when(order_id, "confirmed", lambda o: o["status"] == "confirmed")
        read = await api.get(f"/api/orders/{order_id}", headers=market.mentee)
        assert await orders_reads(running_system) == before
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            direct = await client.get(
                f"{running_system.url('ORDERS_PORT')}/api/orders/{order_id}",
                headers=market.mentee,
            )
        assert read.status_code == direct.status_code == 200
        assert read.content == direct.content
        assert read.headers["content-type"] == direct.headers["content-type"]


async def _read_keepalives(events: Events, count: int) -> None:
    """Read the stream until `count` keepalives came; an event meanwhile fails the test."""
    async with asyncio.timeout(FLOW_SECONDS):
        async for line in events.lines:
            if line.startswith(":"):
                events.keepalives += 1
                if events.keepalives >= count:
                    return
            else:
                assert not line, f"an event came for an order that did not change: {line}"
