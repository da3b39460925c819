"""The public routes: who may call each, and what reaches the owning service."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.responses import JSONResponse

from booking.gateway.upstreams import Service
from booking.runtime.auth import Role, issue_token

MENTOR_ID = "5d0c5b8e-7d0a-4a7e-9f57-1b1e1c7f2a01"
OTHER_MENTOR_ID = "8f3e2a10-2b6c-4c39-a1f4-6c0d9e5b7a02"
ORDER_ID = "0b7e3f0e-3f5a-4a33-8d0e-2c6e4b9f1a03"
OFFERING_ID = "c2a1e4d6-9b8f-4f1e-8a3c-5d7e6f8a9b04"
SESSION_ID = "e4f5a6b7-c8d9-4e0f-a1b2-c3d4e5f6a705"
EVERY_SERVICE = tuple(Service)

MENTOR_BODY = {"name": "Amel Ben Salah", "email": "amel@example.com", "timezone": "Africa/Tunis"}
OFFERING_BODY = {
    "title": "Career chat",
    "duration_minutes": 60,
    "price": {"amount": 120000, "currency": "TND"},
}
BOOKING_BODY = {
    "offering_id": OFFERING_ID,
    "start_at": "2030-05-01T09:00:00+01:00",
    "mentee": {
        "first_name": "Sami",
        "last_name": "Trabelsi",
        "email": "sami@example.com",
        "phone": "+216 20 123 456",
    },
}

# Who may call each route (docs/api.md and docs/recovery.md say so route by route). A mentor's
# routes pass any mentor here: which mentor a token acts as is the owning service's to decide.
ADMIN, SIGNED_IN, MENTEE, MENTEE_OR_ADMIN, MENTOR_OR_ADMIN, ANYONE = (
    "admin",
    "signed in",
    "mentee",
    "mentee or admin",
    "a mentor or admin",
    "anyone",
)


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    service: Service | tuple[Service, ...]  # a tuple: the gateway asks each of them
    who: str
    body: dict[str, Any] | None = None
    status: int = 200
    asks: str | None = None  # the path the service is asked, when not the route's own

    def __str__(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def services(self) -> tuple[Service, ...]:
        return self.service if isinstance(self.service, tuple) else (self.service,)

    @property
    def template(self) -> str:
        path = self.path.split("?")[0].replace(MENTOR_ID, "{mentor_id}")
        path = path.replace(ORDER_ID, "{order_id}").replace(SESSION_ID, "{session_id}")
        path = re.sub(r"/[a-z]+:\d+", "/{dead_letter_id}", path)
        return path.replace("/7", "/{notification_id}")


ROUTES = [
    Route("POST", "/api/mentors", Service.ORDERS, ADMIN, MENTOR_BODY, 201),
    Route("GET", f"/api/mentors/{MENTOR_ID}", Service.ORDERS, SIGNED_IN),
    Route(
        "POST",
        f"/api/mentors/{MENTOR_ID}/offerings",
        Service.ORDERS,
        MENTOR_OR_ADMIN,
        OFFERING_BODY,
        201,
    ),
    Route("GET", f"/api/mentors/{MENTOR_ID}/offerings", Service.ORDERS, SIGNED_IN),
    Route("POST", "/api/bookings", Service.ORDERS, MENTEE, BOOKING_BODY, 202),
    Route("GET", f"/api/orders/{ORDER_ID}", Service.ORDERS, MENTEE_OR_ADMIN),
    # The stand-in's order is confirmed: its stream sends it and ends.
    Route(
        "GET",
        f"/api/orders/{ORDER_ID}/events",
        Service.ORDERS,
        MENTEE_OR_ADMIN,
        asks=f"/api/orders/{ORDER_ID}",
    ),
    Route("GET", "/api/payments/webhook?payment_ref=pay-1", Service.PAYMENTS, ANYONE),
    Route(
        "GET",
        f"/api/mentors/{MENTOR_ID}/calendar/connect",
        Service.CALENDAR,
        MENTOR_OR_ADMIN,
        status=302,
    ),
    Route("GET", "/api/calendar/oauth/callback?code=c&state=s", Service.CALENDAR, ANYONE),
    Route("GET", f"/api/mentors/{MENTOR_ID}/calendar", Service.CALENDAR, MENTOR_OR_ADMIN),
    Route(
        "DELETE",
        f"/api/mentors/{MENTOR_ID}/calendar",
        Service.CALENDAR,
        MENTOR_OR_ADMIN,
        status=204,
    ),
    Route("GET", "/api/admin/notifications?unreadOnly=true", Service.NOTIFICATIONS, ADMIN),
    Route("POST", "/api/admin/notifications/7/read", Service.NOTIFICATIONS, ADMIN),
    Route("POST", "/api/admin/notifications/read-all", Service.NOTIFICATIONS, ADMIN),
    Route("DELETE", "/api/admin/notifications/7", Service.NOTIFICATIONS, ADMIN, status=204),
    Route("GET", "/api/admin/notifications/summary?days=7", Service.NOTIFICATIONS, ADMIN),
    Route("GET", "/api/admin/dead-letters?status=kept", EVERY_SERVICE, ADMIN),
    Route("GET", "/api/admin/dead-letters?service=payments", Service.PAYMENTS, ADMIN),
    Route("POST", "/api/admin/dead-letters/replay", EVERY_SERVICE, ADMIN, {}),
    Route(
        "POST",
        "/api/admin/dead-letters/replay",
        Service.CALENDAR,
        ADMIN,
        {"service": "calendar", "type": "OrderPaid"},
    ),
    Route("GET", "/api/admin/dead-letters/payments:42", Service.PAYMENTS, ADMIN),
    Route("POST", "/api/admin/dead-letters/calendar:7/replay", Service.CALENDAR, ADMIN, {}),
    Route(
        "POST",
        "/api/admin/dead-letters/notifications:3/discard",
        Service.NOTIFICATIONS,
        ADMIN,
        {"reason": "a test message"},
    ),
    Route(
        "POST",
        f"/api/admin/orders/{ORDER_ID}/cancel",
        Service.ORDERS,
        ADMIN,
        {"reason": "the mentor is ill"},
    ),
    Route(
        "POST", f"/api/admin/sessions/{SESSION_ID}/retry-scheduling", Service.CALENDAR, ADMIN, {}
    ),
    Route("GET", f"/api/admin/orders/{ORDER_ID}/escrow", Service.PAYMENTS, ADMIN),
    Route(
        "POST",
        f"/api/admin/orders/{ORDER_ID}/escrow",
        Service.PAYMENTS,
        ADMIN,
        {"action": "release", "reason": "the session took place"},
    ),
    Route(
        "PUT",
        f"/api/admin/mentors/{MENTOR_ID}/identity",
        Service.ORDERS,
        ADMIN,
        {"identity_subject": "auth0|amel", "reason": "the mentor signs in with Auth0"},
    ),
]

# The callers tried on every route, and which of them each rule lets through.
CALLERS = [
    "no token",
    "malformed token",
    "expired token",
    "wrongly signed token",
    "admin",
    "mentee",
    "the mentor",
    "another mentor",
]
ALLOWED = {
    ADMIN: {"admin"},
    SIGNED_IN: {"admin", "mentee", "the mentor", "another mentor"},
    MENTEE: {"mentee"},
    MENTEE_OR_ADMIN: {"mentee", "admin"},
    MENTOR_OR_ADMIN: {"admin", "the mentor", "another mentor"},
    ANYONE: set(CALLERS),
}


def headers_of(system: Any, caller: str) -> dict[str, str]:
    secret = system.settings.auth_jwt_secret.get_secret_value()
    token = {
        "no token": None,
        "malformed token": "not-a-jwt",
        "expired token": issue_token(secret, "someone", Role.ADMIN, ttl_seconds=-60),
        "wrongly signed token": issue_token("another-secret-0123456789abcdef-xyz", "x", Role.ADMIN),
        "admin": system.token(Role.ADMIN),
        "mentee": system.token(Role.MENTEE),
        "the mentor": system.token(Role.MENTOR, MENTOR_ID),
        "another mentor": system.token(Role.MENTOR, OTHER_MENTOR_ID),
    }[caller]
    return {"Authorization": f"Bearer {token}"} if token else {}


def due_status(route: Route, caller: str) -> int:
    if caller in ALLOWED[route.who]:
        return route.status
    return 401 if "token" in caller else 403


class TestAuthMatrix:
    async def test_every_public_route_is_declared(self, system) -> None:
        document = (await system.client.get("/openapi.json")).json()
        declared = {
            f"{method} {path}"
            for path, operations in document["paths"].items()
            for method in (m.upper() for m in operations)
            if not path.startswith("/health")
        }
        # The system's health is the gateway's own answer, 200 or 503 as the system stands:
        # test_monitor tries its callers.
        own = {"GET /api/admin/health"}
        assert declared == {f"{route.method} {route.template}" for route in ROUTES} | own

    @pytest.mark.parametrize("route", ROUTES, ids=str)
    async def test_each_caller_gets_exactly_its_due(self, system, route: Route) -> None:
        wrong = []
        for caller in CALLERS:
            system.forget()
            response = await system.client.request(
                route.method, route.path, json=route.body, headers=headers_of(system, caller)
            )
            due = due_status(route, caller)
            reached = system.received()
            if caller in ALLOWED[route.who]:
                ok = (
                    response.status_code == due
                    and sorted(reached) == sorted(route.services)
                    and all(
                        len(recorded) == 1
                        and recorded[0].method == route.method
                        and recorded[0].path == (route.asks or route.path.split("?")[0])
                        for recorded in reached.values()
                    )
                )
            else:
                ok = (
                    response.status_code == due
                    and not reached
                    and response.headers["content-type"] == "application/problem+json"
                )
            if not ok:
                wrong.append(
                    f"{caller}: {response.status_code} (due {due}), reached {list(reached)}: "
                    f"{response.text[:200]}"
                )
        assert not wrong, "\n".join(wrong)

    @pytest.mark.parametrize(
        ("method", "path", "service"),
        [
            ("POST", f"/api/mentors/{MENTOR_ID}/offerings", Service.ORDERS),
            ("GET", f"/api/mentors/{MENTOR_ID}/calendar/connect", Service.CALENDAR),
            ("GET", f"/api/mentors/{MENTOR_ID}/calendar", Service.CALENDAR),
            ("DELETE", f"/api/mentors/{MENTOR_ID}/calendar", Service.CALENDAR),
        ],
    )
    async def test_the_owning_service_refuses_another_mentor_and_its_problem_comes_back(
        self, system, method: str, path: str, service: Service
    ) -> None:
        # The gateway cannot tell which mentor a provider's subject is: the service can.
        problem = {
            "type": "about:blank",
            "title": "Forbidden",
            "status": 403,
            "detail": "a mentor may act only on their own calendar",
            "instance": path,
        }
        system.upstreams[service].answer = lambda _: JSONResponse(
            problem, 403, media_type="application/problem+json"
        )
        headers = system.auth(Role.MENTOR, "auth0|someone-else")
        body = OFFERING_BODY if method == "POST" else None

        response = await system.client.request(method, path, json=body, headers=headers)

        assert response.status_code == 403
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json() == problem
        [seen] = system.upstreams[service].requests
        assert seen.headers["authorization"] == headers["Authorization"]


class TestForwarding:
    async def test_path_query_body_and_identity_reach_the_service(self, system) -> None:
        headers = {**system.auth(Role.MENTOR, MENTOR_ID), "X-Correlation-ID": "booking-42"}
        response = await system.client.post(
            f"/api/mentors/{MENTOR_ID}/offerings?draft=yes&note=a%20b",
            json=OFFERING_BODY,
            headers=headers,
        )

        assert response.status_code == 201
        assert response.json()["title"] == "Career chat"
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-correlation-id"] == "booking-42"
        [seen] = system.upstreams[Service.ORDERS].requests
        assert seen.method == "POST"
        assert seen.path == f"/api/mentors/{MENTOR_ID}/offerings"
        assert seen.query == "draft=yes&note=a%20b"
        assert json.loads(seen.body) == OFFERING_BODY
        assert seen.headers["authorization"] == headers["Authorization"]
        assert seen.headers["x-correlation-id"] == "booking-42"

    async def test_a_correlation_id_is_made_when_the_caller_sends_none(self, system) -> None:
        response = await system.client.get(
            f"/api/mentors/{MENTOR_ID}", headers=system.auth(Role.MENTEE)
        )
        [seen] = system.upstreams[Service.ORDERS].requests
        assert seen.headers["x-correlation-id"] == response.headers["x-correlation-id"]

    async def test_the_idempotency_key_reaches_the_service(self, system) -> None:
        await system.client.post(
            "/api/bookings",
            json=BOOKING_BODY,
            headers={**system.auth(Role.MENTEE), "Idempotency-Key": "try-1"},
        )
        [seen] = system.upstreams[Service.ORDERS].requests
        assert seen.headers["idempotency-key"] == "try-1"
        assert json.loads(seen.body)["start_at"] == "2030-05-01T09:00:00+01:00"

    async def test_the_services_errors_come_back_as_they_are(self, system) -> None:
        problem = {"title": "Conflict", "status": 409, "detail": "the slot is taken"}
        system.upstreams[Service.ORDERS].answer = lambda _: JSONResponse(
            problem, 409, media_type="application/problem+json"
        )
        response = await system.client.post(
            "/api/bookings", json=BOOKING_BODY, headers=system.auth(Role.MENTEE)
        )
        assert response.status_code == 409
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json() == problem

    async def test_an_orders_422_comes_back_as_the_same_problem(self, system) -> None:
        # The price's maximum and the booking horizon are orders' settings: the gateway lets the
        # body through and its refusal back, byte for byte.
        problem = {
            "type": "about:blank",
            "title": "Unprocessable Entity",
            "status": 422,
            "detail": "the request is not valid: price.amount: the price 10000.001 TND is above "
            "the most an offering may cost, 10000.000 TND",
            "instance": f"/api/mentors/{MENTOR_ID}/offerings",
            "errors": [{"field": "price.amount", "message": "the price 10000.001 TND is above"}],
        }
        system.upstreams[Service.ORDERS].answer = lambda _: JSONResponse(
            problem, 422, media_type="application/problem+json"
        )
        body = {**OFFERING_BODY, "price": {"amount": 10_000_001, "currency": "TND"}}
        response = await system.client.post(
            f"/api/mentors/{MENTOR_ID}/offerings", json=body, headers=system.auth(Role.ADMIN)
        )
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json() == problem
        [seen] = system.upstreams[Service.ORDERS].requests
        assert json.loads(seen.body) == body

    async def test_the_google_redirect_comes_back_unfollowed(self, system) -> None:
        response = await system.client.get(
            f"/api/mentors/{MENTOR_ID}/calendar/connect", headers=system.auth(Role.ADMIN)
        )
        assert response.status_code == 302
        assert response.headers["location"] == "https://google.example/o"

    async def test_a_webhook_without_payment_ref_is_refused_here(self, system) -> None:
        response = await system.client.get("/api/payments/webhook")
        assert response.status_code == 400
        assert "payment_ref" in response.json()["detail"]
        assert not system.received()


class TestValidation:
    @pytest.mark.parametrize(
        "body",
        [
            {**OFFERING_BODY, "discount": 5},
            {**OFFERING_BODY, "price": {"amount": 1.5, "currency": "TND"}},
            {**OFFERING_BODY, "price": {"amount": 1000, "currency": "tnd"}},
            {**OFFERING_BODY, "price": {"amount": 1000, "currency": "TND", "x": 1}},
            {**OFFERING_BODY, "duration_minutes": "sixty"},
            {**OFFERING_BODY, "price": {"amount": 0, "currency": "TND"}},
            {**OFFERING_BODY, "price": {"amount": 1000, "currency": "XYZ"}},
            {**OFFERING_BODY, "price": {"amount": 1_000_000_001, "currency": "TND"}},
            {**OFFERING_BODY, "duration_minutes": 10},
            {**OFFERING_BODY, "duration_minutes": 481},
        ],
        ids=[
            "unknown field",
            "float money",
            "lower-case currency",
            "unknown money field",
            "type",
            "zero price",
            "a currency Konnect does not take",
            "over the contract's ceiling",
            "too short",
            "too long",
        ],
    )
    async def test_a_body_off_the_contract_is_422_and_goes_nowhere(
        self, system, body: dict[str, Any]
    ) -> None:
        response = await system.client.post(
            f"/api/mentors/{MENTOR_ID}/offerings", json=body, headers=system.auth(Role.ADMIN)
        )
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"
        assert not system.received()

    async def test_a_start_without_a_timezone_is_422(self, system) -> None:
        body = {**BOOKING_BODY, "start_at": "2030-05-01T09:00:00"}
        response = await system.client.post(
            "/api/bookings", json=body, headers=system.auth(Role.MENTEE)
        )
        assert response.status_code == 422
        assert "start_at" in response.json()["detail"]

    async def test_an_id_that_is_no_uuid_is_422(self, system) -> None:
        response = await system.client.get("/api/mentors/42", headers=system.auth(Role.ADMIN))
        assert response.status_code == 422
        assert not system.received()


class TestMentorIdentity:
    """PUT /api/admin/mentors/{id}/identity and a mentor's registration with a subject: checked
    here against the contract, sent on to orders as checked."""

    async def test_the_checked_link_reaches_orders(self, system) -> None:
        body = {"identity_subject": "  auth0|amel  ", "reason": " moved to Auth0 "}
        response = await system.client.put(
            f"/api/admin/mentors/{MENTOR_ID}/identity", json=body, headers=system.auth(Role.ADMIN)
        )

        assert response.status_code == 200, response.text
        assert response.json()["identity_subject"] == "auth0|amel"
        [seen] = system.upstreams[Service.ORDERS].requests
        assert (seen.method, seen.path) == ("PUT", f"/api/admin/mentors/{MENTOR_ID}/identity")
        sent = json.loads(seen.body)
        assert sent == {"identity_subject": "auth0|amel", "reason": "moved to Auth0"}

    async def test_a_registration_with_a_subject_reaches_orders(self, system) -> None:
        body = {**MENTOR_BODY, "identity_subject": "kc-7d0a4a7e"}
        response = await system.client.post(
            "/api/mentors", json=body, headers=system.auth(Role.ADMIN)
        )
        assert response.status_code == 201, response.text
        [seen] = system.upstreams[Service.ORDERS].requests
        assert json.loads(seen.body)["identity_subject"] == "kc-7d0a4a7e"

    @pytest.mark.parametrize(
        "body",
        [
            {"reason": "r"},
            {"identity_subject": "auth0|amel"},
            {"identity_subject": "", "reason": "r"},
            {"identity_subject": "auth0 amel", "reason": "r"},
            {"identity_subject": "x" * 256, "reason": "r"},
            {"identity_subject": "auth0|amel", "reason": "r", "mentor_id": MENTOR_ID},
        ],
        ids=["no subject", "no reason", "empty", "a space", "too long", "unknown field"],
    )
    async def test_a_bad_link_is_422_and_goes_nowhere(self, system, body: dict[str, Any]) -> None:
        response = await system.client.put(
            f"/api/admin/mentors/{MENTOR_ID}/identity", json=body, headers=system.auth(Role.ADMIN)
        )
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"
        assert not system.received()

    async def test_a_bad_subject_at_registration_is_422_and_goes_nowhere(self, system) -> None:
        body = {**MENTOR_BODY, "identity_subject": "auth0|\u00e9"}
        response = await system.client.post(
            "/api/mentors", json=body, headers=system.auth(Role.ADMIN)
        )
        assert response.status_code == 422
        assert not system.received()
