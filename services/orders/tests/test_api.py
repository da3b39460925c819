"""The orders HTTP API over real HTTP: mentors, offerings, bookings, idempotency, orders, and an
admin's cancel."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from booking.contracts import PaymentInitiationFailed
from booking.devtools.fixtures import eventually
from booking.orders.domain import OrderStatus, PaymentStatus, SessionStatus
from booking.orders.repository import lock_order, save_order
from booking.runtime.auth import Role, issue_token


class TestMentors:
    async def test_an_admin_registers_a_mentor_and_mentor_registered_is_published_once(
        self, orders
    ) -> None:
        body = {"name": "Amel Ben Salah", "email": "amel@example.com", "timezone": "Africa/Tunis"}
        created = await orders.client.post("/api/mentors", json=body, headers=orders.admin)
        assert created.status_code == 201, created.text
        mentor = created.json()
        assert set(mentor) == {"id", "name", "email", "timezone", "identity_subject"}
        assert {k: mentor[k] for k in body} == body and mentor["identity_subject"] is None

        read = await orders.client.get(f"/api/mentors/{mentor['id']}", headers=orders.mentee())
        assert read.status_code == 200 and read.json() == mentor

        await orders.quiet()
        registered = orders.events("MentorRegistered", mentor_id=mentor["id"])
        assert registered == [
            {
                "mentor_id": mentor["id"],
                "name": "Amel Ben Salah",
                "email": "amel@example.com",
                "timezone": "Africa/Tunis",
                "identity_subject": None,
            }
        ]
        assert len(orders.spy.of_type("MentorRegistered")) == 1

    async def test_an_unknown_mentor_is_a_404_problem(self, orders) -> None:
        answer = await orders.client.get(f"/api/mentors/{uuid.uuid4()}", headers=orders.admin)
        orders.problem(answer, 404)

    @pytest.mark.parametrize(
        ("who", "status"),
        [("mentee", 403), ("mentor", 403), ("nobody", 401), ("forged", 401)],
    )
    async def test_only_an_admin_registers_mentors_and_a_refusal_stores_nothing(
        self, orders, who: str, status: int
    ) -> None:
        email = f"x.{uuid.uuid4().hex[:8]}@example.com"
        headers = {
            "mentee": orders.token(Role.MENTEE),
            "mentor": orders.token(Role.MENTOR, str(uuid.uuid4())),
            "nobody": {},
            "forged": {"Authorization": "Bearer not.a.token"},
        }[who]
        answer = await orders.client.post(
            "/api/mentors",
            json={"name": "X", "email": email, "timezone": "UTC"},
            headers=headers,
        )
        orders.problem(answer, status)
        sql = "SELECT count(*) FROM orders.mentors WHERE email = :email"
        assert await orders.scalar(sql, email=email) == 0

    @pytest.mark.parametrize(
        "body",
        [
            {"name": "X", "email": "not-an-email", "timezone": "UTC"},
            {"name": "X", "email": "x@example.com", "timezone": "UTC", "role": "admin"},
            {"name": "", "email": "x@example.com", "timezone": "UTC"},
            {"name": "X", "email": "x@example.com"},
            {"name": "A\u0000B", "email": "x@example.com", "timezone": "UTC"},
        ],
        ids=["malformed email", "extra field", "empty name", "missing timezone", "NUL in name"],
    )
    async def test_a_bad_mentor_is_a_422_problem(self, orders, body: dict[str, Any]) -> None:
        before = await orders.scalar("SELECT count(*) FROM orders.mentors")
        answer = await orders.client.post("/api/mentors", json=body, headers=orders.admin)
        orders.problem(answer, 422)
        assert await orders.scalar("SELECT count(*) FROM orders.mentors") == before


class TestOfferings:
    async def test_the_admin_and_the_mentor_add_offerings_that_anyone_signed_in_lists(
        self, orders
    ) -> None:
        mentor = await orders.add_mentor()
        by_admin = await orders.add_offering(mentor["id"], duration=45, price=90_000)
        by_mentor = await orders.client.post(
            f"/api/mentors/{mentor['id']}/offerings",
            json={
                "title": "Mock interview",
                "duration_minutes": 90,
                "price": {"amount": 150_000, "currency": "TND"},
            },
            headers=orders.token(Role.MENTOR, mentor["id"]),
        )
        assert by_mentor.status_code == 201, by_mentor.text
        assert by_admin == {
            "id": by_admin["id"],
            "mentor_id": mentor["id"],
            "title": "Career chat",
            "duration_minutes": 45,
            "price": {"amount": 90_000, "currency": "TND"},
        }

        listed = await orders.client.get(
            f"/api/mentors/{mentor['id']}/offerings", headers=orders.mentee()
        )
        assert listed.status_code == 200
        assert listed.json() == [by_admin, by_mentor.json()]

    async def test_another_mentor_or_a_mentee_may_not_add_offerings(self, orders) -> None:
        mentor = await orders.add_mentor()
        body = {
            "title": "Hijacked",
            "duration_minutes": 30,
            "price": {"amount": 1, "currency": "TND"},
        }
        for headers in (orders.token(Role.MENTOR, str(uuid.uuid4())), orders.mentee()):
            answer = await orders.client.post(
                f"/api/mentors/{mentor['id']}/offerings", json=body, headers=headers
            )
            orders.problem(answer, 403)
        sql = "SELECT count(*) FROM orders.offerings WHERE mentor_id = :m"
        assert await orders.scalar(sql, m=mentor["id"]) == 0

    async def test_offerings_of_an_unknown_mentor_are_404(self, orders) -> None:
        unknown = uuid.uuid4()
        body = {"title": "T", "duration_minutes": 30, "price": {"amount": 1, "currency": "TND"}}
        added = await orders.client.post(
            f"/api/mentors/{unknown}/offerings", json=body, headers=orders.admin
        )
        listed = await orders.client.get(f"/api/mentors/{unknown}/offerings", headers=orders.admin)
        orders.problem(added, 404)
        orders.problem(listed, 404)

    @pytest.mark.parametrize(
        ("change", "field"),
        [
            ({"price": {"amount": 0, "currency": "TND"}}, "price.amount"),
            ({"price": {"amount": -1, "currency": "TND"}}, "price.amount"),
            ({"price": {"amount": 120.5, "currency": "TND"}}, "price.amount"),
            ({"price": {"amount": 120000.0, "currency": "TND"}}, "price.amount"),
            ({"price": {"amount": "120000", "currency": "TND"}}, "price.amount"),
            ({"price": {"amount": 120000, "currency": "XYZ"}}, "price.currency"),
            ({"price": {"amount": 120000, "currency": "tnd"}}, "price.currency"),
            ({"price": {"amount": 120000, "currency": "GBP"}}, "price.currency"),
            ({"price": {"amount": 120000, "currency": "TND", "fx": 1}}, "price.fx"),
            # Above the default maximum, 10,000 in the currency's own major units.
            ({"price": {"amount": 10_000_001, "currency": "TND"}}, "price.amount"),
            ({"price": {"amount": 1_000_001, "currency": "EUR"}}, "price.amount"),
            ({"price": {"amount": 1_000_001, "currency": "USD"}}, "price.amount"),
            ({"price": {"amount": 1_000_000_001, "currency": "TND"}}, "price.amount"),
            ({"price": {"amount": 2**63, "currency": "TND"}}, "price.amount"),
            ({"duration_minutes": 0}, "duration_minutes"),
            ({"duration_minutes": 14}, "duration_minutes"),
            ({"duration_minutes": 481}, "duration_minutes"),
            ({"duration_minutes": 30.5}, "duration_minutes"),
            ({"discount": 10}, "discount"),
        ],
        ids=[
            "zero price",
            "negative money",
            "fractional money",
            "float money",
            "money as a string",
            "unknown currency",
            "lower-case currency",
            "a currency Konnect does not take",
            "extra field in money",
            "over the maximum in TND",
            "over the maximum in EUR",
            "over the maximum in USD",
            "over the contract's ceiling",
            "money beyond 64 bits",
            "zero duration",
            "under fifteen minutes",
            "over eight hours",
            "fractional duration",
            "extra field",
        ],
    )
    async def test_a_bad_offering_is_a_422_problem_naming_the_field_and_stores_nothing(
        self, orders, change: dict[str, Any], field: str
    ) -> None:
        mentor = await orders.add_mentor()
        body = {
            "title": "Career chat",
            "duration_minutes": 60,
            "price": {"amount": 120000, "currency": "TND"},
            **change,
        }
        answer = await orders.client.post(
            f"/api/mentors/{mentor['id']}/offerings", json=body, headers=orders.admin
        )
        problem = orders.problem(answer, 422)
        assert [error["field"] for error in problem["errors"]] == [field]
        assert field in problem["detail"]
        sql = "SELECT count(*) FROM orders.offerings WHERE mentor_id = :m"
        assert await orders.scalar(sql, m=mentor["id"]) == 0

    @pytest.mark.parametrize(
        ("amount", "currency", "minutes"),
        [(10_000_000, "TND", 15), (1_000_000, "EUR", 480), (1, "USD", 60)],
    )
    async def test_prices_up_to_the_maximum_and_durations_within_bounds_are_taken(
        self, orders, amount: int, currency: str, minutes: int
    ) -> None:
        mentor = await orders.add_mentor()
        price = {"amount": amount, "currency": currency}
        answer = await orders.client.post(
            f"/api/mentors/{mentor['id']}/offerings",
            json={"title": "Career chat", "duration_minutes": minutes, "price": price},
            headers=orders.admin,
        )
        assert answer.status_code == 201, answer.text
        assert (answer.json()["price"], answer.json()["duration_minutes"]) == (price, minutes)

    async def test_the_maximum_is_a_setting_in_major_units(self, serve_orders) -> None:
        async with serve_orders(offering_max_price_major_units=50) as orders:
            mentor = await orders.add_mentor()
            at_most = await orders.add_offering(mentor["id"], price=50_000)  # 50 TND
            over = await orders.client.post(
                f"/api/mentors/{mentor['id']}/offerings",
                json={
                    "title": "Career chat",
                    "duration_minutes": 60,
                    "price": {"amount": 5_001, "currency": "EUR"},  # 50.01 EUR
                },
                headers=orders.admin,
            )
            problem = orders.problem(over, 422)
            assert problem["errors"] == [
                {
                    "field": "price.amount",
                    "message": "the price 50.01 EUR (5001 minor units) is above the most an "
                    "offering may cost, 50.00 EUR (5000 minor units)",
                }
            ]
            sql = "SELECT count(*) FROM orders.offerings WHERE mentor_id = :m"
            assert await orders.scalar(sql, m=mentor["id"]) == 1
            assert at_most["price"] == {"amount": 50_000, "currency": "TND"}


class TestBooking:
    async def test_a_booking_stores_the_order_its_session_and_booking_requested_together(
        self, orders
    ) -> None:
        offering = await orders.new_offering(duration=45)
        start = orders.future(days=12, hour=14)
        sub = f"mentee-{uuid.uuid4().hex[:8]}"
        answer = await orders.book(offering["id"], start, headers=orders.mentee(sub))
        assert answer.status_code == 202, answer.text
        accepted = answer.json()
        assert set(accepted) == {"order_id", "session_id", "status"}
        assert accepted["status"] == "pending"

        assert await orders.order_status(accepted["order_id"]) == ("pending", "pending_payment")
        await orders.quiet()
        requested = orders.events("BookingRequested", order_id=accepted["order_id"])
        assert requested == [
            {
                "order_id": accepted["order_id"],
                "session_id": accepted["session_id"],
                "mentor_id": offering["mentor_id"],
                "offering": {
                    "offering_id": offering["id"],
                    "title": "Career chat",
                    "duration_minutes": 45,
                },
                "amount": orders.PRICE,
                "currency": "TND",
                "mentee": {
                    "first_name": "Sami",
                    "last_name": "Trabelsi",
                    "email": "sami@example.com",
                    "phone": "+216 20 123 456",
                },
                "start_at": start.isoformat().replace("+00:00", "Z"),
                "end_at": (start + timedelta(minutes=45)).isoformat().replace("+00:00", "Z"),
            }
        ]

        order = await orders.client.get(
            f"/api/orders/{accepted['order_id']}", headers=orders.mentee(sub)
        )
        assert order.status_code == 200, order.text
        assert order.json() == {
            "id": accepted["order_id"],
            "status": "pending",
            "amount": {"amount": orders.PRICE, "currency": "TND"},
            "amount_paid": {"amount": 0, "currency": "TND"},
            "payment": None,
            "session": {
                "id": accepted["session_id"],
                "status": "pending_payment",
                "start_at": start.isoformat().replace("+00:00", "Z"),
                "end_at": (start + timedelta(minutes=45)).isoformat().replace("+00:00", "Z"),
                "meet_link": None,
                "calendar_event_id": None,
            },
            "escrow": None,
            "version": 1,
        }

    async def test_overlapping_bookings_sent_at_once_one_wins_the_rest_409_until_it_fails(
        self, orders
    ) -> None:
        offering = await orders.new_offering(duration=60)
        start = orders.future(days=20, hour=9)
        # Ten starts within 45 minutes of each other: every pair of hour-long sessions overlaps.
        answers = await asyncio.gather(
            *(orders.book(offering["id"], start + timedelta(minutes=5 * i)) for i in range(10))
        )
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [202] + [409] * 9, [a.text for a in answers]
        for loser in (a for a in answers if a.status_code == 409):
            assert "slot is taken" in orders.problem(loser, 409)["detail"]
        winner = next(a.json() for a in answers if a.status_code == 202)

        # The losers stored nothing: one order, one session, one BookingRequested.
        stored = await orders.stored(offering)
        assert (stored["orders"], stored["sessions"], stored["events"]) == (1, 1, 1)

        # The winner's payment fails: the slot is free again.
        booked = orders.booked_from(winner, offering)
        await orders.handled(await orders.publish(booked.failed(reason="expired")))
        again = await orders.book(offering["id"], start + timedelta(minutes=30))
        assert again.status_code == 202, again.text

    async def test_back_to_back_sessions_do_not_conflict_but_an_overlap_does(self, orders) -> None:
        offering = await orders.new_offering(duration=60)
        nine = orders.future(days=21, hour=9)
        first = await orders.book(offering["id"], nine)
        right_after = await orders.book(offering["id"], nine + timedelta(hours=1))
        right_before = await orders.book(offering["id"], nine - timedelta(hours=1))
        one_minute_in = await orders.book(offering["id"], nine + timedelta(minutes=59))
        assert [a.status_code for a in (first, right_after, right_before)] == [202, 202, 202]
        orders.problem(one_minute_in, 409)

    async def test_another_mentors_same_time_is_free(self, orders) -> None:
        start = orders.future(days=22, hour=11)
        one, other = await orders.new_offering(), await orders.new_offering()
        assert (await orders.book(one["id"], start)).status_code == 202
        assert (await orders.book(other["id"], start)).status_code == 202


class TestIdempotencyKey:
    async def test_a_replay_answers_the_first_booking_and_stores_and_publishes_nothing_new(
        self, orders
    ) -> None:
        offering = await orders.new_offering()
        sub = f"mentee-{uuid.uuid4().hex[:8]}"
        start = orders.future(days=23)
        first = await orders.book(offering["id"], start, headers=orders.mentee(sub), key="k-1")
        replay = await orders.book(offering["id"], start, headers=orders.mentee(sub), key="k-1")
        assert first.status_code == replay.status_code == 202
        assert replay.json() == first.json()
        assert replay.headers.get("idempotent-replayed") == "true"

        await orders.quiet()
        assert await orders.stored(offering, sub) == {
            "orders": 1,
            "sessions": 1,
            "events": 1,
            "keys": 1,
        }
        assert len(orders.events("BookingRequested", order_id=first.json()["order_id"])) == 1

    async def test_concurrent_replays_make_one_booking_and_all_get_its_answer(self, orders) -> None:
        offering = await orders.new_offering()
        sub = f"mentee-{uuid.uuid4().hex[:8]}"
        start = orders.future(days=24)
        answers = await asyncio.gather(
            *(
                orders.book(offering["id"], start, headers=orders.mentee(sub), key="same")
                for _ in range(8)
            )
        )
        assert {a.status_code for a in answers} == {202}, [a.text for a in answers]
        assert len({a.json()["order_id"] for a in answers}) == 1
        stored = await orders.stored(offering, sub)
        assert (stored["orders"], stored["events"], stored["keys"]) == (1, 1, 1)

    async def test_a_different_body_under_a_used_key_is_422_and_stores_nothing(
        self, orders
    ) -> None:
        offering = await orders.new_offering()
        sub = f"mentee-{uuid.uuid4().hex[:8]}"
        start = orders.future(days=25)
        first = await orders.book(offering["id"], start, headers=orders.mentee(sub), key="k")
        assert first.status_code == 202
        other = await orders.book(
            offering["id"], start + timedelta(hours=3), headers=orders.mentee(sub), key="k"
        )
        assert "Idempotency-Key" in orders.problem(other, 422)["detail"]
        assert (await orders.stored(offering, sub))["orders"] == 1

    async def test_the_same_instant_in_another_offset_is_the_same_request(self, orders) -> None:
        offering = await orders.new_offering()
        sub = f"mentee-{uuid.uuid4().hex[:8]}"
        start = orders.future(days=26, hour=9)
        first = await orders.book(offering["id"], start, headers=orders.mentee(sub), key="tz")
        body = orders.booking(offering["id"], start)
        body["start_at"] = start.isoformat().replace("09:00:00+00:00", "10:00:00+01:00")
        replay = await orders.client.post(
            "/api/bookings", json=body, headers={**orders.mentee(sub), "Idempotency-Key": "tz"}
        )
        assert replay.status_code == 202 and replay.json() == first.json()

    async def test_keys_are_per_mentee(self, orders) -> None:
        offering = await orders.new_offering()
        start = orders.future(days=27, hour=9)
        mine = await orders.book(offering["id"], start, key="shared")
        theirs = await orders.book(offering["id"], start + timedelta(hours=2), key="shared")
        assert mine.status_code == theirs.status_code == 202
        assert mine.json()["order_id"] != theirs.json()["order_id"]

    async def test_a_failed_booking_does_not_spend_its_key(self, orders) -> None:
        offering = await orders.new_offering()
        sub = f"mentee-{uuid.uuid4().hex[:8]}"
        start = orders.future(days=28)
        taken = await orders.book(offering["id"], start)
        assert taken.status_code == 202
        lost = await orders.book(offering["id"], start, headers=orders.mentee(sub), key="retry")
        orders.problem(lost, 409)
        assert (await orders.stored(offering, sub))["keys"] == 0
        later = start + timedelta(hours=2)
        won = await orders.book(offering["id"], later, headers=orders.mentee(sub), key="retry")
        assert won.status_code == 202, won.text


BAD_BOOKINGS: dict[str, tuple[int, dict[str, Any]]] = {
    "unknown offering": (404, {"offering_id": "unknown"}),
    "start in the past": (422, {"start_at": "2001-01-01T09:00:00Z"}),
    "start an hour ago": (422, {"start_at": "an hour ago"}),
    "start past the horizon": (422, {"start_at": "past the horizon"}),
    "start without a time zone": (422, {"start_at": "2031-01-01T09:00:00"}),
    "start at the end of time": (422, {"start_at": "9999-12-31T23:30:00Z"}),
    "malformed email": (422, {"mentee.email": "sami-at-example"}),
    "NUL in a name": (422, {"mentee.first_name": "Sa\u0000mi"}),
    "malformed offering id": (422, {"offering_id": "not-a-uuid"}),
    "extra field": (422, {"coupon": "FREE"}),
    "extra mentee field": (422, {"mentee.role": "admin"}),
    "missing mentee": (422, {"mentee": None}),
}


# Starts relative to the moment of the request (the default horizon is 365 days).
RELATIVE_STARTS: dict[str, Callable[[], datetime]] = {
    "an hour ago": lambda: datetime.now(UTC) - timedelta(hours=1),
    "past the horizon": lambda: datetime.now(UTC) + timedelta(days=366),
}


class TestBadBookings:
    @pytest.mark.parametrize("case", BAD_BOOKINGS, ids=list(BAD_BOOKINGS))
    async def test_bad_input_is_a_problem_and_stores_nothing(self, orders, case: str) -> None:
        status, change = BAD_BOOKINGS[case]
        offering = await orders.new_offering()
        sub = f"mentee-{uuid.uuid4().hex[:8]}"
        body = orders.booking(offering["id"], orders.future(days=29))
        for field, value in change.items():
            target, _, name = field.rpartition(".")
            part = body[target] if target else body
            if value is None:
                del part[name]
            elif field == "offering_id" and value == "unknown":
                part[name] = str(uuid.uuid4())
            elif value in RELATIVE_STARTS:
                part[name] = RELATIVE_STARTS[value]().isoformat()
            else:
                part[name] = value
        answer = await orders.client.post(
            "/api/bookings",
            json=body,
            headers={**orders.mentee(sub), "Idempotency-Key": f"bad-{case}"},
        )
        problem = orders.problem(answer, status)
        if status == 422:
            named = {error["field"] for error in problem["errors"]}
            assert named == {next(iter(change))}, problem
        assert await orders.stored(offering, sub) == {
            "orders": 0,
            "sessions": 0,
            "events": 0,
            "keys": 0,
        }

    @pytest.mark.parametrize(
        ("start", "rule"),
        [
            (lambda: datetime.now(UTC) - timedelta(minutes=5), "is in the past"),
            (lambda: datetime.now(UTC) + timedelta(days=366), "is more than 365 days ahead"),
        ],
        ids=["past", "too far ahead"],
    )
    async def test_a_start_out_of_bounds_is_a_422_naming_start_at_and_the_rule(
        self, orders, start: Callable[[], datetime], rule: str
    ) -> None:
        offering = await orders.new_offering()
        answer = await orders.book(offering["id"], start())
        [error] = orders.problem(answer, 422)["errors"]
        assert error["field"] == "start_at" and rule in error["message"], error
        assert (await orders.stored(offering))["orders"] == 0

    async def test_a_start_within_the_horizon_is_taken(self, orders) -> None:
        offering = await orders.new_offering()
        answer = await orders.book(offering["id"], orders.future(days=364))
        assert answer.status_code == 202, answer.text

    async def test_the_horizon_is_a_setting_in_days(self, serve_orders) -> None:
        async with serve_orders(booking_horizon_days=7) as orders:
            offering = await orders.new_offering()
            within = await orders.book(offering["id"], orders.future(days=6))
            beyond = await orders.book(offering["id"], orders.future(days=8))
            assert within.status_code == 202, within.text
            [error] = orders.problem(beyond, 422)["errors"]
            assert error["field"] == "start_at" and "more than 7 days ahead" in error["message"]

    @pytest.mark.parametrize(
        ("who", "status"),
        [("nobody", 401), ("forged", 401), ("expired", 401), ("admin", 403), ("mentor", 403)],
    )
    async def test_only_a_signed_in_mentee_books(self, orders, who: str, status: int) -> None:
        offering = await orders.new_offering()
        secret = orders.settings.auth_jwt_secret.get_secret_value()
        headers = {
            "nobody": {},
            "forged": {
                "Authorization": "Bearer "
                + issue_token("another-secret-of-32-bytes-or-more!", "m", "mentee")
            },
            "expired": {
                "Authorization": "Bearer " + issue_token(secret, "m", "mentee", ttl_seconds=-60)
            },
            "admin": orders.admin,
            "mentor": orders.token(Role.MENTOR, offering["mentor_id"]),
        }[who]
        answer = await orders.book(offering["id"], orders.future(days=30), headers=headers)
        orders.problem(answer, status)
        assert (await orders.stored(offering))["orders"] == 0

    async def test_an_overlong_idempotency_key_is_refused(self, orders) -> None:
        offering = await orders.new_offering()
        answer = await orders.book(offering["id"], orders.future(days=31), key="k" * 201)
        orders.problem(answer, 422)
        assert (await orders.stored(offering))["orders"] == 0


class TestReadingOrders:
    async def test_the_mentee_and_an_admin_read_the_order_and_nobody_else_does(
        self, orders
    ) -> None:
        booked = await orders.booked()
        path = f"/api/orders/{booked.order_id}"
        mine = await orders.client.get(path, headers=booked.mentee)
        admin = await orders.client.get(path, headers=orders.admin)
        assert mine.status_code == admin.status_code == 200
        assert mine.json() == admin.json()

        orders.problem(await orders.client.get(path, headers=orders.mentee()), 404)
        mentor = orders.token(Role.MENTOR, booked.mentor_id)
        orders.problem(await orders.client.get(path, headers=mentor), 403)
        orders.problem(await orders.client.get(path), 401)
        unknown = f"/api/orders/{uuid.uuid4()}"
        orders.problem(await orders.client.get(unknown, headers=orders.admin), 404)


class TestAdminCancel:
    """POST /api/admin/orders/{id}/cancel: the order cancelled, its slot freed, audited once."""

    async def booked_in(self, orders, status: str, start) -> Any:
        booked = await orders.booked(start)
        if status == "awaiting_payment":
            await orders.handled(await orders.publish(booked.initiated()))
        if status in ("paid", "confirmed", "scheduling_failed"):
            await orders.pay(booked)
        if status == "confirmed":
            await orders.handled(await orders.publish(booked.confirmed()))
        if status == "scheduling_failed":
            await orders.handled(await orders.publish(booked.calendar_failed(final=True)))
        return booked

    async def cancel(self, orders, order_id: str, reason: str = "the mentor is ill", **kw: Any):
        return await orders.client.post(
            f"/api/admin/orders/{order_id}/cancel",
            json={"reason": reason},
            headers=kw.get("headers", orders.admin),
        )

    @pytest.mark.parametrize(
        ("status", "session"),
        [
            ("pending", "pending_payment"),
            ("awaiting_payment", "pending_payment"),
            ("paid", "awaiting_calendar"),
            ("confirmed", "scheduled"),
            ("scheduling_failed", "scheduling_failed"),
        ],
    )
    async def test_a_live_order_is_cancelled_its_slot_freed_announced_and_audited(
        self, orders, status: str, session: str
    ) -> None:
        start = orders.future(days=50, hour=8)
        booked = await self.booked_in(orders, status, start)
        expected_order = "paid" if status == "scheduling_failed" else status
        assert await orders.order_status(booked.order_id) == (expected_order, session)

        answer = await self.cancel(orders, booked.order_id, "  the mentor is ill  ")
        assert answer.status_code == 200, answer.text
        shown = answer.json()
        assert (shown["status"], shown["session"]["status"]) == ("cancelled", "cancelled")
        read = await orders.client.get(f"/api/orders/{booked.order_id}", headers=orders.admin)
        assert read.json() == shown

        await orders.quiet()
        assert orders.events("OrderCancelled", order_id=booked.order_id) == [
            {
                "order_id": booked.order_id,
                "session_id": booked.session_id,
                "mentor_id": booked.mentor_id,
                "reason": "the mentor is ill",
                "by": "admin-1",
            }
        ]
        [audit] = await orders.audit_rows(booked.order_id)
        assert (audit["action"], audit["by"], audit["reason"]) == (
            "cancel_order",
            "admin-1",
            "the mentor is ill",
        )
        assert str(audit["session_id"]) == booked.session_id
        assert expected_order in audit["detail"]
        [recorded] = orders.events("AdminActionRecorded", order_id=booked.order_id)
        assert recorded["action"] == "cancel_order" and recorded["service"] == "orders"
        assert recorded["by"] == "admin-1" and recorded["session_id"] == booked.session_id

        again = await orders.book(booked.offering_id, start)  # the slot is free
        assert again.status_code == 202, again.text

    async def test_the_cancellation_carries_the_bookings_correlation_id(self, orders) -> None:
        booked = await orders.booked()
        assert (await self.cancel(orders, booked.order_id)).status_code == 200
        await orders.quiet()

        def correlation(type_: str) -> set[str]:
            return {
                json.loads(m.body)["correlation_id"]
                for m in orders.spy.of_type(type_)
                if booked.order_id in m.body.decode()
            }

        booking = correlation("BookingRequested")
        assert len(booking) == 1
        assert correlation("OrderCancelled") == booking
        assert correlation("AdminActionRecorded") == booking

    async def test_a_repeat_answers_the_cancelled_order_and_announces_and_audits_nothing_new(
        self, orders
    ) -> None:
        booked = await self.booked_in(orders, "paid", orders.future(days=51))
        first = await self.cancel(orders, booked.order_id)
        repeat = await self.cancel(orders, booked.order_id, "clicked twice")
        assert first.status_code == repeat.status_code == 200
        assert repeat.json() == first.json()

        await orders.quiet()
        assert len(orders.events("OrderCancelled", order_id=booked.order_id)) == 1
        assert len(orders.events("AdminActionRecorded", order_id=booked.order_id)) == 1
        assert await orders.outbox_count("OrderCancelled", booked.order_id) == 1
        assert [a["reason"] for a in await orders.audit_rows(booked.order_id)] == [
            "the mentor is ill"
        ]

    async def test_cancels_sent_at_once_cancel_once(self, orders) -> None:
        booked = await self.booked_in(orders, "confirmed", orders.future(days=52))
        answers = await asyncio.gather(
            *(self.cancel(orders, booked.order_id, f"admin click {i}") for i in range(6))
        )
        assert {a.status_code for a in answers} == {200}, [a.text for a in answers]
        assert len({json.dumps(a.json(), sort_keys=True) for a in answers}) == 1

        await orders.quiet()
        assert len(orders.events("OrderCancelled", order_id=booked.order_id)) == 1
        assert len(await orders.audit_rows(booked.order_id)) == 1

    async def test_an_order_cancelled_without_an_admin_answers_as_it_is(self, orders) -> None:
        booked = await orders.booked()
        unpayable = PaymentInitiationFailed(
            order_id=booked.order_id, reason="konnect_unavailable", detail="503 x 4"
        )
        await orders.handled(await orders.publish(unpayable))

        answer = await self.cancel(orders, booked.order_id)
        assert answer.status_code == 200, answer.text
        assert answer.json()["payment"]["status"] == "initiation_failed"
        await orders.quiet()
        assert orders.events("OrderCancelled", order_id=booked.order_id) == []
        assert await orders.audit_rows(booked.order_id) == []

    async def test_an_order_whose_payment_failed_is_409_and_nothing_changes(self, orders) -> None:
        booked = await orders.booked()
        await orders.handled(await orders.publish(booked.initiated()))
        await orders.handled(await orders.publish(booked.failed(reason="expired")))

        body = orders.problem(await self.cancel(orders, booked.order_id), 409)
        assert "payment_failed" in body["detail"]
        await orders.quiet()
        assert await orders.order_status(booked.order_id) == ("payment_failed", "cancelled")
        assert orders.events("OrderCancelled", order_id=booked.order_id) == []
        assert await orders.audit_rows(booked.order_id) == []

    async def test_an_unknown_order_is_404_and_a_malformed_id_422(self, orders) -> None:
        orders.problem(await self.cancel(orders, str(uuid.uuid4())), 404)
        orders.problem(await self.cancel(orders, "not-an-order-id"), 422)

    @pytest.mark.parametrize(
        ("who", "status"), [("mentee", 403), ("mentor", 403), ("nobody", 401), ("forged", 401)]
    )
    async def test_only_an_admin_cancels(self, orders, who: str, status: int) -> None:
        booked = await orders.booked()
        headers = {
            "mentee": booked.mentee,  # even the order's own mentee
            "mentor": orders.token(Role.MENTOR, booked.mentor_id),
            "nobody": {},
            "forged": {"Authorization": "Bearer not.a.token"},
        }[who]
        orders.problem(await self.cancel(orders, booked.order_id, headers=headers), status)
        assert await orders.order_status(booked.order_id) == ("pending", "pending_payment")
        assert await orders.audit_rows(booked.order_id) == []

    @pytest.mark.parametrize(
        "body",
        [
            {},
            {"reason": ""},
            {"reason": "   "},
            {"reason": "a\u0000b"},
            {"reason": "x" * 1001},
            {"reason": "ill", "by": "someone-else"},
            {"reason": 42},
        ],
        ids=["no reason", "empty", "blank", "NUL", "too long", "extra field", "not text"],
    )
    async def test_a_bad_body_is_422_and_nothing_changes(
        self, orders, body: dict[str, Any]
    ) -> None:
        booked = await orders.booked()
        answer = await orders.client.post(
            f"/api/admin/orders/{booked.order_id}/cancel", json=body, headers=orders.admin
        )
        orders.problem(answer, 422)
        assert await orders.order_status(booked.order_id) == ("pending", "pending_payment")
        assert await orders.audit_rows(booked.order_id) == []

    async def test_a_cancel_waits_for_a_handler_holding_the_order_and_then_sees_its_outcome(
        self, orders
    ) -> None:
        booked = await orders.booked()
        async with orders.runtime.db.transaction() as session:
            # As PaymentFailed's handler would: the order locked, its payment failing.
            stored = await lock_order(session, uuid.UUID(booked.order_id))
            assert stored is not None
            cancel = asyncio.create_task(self.cancel(orders, booked.order_id))

            async def cancel_waits_for_the_lock() -> bool:
                waiting = await orders.scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                )
                return waiting > 0

            await eventually(cancel_waits_for_the_lock, what="the cancel waiting for the lock")
            assert not cancel.done()
            stored.order.status = OrderStatus.PAYMENT_FAILED
            stored.payment_status = PaymentStatus.EXPIRED
            stored.booked.status = SessionStatus.CANCELLED
            await save_order(session, stored)

        orders.problem(await cancel, 409)
        assert await orders.audit_rows(booked.order_id) == []
