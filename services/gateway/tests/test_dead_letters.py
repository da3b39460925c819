"""The four services' dead letters through the gateway: one merged list newest first, paged with
a cursor across the services, replays across them, and each one routed by its id."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import pytest
from fastapi.responses import JSONResponse, PlainTextResponse

from booking.contracts.http import (
    MAX_MINOR_UNITS,
    DeadLetter,
    DeadLetterCursor,
    DeadLetterPage,
    cursor_token,
)
from booking.devtools.fixtures import eventually
from booking.gateway.dead_letters import SERVICES, Position, merge, service_of
from booking.gateway.upstreams import Service
from booking.runtime.auth import Role

PROBLEM = "application/problem+json"
T0 = datetime(2030, 5, 1, 9, 0, tzinfo=UTC)
# Before the year 1 once in UTC: a position no database can take.
OUT_OF_RANGE = cursor_token("0001-01-01T00:00:00+01:00|orders|3")
ORDER_ID = "0b7e3f0e-3f5a-4a33-8d0e-2c6e4b9f1a03"
SESSION_ID = "e4f5a6b7-c8d9-4e0f-a1b2-c3d4e5f6a705"


def dead_letter(service: Service | str, number: int, at: datetime = T0, **fields: Any) -> dict:
    """A dead letter as `service` lists it."""
    return {
        "id": f"{service}:{number}",
        "service": str(service),
        "message_id": None,
        "type": "OrderPaid",
        "error": "ValueError: no such session",
        "attempts": 5,
        "dead_lettered_at": at.isoformat(),
        "status": "kept",
        **fields,
    }


def item(service: Service, number: int, at: datetime, **fields: Any) -> DeadLetter:
    return DeadLetter.model_validate(dead_letter(service, number, at, **fields))


def newest_first(items: list[DeadLetter]) -> list[str]:
    """The merged order, written out plainly: time desc, then the services' order, then n desc."""
    ranked = sorted(
        items,
        key=lambda i: (
            -i.dead_lettered_at.timestamp(),
            SERVICES.index(Service(i.service)),
            -int(i.id.split(":")[1]),
        ),
    )
    return [i.id for i in ranked]


class KeptDeadLetters:
    """A stand-in service's dead letters, listed as the services list them (booking.runtime.
    dead_letters): newest first by (at, id), filtered, `limit` from strictly before the cursor."""

    def __init__(self, items: list[DeadLetter]) -> None:
        self.items = sorted(
            items, key=lambda i: (i.dead_lettered_at, int(i.id.split(":")[1])), reverse=True
        )
        self.cursors: list[DeadLetterCursor | None] = []

    def __call__(self, request: Any) -> JSONResponse:
        query = {name: values[0] for name, values in parse_qs(request.query).items()}
        cursor = DeadLetterCursor.decode(query["cursor"]) if "cursor" in query else None
        self.cursors.append(cursor)
        limit = int(query["limit"])
        found = [
            i
            for i in self.items
            if query.get("status") in (None, i.status)
            and query.get("type") in (None, i.type)
            and (
                cursor is None
                or (i.dead_lettered_at, int(i.id.split(":")[1])) < (cursor.at, cursor.id)
            )
        ]
        page, more = found[:limit], len(found) > limit
        last = page[-1] if page else None
        next_cursor = (
            DeadLetterCursor(last.dead_lettered_at, int(last.id.split(":")[1])).encode()
            if more and last
            else None
        )
        return JSONResponse(
            DeadLetterPage(items=page, next_cursor=next_cursor).model_dump(mode="json")
        )


def many_dead_letters(seed: int) -> list[DeadLetter]:
    """Forty dead letters over five instants: many share an instant, within and across services,
    and a service's numbers do not follow its times (one kept again after a replay, say)."""
    rng = random.Random(seed)
    instants = [T0 + timedelta(seconds=s) for s in (0, 1, 1.5, 7, 30)]
    items = []
    for number in range(1, 41):
        service = rng.choice(SERVICES)
        items.append(
            item(
                service,
                number,
                rng.choice(instants),
                status=rng.choice(["kept", "kept", "replayed", "discarded"]),
                type=rng.choice(["OrderPaid", "PaymentCompleted"]),
            )
        )
    return items


def serve_dead_letters(system: Any, items: list[DeadLetter]) -> dict[Service, KeptDeadLetters]:
    stores = {
        service: KeptDeadLetters([i for i in items if i.service == service]) for service in Service
    }
    for service, store in stores.items():
        system.upstreams[service].answer = store
    return stores


async def every_page(system: Any, **params: Any) -> list[dict[str, Any]]:
    """The merged listing, page after page through the gateway's cursor; the pages."""
    pages = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await system.client.get(
            "/api/admin/dead-letters", params=query, headers=system.auth(Role.ADMIN)
        )
        assert response.status_code == 200, response.text
        page = response.json()
        pages.append(page)
        cursor = page["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) <= 100, "the cursor does not move on"


# --- the parts without servers -------------------------------------------------------------


class TestIds:
    @pytest.mark.parametrize("service", list(Service))
    def test_an_id_names_its_service(self, service: Service) -> None:
        assert service_of(f"{service}:42") is service

    @pytest.mark.parametrize(
        "wrong",
        [
            "billing:1",
            "payments",
            "payments:",
            ":1",
            "payments:x",
            "payments:0",
            "payments:-1",
            "payments:1.5",
            "payments:\N{ARABIC-INDIC DIGIT THREE}",
            f"payments:{MAX_MINOR_UNITS + 1}",
            "Payments:1",
        ],
    )
    def test_an_id_that_names_no_service_is_refused(self, wrong: str) -> None:
        with pytest.raises(ValueError, match="no dead letter"):
            service_of(wrong)


class TestPositions:
    def test_a_position_survives_its_cursor(self) -> None:
        position = Position(T0 + timedelta(microseconds=1), Service.CALENDAR, 12)
        assert Position.decode(position.encode()) == position

    @pytest.mark.parametrize(
        "token",
        [
            "not base64 !",
            "",
            DeadLetterCursor(T0, 3).encode(),  # a service's own cursor
            Position(T0, Service.ORDERS, 3).encode()[:-2],
            Position(T0.replace(tzinfo=None), Service.ORDERS, 3).encode(),
            Position(T0, Service.ORDERS, 0).encode(),
            OUT_OF_RANGE,
        ],
        ids=[
            "garbage",
            "empty",
            "a service's cursor",
            "cut short",
            "no timezone",
            "number 0",
            "instant out of range",
        ],
    )
    def test_a_cursor_the_listing_did_not_give_is_refused(self, token: str) -> None:
        with pytest.raises(ValueError, match="cursor"):
            Position.decode(token)

    def test_each_service_is_asked_for_what_comes_strictly_after_the_position(self) -> None:
        position = Position(T0, Service.PAYMENTS, 8)

        assert position.after_it_in(Service.ORDERS) == DeadLetterCursor(T0, 0)
        assert position.after_it_in(Service.PAYMENTS) == DeadLetterCursor(T0, 8)
        assert position.after_it_in(Service.CALENDAR) == DeadLetterCursor(T0, MAX_MINOR_UNITS)
        assert position.after_it_in(Service.NOTIFICATIONS) == DeadLetterCursor(T0, MAX_MINOR_UNITS)


class TestMerge:
    def test_newest_first_then_the_services_order_then_the_number(self) -> None:
        later = T0 + timedelta(seconds=1)
        pages = {
            Service.ORDERS: DeadLetterPage(
                items=[item(Service.ORDERS, 4, T0), item(Service.ORDERS, 2, T0)], next_cursor=None
            ),
            Service.PAYMENTS: DeadLetterPage(
                items=[item(Service.PAYMENTS, 1, later), item(Service.PAYMENTS, 9, T0)],
                next_cursor=None,
            ),
            Service.CALENDAR: DeadLetterPage(items=[], next_cursor=None),
            Service.NOTIFICATIONS: DeadLetterPage(
                items=[item(Service.NOTIFICATIONS, 3, later)], next_cursor=None
            ),
        }

        merged = merge(pages, 10)

        assert [i.id for i in merged.items] == [
            "payments:1",
            "notifications:3",
            "orders:4",
            "orders:2",
            "payments:9",
        ]
        assert merged.next_cursor is None

    def test_a_cut_page_ends_with_the_position_of_its_last_item(self) -> None:
        pages = {
            Service.ORDERS: DeadLetterPage(
                items=[item(Service.ORDERS, 2, T0), item(Service.ORDERS, 1, T0)], next_cursor=None
            ),
            Service.CALENDAR: DeadLetterPage(
                items=[item(Service.CALENDAR, 5, T0)], next_cursor=None
            ),
        }

        merged = merge(pages, 2)

        assert [i.id for i in merged.items] == ["orders:2", "orders:1"]
        assert merged.next_cursor is not None
        assert Position.decode(merged.next_cursor) == Position(T0, Service.ORDERS, 1)

    def test_a_service_with_more_than_it_gave_makes_a_next_page(self) -> None:
        # Exactly `limit` in the merge, but payments said it has more.
        pages = {
            Service.PAYMENTS: DeadLetterPage(
                items=[item(Service.PAYMENTS, 2, T0)],
                next_cursor=DeadLetterCursor(T0, 2).encode(),
            ),
            Service.ORDERS: DeadLetterPage(items=[], next_cursor=None),
        }

        merged = merge(pages, 1)

        assert Position.decode(merged.next_cursor or "") == Position(T0, Service.PAYMENTS, 2)

    def test_exactly_the_last_items_make_no_next_page(self) -> None:
        pages = {
            Service.PAYMENTS: DeadLetterPage(
                items=[item(Service.PAYMENTS, 2, T0)], next_cursor=None
            ),
            Service.ORDERS: DeadLetterPage(items=[item(Service.ORDERS, 1, T0)], next_cursor=None),
        }
        assert merge(pages, 2).next_cursor is None

    def test_another_services_dead_letter_in_a_page_is_refused(self) -> None:
        pages = {
            Service.ORDERS: DeadLetterPage(items=[item(Service.PAYMENTS, 1, T0)], next_cursor=None)
        }
        with pytest.raises(ValueError, match="not a dead letter of orders"):
            merge(pages, 5)


# --- through the gateway -------------------------------------------------------------------


class TestMergedListing:
    @pytest.mark.parametrize("limit", [1, 2, 3, 7, 50])
    async def test_paging_through_shows_each_dead_letter_once_in_order(
        self, system: Any, limit: int
    ) -> None:
        items = many_dead_letters(seed=limit)
        serve_dead_letters(system, items)

        pages = await every_page(system, limit=limit)

        shown = [i["id"] for page in pages for i in page["items"]]
        assert shown == newest_first(items)
        assert all(len(page["items"]) <= limit for page in pages)
        assert all(len(page["items"]) == limit for page in pages[:-1])

    async def test_the_filters_reach_every_service_and_page_the_same_way(self, system: Any) -> None:
        items = many_dead_letters(seed=99)
        serve_dead_letters(system, items)

        pages = await every_page(system, limit=3, status="kept", type="OrderPaid")

        shown = [i["id"] for page in pages for i in page["items"]]
        wanted = [i for i in items if i.status == "kept" and i.type == "OrderPaid"]
        assert shown == newest_first(wanted)
        assert shown, "the seed gives some kept OrderPaid"
        for service in Service:
            for seen in system.upstreams[service].requests:
                query = parse_qs(seen.query)
                assert (query["status"], query["type"], query["limit"]) == (
                    ["kept"],
                    ["OrderPaid"],
                    ["3"],
                )

    async def test_equal_times_across_services_split_by_a_page_are_neither_lost_nor_repeated(
        self, system: Any
    ) -> None:
        items = [
            item(Service.ORDERS, 7, T0),
            item(Service.ORDERS, 3, T0),
            item(Service.PAYMENTS, 9, T0),
            item(Service.PAYMENTS, 4, T0),
            item(Service.CALENDAR, 2, T0),
            item(Service.NOTIFICATIONS, 5, T0),
            item(Service.NOTIFICATIONS, 1, T0 - timedelta(microseconds=1)),
        ]
        stores = serve_dead_letters(system, items)

        pages = await every_page(system, limit=3)

        assert [[i["id"] for i in page["items"]] for page in pages] == [
            ["orders:7", "orders:3", "payments:9"],
            ["payments:4", "calendar:2", "notifications:5"],
            ["notifications:1"],
        ]
        # After payments:9: orders has shown all at T0, payments from 9 on, the others none.
        assert [store.cursors[1] for store in stores.values()] == [
            DeadLetterCursor(T0, 0),
            DeadLetterCursor(T0, 9),
            DeadLetterCursor(T0, MAX_MINOR_UNITS),
            DeadLetterCursor(T0, MAX_MINOR_UNITS),
        ]

    async def test_every_service_is_asked_at_once(self, system: Any) -> None:
        for upstream in system.upstreams.values():
            upstream.delay = 30  # each answers when released, or after 30 s
        listing = asyncio.create_task(
            system.client.get("/api/admin/dead-letters", headers=system.auth(Role.ADMIN))
        )
        try:
            # One after the other, the second would not be asked before the first answered.
            await eventually(
                lambda: all(u.requests for u in system.upstreams.values()),
                timeout=10,
                what="all four services asked while none has answered",
            )
        finally:
            for upstream in system.upstreams.values():
                upstream.released.set()
        response = await listing
        assert response.status_code == 200
        assert [i["id"] for i in response.json()["items"]] == [f"{s}:1" for s in SERVICES]

    async def test_with_a_service_the_request_goes_to_it_alone_as_it_came(
        self, system: Any
    ) -> None:
        cursor = DeadLetterCursor(T0, 12).encode()
        response = await system.client.get(
            f"/api/admin/dead-letters?service=calendar&status=kept&limit=5&cursor={cursor}",
            headers=system.auth(Role.ADMIN),
        )

        assert response.status_code == 200
        [seen] = system.received()[Service.CALENDAR]
        assert list(system.received()) == [Service.CALENDAR]
        assert seen.query == f"service=calendar&status=kept&limit=5&cursor={cursor}"

    @pytest.mark.parametrize(
        "query",
        [
            "cursor=nonsense",
            f"cursor={DeadLetterCursor(T0, 3).encode()}",
            "limit=0",
            "limit=201",
            "status=lost",
            "service=billing",
            # Found by the stateful contract run: each service answered 500 (Postgres refuses
            # a NUL in text and an instant before the year 1), the listing a 502.
            "type=Order%00Paid",
            f"cursor={OUT_OF_RANGE}",
        ],
    )
    async def test_a_query_off_the_contract_is_422_and_asks_nobody(
        self, system: Any, query: str
    ) -> None:
        response = await system.client.get(
            f"/api/admin/dead-letters?{query}", headers=system.auth(Role.ADMIN)
        )
        assert response.status_code == 422
        assert response.headers["content-type"] == PROBLEM
        assert not system.received()

    async def test_a_service_that_cannot_be_reached_fails_the_listing_naming_it(
        self, start_system: Any
    ) -> None:
        async with start_system(down={Service.CALENDAR}) as system:
            response = await system.client.get(
                "/api/admin/dead-letters", headers=system.auth(Role.ADMIN)
            )

        assert response.status_code == 503
        assert response.headers["content-type"] == PROBLEM
        body = response.json()
        assert body["services"] == ["calendar"]
        assert "without calendar" in body["detail"]
        assert "items" not in body

    async def test_a_services_own_503_passes_on_with_its_retry_after(self, system: Any) -> None:
        system.upstreams[Service.NOTIFICATIONS].answer = lambda _: JSONResponse(
            {"title": "Service Unavailable", "status": 503, "detail": "database away"},
            503,
            media_type=PROBLEM,
            headers={"Retry-After": "5"},
        )
        response = await system.client.get(
            "/api/admin/dead-letters", headers=system.auth(Role.ADMIN)
        )

        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json()["services"] == ["notifications"]
        assert "notifications: database away" in response.json()["detail"]

    async def test_a_service_crash_is_a_502_naming_it_without_its_body(self, system: Any) -> None:
        system.upstreams[Service.PAYMENTS].answer = lambda _: PlainTextResponse(
            "Traceback: secret", 500
        )
        response = await system.client.get(
            "/api/admin/dead-letters", headers=system.auth(Role.ADMIN)
        )

        assert response.status_code == 502
        assert response.json()["services"] == ["payments"]
        assert "Traceback" not in response.text

    async def test_a_page_off_the_contract_is_a_502(self, system: Any) -> None:
        system.upstreams[Service.ORDERS].answer = lambda _: JSONResponse({"items": "none"})
        response = await system.client.get(
            "/api/admin/dead-letters", headers=system.auth(Role.ADMIN)
        )
        assert response.status_code == 502
        assert "orders service gave no valid answer" in response.json()["detail"]

    async def test_a_service_listing_another_services_dead_letter_is_a_502(
        self, system: Any
    ) -> None:
        system.upstreams[Service.ORDERS].answer = lambda _: JSONResponse(
            {"items": [dead_letter("payments", 3)], "next_cursor": None}
        )
        response = await system.client.get(
            "/api/admin/dead-letters", headers=system.auth(Role.ADMIN)
        )
        assert response.status_code == 502

    async def test_a_refusal_by_a_service_comes_back_as_it_is(self, system: Any) -> None:
        problem = {"title": "Unauthorized", "status": 401, "detail": "the token has expired"}
        system.upstreams[Service.CALENDAR].answer = lambda _: JSONResponse(
            problem, 401, media_type=PROBLEM
        )
        response = await system.client.get(
            "/api/admin/dead-letters", headers=system.auth(Role.ADMIN)
        )
        assert response.status_code == 401
        assert response.json() == problem


class TestReplayingMany:
    async def test_without_a_service_every_service_replays_and_the_counts_add_up(
        self, system: Any
    ) -> None:
        for count, service in enumerate(SERVICES, start=1):
            system.upstreams[service].answer = lambda _, n=count: JSONResponse({"replayed": n})

        response = await system.client.post(
            "/api/admin/dead-letters/replay",
            json={"type": "OrderPaid"},
            headers=system.auth(Role.ADMIN),
        )

        assert response.status_code == 200
        assert response.json() == {"replayed": 1 + 2 + 3 + 4}
        for service in SERVICES:
            [seen] = system.upstreams[service].requests
            assert seen.path == "/api/admin/dead-letters/replay"
            assert json.loads(seen.body) == {"type": "OrderPaid"}
            assert seen.headers["content-type"] == "application/json"

    async def test_without_a_body_every_kept_one_everywhere(self, system: Any) -> None:
        response = await system.client.post(
            "/api/admin/dead-letters/replay", headers=system.auth(Role.ADMIN)
        )
        assert response.status_code == 200
        assert response.json() == {"replayed": 4}  # each stand-in replays 1
        assert all(json.loads(u.requests[0].body) == {} for u in system.upstreams.values())

    async def test_with_a_service_only_it_replays(self, system: Any) -> None:
        system.upstreams[Service.PAYMENTS].answer = lambda _: JSONResponse({"replayed": 6})
        response = await system.client.post(
            "/api/admin/dead-letters/replay",
            json={"service": "payments"},
            headers=system.auth(Role.ADMIN),
        )
        assert response.json() == {"replayed": 6}
        assert list(system.received()) == [Service.PAYMENTS]
        [seen] = system.upstreams[Service.PAYMENTS].requests
        assert json.loads(seen.body) == {"service": "payments"}

    async def test_a_service_that_cannot_be_reached_is_named_with_what_the_others_replayed(
        self, start_system: Any
    ) -> None:
        async with start_system(down={Service.PAYMENTS}) as system:
            system.upstreams[Service.ORDERS].answer = lambda _: JSONResponse({"replayed": 2})
            response = await system.client.post(
                "/api/admin/dead-letters/replay", headers=system.auth(Role.ADMIN)
            )

        assert response.status_code == 503
        body = response.json()
        assert body["services"] == ["payments"]
        assert body["replayed"] == 2 + 1 + 1
        assert "2 in orders" in body["detail"]
        assert "payments" in body["detail"]

    @pytest.mark.parametrize(
        "body",
        [{"service": "billing"}, {"type": ""}, {"everything": True}, {"type": "x" * 101}],
        ids=["unknown service", "empty type", "unknown field", "long type"],
    )
    async def test_a_filter_off_the_contract_is_422_and_replays_nothing(
        self, system: Any, body: dict[str, Any]
    ) -> None:
        response = await system.client.post(
            "/api/admin/dead-letters/replay", json=body, headers=system.auth(Role.ADMIN)
        )
        assert response.status_code == 422
        assert not system.received()


class TestOneDeadLetter:
    @pytest.mark.parametrize("service", list(Service))
    async def test_its_id_routes_it_to_the_service_that_keeps_it(
        self, system: Any, service: Service
    ) -> None:
        admin = system.auth(Role.ADMIN)
        url = f"/api/admin/dead-letters/{service}:42"

        shown = await system.client.get(url, headers=admin)
        replayed = await system.client.post(
            f"{url}/replay", json={"reason": "fixed"}, headers=admin
        )
        discarded = await system.client.post(
            f"{url}/discard", json={"reason": "a test message"}, headers=admin
        )

        assert (shown.status_code, replayed.status_code, discarded.status_code) == (200, 200, 200)
        assert shown.json()["id"] == f"{service}:42"
        assert list(system.received()) == [service]
        seen = system.upstreams[service].requests
        assert [(r.method, r.path) for r in seen] == [
            ("GET", url),
            ("POST", f"{url}/replay"),
            ("POST", f"{url}/discard"),
        ]
        assert [json.loads(r.body) if r.body else None for r in seen] == [
            None,
            {"reason": "fixed"},
            {"reason": "a test message"},
        ]

    async def test_a_replay_needs_no_reason(self, system: Any) -> None:
        response = await system.client.post(
            "/api/admin/dead-letters/orders:1/replay", headers=system.auth(Role.ADMIN)
        )
        assert response.status_code == 200
        assert response.json()["status"] == "replayed"
        [seen] = system.upstreams[Service.ORDERS].requests
        assert json.loads(seen.body) == {}

    @pytest.mark.parametrize("wrong", ["billing:1", "payments", "payments:abc", "orders:0"])
    @pytest.mark.parametrize("action", ["GET", "replay", "discard"])
    async def test_an_id_that_names_no_service_is_404_and_goes_nowhere(
        self, system: Any, wrong: str, action: str
    ) -> None:
        admin = system.auth(Role.ADMIN)
        url = f"/api/admin/dead-letters/{wrong}"
        if action == "GET":
            response = await system.client.get(url, headers=admin)
        else:
            response = await system.client.post(
                f"{url}/{action}", json={"reason": "r"}, headers=admin
            )
        assert response.status_code == 404
        assert response.headers["content-type"] == PROBLEM
        assert wrong in response.json()["detail"]
        assert not system.received()

    @pytest.mark.parametrize(
        "body",
        [None, {}, {"reason": ""}, {"reason": "   "}, {"reason": "x" * 1001}, {"reason": 3}],
        ids=["no body", "no reason", "empty", "blank", "too long", "not text"],
    )
    async def test_a_discard_without_a_reason_is_422(self, system: Any, body: Any) -> None:
        response = await system.client.post(
            "/api/admin/dead-letters/payments:3/discard",
            json=body,
            headers=system.auth(Role.ADMIN),
        )
        assert response.status_code == 422
        assert response.headers["content-type"] == PROBLEM
        assert not system.received()

    async def test_a_replay_with_an_unknown_field_is_422(self, system: Any) -> None:
        response = await system.client.post(
            "/api/admin/dead-letters/payments:3/replay",
            json={"reason": "x", "force": True},
            headers=system.auth(Role.ADMIN),
        )
        assert response.status_code == 422
        assert not system.received()

    async def test_a_refused_move_comes_back_as_the_service_said_it(self, system: Any) -> None:
        problem = {
            "title": "Conflict",
            "status": 409,
            "detail": "dead letter payments:3 was discarded; it cannot be replayed",
        }
        system.upstreams[Service.PAYMENTS].answer = lambda _: JSONResponse(
            problem, 409, media_type=PROBLEM
        )
        response = await system.client.post(
            "/api/admin/dead-letters/payments:3/replay", headers=system.auth(Role.ADMIN)
        )
        assert response.status_code == 409
        assert response.json() == problem


class TestAdminActions:
    async def test_a_cancel_reaches_orders_with_its_reason(self, system: Any) -> None:
        response = await system.client.post(
            f"/api/admin/orders/{ORDER_ID}/cancel",
            json={"reason": "  the mentor is ill  "},
            headers=system.auth(Role.ADMIN),
        )
        assert response.status_code == 200
        assert response.json()["status"] == "cancelled"
        [seen] = system.upstreams[Service.ORDERS].requests
        assert json.loads(seen.body) == {"reason": "the mentor is ill"}

    async def test_a_retry_of_scheduling_reaches_calendar_with_or_without_a_reason(
        self, system: Any
    ) -> None:
        admin = system.auth(Role.ADMIN)
        url = f"/api/admin/sessions/{SESSION_ID}/retry-scheduling"
        bare = await system.client.post(url, headers=admin)
        said = await system.client.post(url, json={"reason": "Google is back"}, headers=admin)

        assert (bare.status_code, said.status_code) == (200, 200)
        assert bare.json()["session_id"] == SESSION_ID
        bodies = [json.loads(r.body) for r in system.upstreams[Service.CALENDAR].requests]
        assert bodies == [{}, {"reason": "Google is back"}]

    async def test_an_escrow_is_read_and_settled_at_payments(self, system: Any) -> None:
        admin = system.auth(Role.ADMIN)
        url = f"/api/admin/orders/{ORDER_ID}/escrow"
        shown = await system.client.get(url, headers=admin)
        settled = await system.client.post(
            url,
            json={"action": "refunded", "reason": "paid back", "reference": "VIR-2030-17"},
            headers=admin,
        )
        assert (shown.json()["status"], settled.json()["status"]) == ("frozen", "released")
        seen = system.upstreams[Service.PAYMENTS].requests
        assert [(r.method, r.path) for r in seen] == [("GET", url), ("POST", url)]
        assert json.loads(seen[1].body) == {
            "action": "refunded",
            "reason": "paid back",
            "reference": "VIR-2030-17",
        }

    @pytest.mark.parametrize(
        ("path", "body"),
        [
            (f"/api/admin/orders/{ORDER_ID}/cancel", {}),
            (f"/api/admin/orders/{ORDER_ID}/cancel", {"reason": ""}),
            (f"/api/admin/orders/{ORDER_ID}/cancel", {"reason": "r", "refund": True}),
            ("/api/admin/orders/42/cancel", {"reason": "r"}),
            (f"/api/admin/sessions/{SESSION_ID}/retry-scheduling", {"reason": "r", "now": 1}),
            (f"/api/admin/sessions/{SESSION_ID}/retry-scheduling", {"reason": ""}),
            ("/api/admin/sessions/42/retry-scheduling", {}),
            (f"/api/admin/orders/{ORDER_ID}/escrow", {"action": "steal", "reason": "r"}),
            (f"/api/admin/orders/{ORDER_ID}/escrow", {"action": "release"}),
            (f"/api/admin/orders/{ORDER_ID}/escrow", {"action": "release", "reason": "r", "x": 1}),
            (
                f"/api/admin/orders/{ORDER_ID}/escrow",
                {"action": "refunded", "reason": "r", "reference": ""},
            ),
        ],
        ids=[
            "cancel without reason",
            "cancel with an empty reason",
            "cancel with an unknown field",
            "cancel of no uuid",
            "retry with an unknown field",
            "retry with an empty reason",
            "retry of no uuid",
            "unknown settlement",
            "settlement without reason",
            "settlement with an unknown field",
            "refund with an empty reference",
        ],
    )
    async def test_a_body_off_the_contract_is_422_and_goes_nowhere(
        self, system: Any, path: str, body: dict[str, Any]
    ) -> None:
        response = await system.client.post(path, json=body, headers=system.auth(Role.ADMIN))
        assert response.status_code == 422
        assert response.headers["content-type"] == PROBLEM
        assert not system.received()

    async def test_a_refused_settlement_comes_back_as_payments_said_it(self, system: Any) -> None:
        problem = {"title": "Conflict", "status": 409, "detail": "the escrow is held, not frozen"}
        system.upstreams[Service.PAYMENTS].answer = lambda _: JSONResponse(
            problem, 409, media_type=PROBLEM
        )
        response = await system.client.post(
            f"/api/admin/orders/{ORDER_ID}/escrow",
            json={"action": "release", "reason": "r"},
            headers=system.auth(Role.ADMIN),
        )
        assert response.status_code == 409
        assert response.json() == problem


class TestDocumented:
    async def test_the_admin_routes_say_what_they_take_and_answer(self, system: Any) -> None:
        document = (await system.client.get("/openapi.json")).json()
        paths = document["paths"]

        listing = paths["/api/admin/dead-letters"]["get"]
        parameters = {p["name"]: p for p in listing["parameters"]}
        assert set(parameters) == {"service", "type", "status", "limit", "cursor"}
        assert parameters["limit"]["schema"]["maximum"] == 200
        assert "DeadLetterPage" in json.dumps(listing["responses"]["200"])

        discard = paths["/api/admin/dead-letters/{dead_letter_id}/discard"]["post"]
        assert {"401", "403", "404", "409", "422", "503"} <= set(discard["responses"])
        assert discard["requestBody"]["required"] is True
        assert "AdminReason" in json.dumps(discard["requestBody"])

        retry = paths["/api/admin/sessions/{session_id}/retry-scheduling"]["post"]
        assert not retry["requestBody"].get("required", False)
        assert "SessionScheduling" in json.dumps(retry["responses"]["200"])

        settle = paths["/api/admin/orders/{order_id}/escrow"]["post"]
        assert "EscrowSettlement" in json.dumps(settle["requestBody"])
        assert "Escrow" in json.dumps(settle["responses"]["200"])
        assert "not allow" in settle["responses"]["409"]["description"]
        for operation in (listing, discard, retry, settle):
            assert {"401", "403"} <= set(operation["responses"])
