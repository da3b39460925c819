"""Forwarding failures: an unreachable or slow service is a quick 503 or 504, never a hang."""

from __future__ import annotations

import time
from typing import Any

from fastapi.responses import JSONResponse, PlainTextResponse

from booking.gateway.upstreams import Service
from booking.runtime.auth import Role

MENTOR_ID = "5d0c5b8e-7d0a-4a7e-9f57-1b1e1c7f2a01"
PROBLEM = "application/problem+json"


class TestUnreachable:
    async def test_a_closed_port_is_a_quick_503_naming_the_service(self, start_system: Any) -> None:
        async with start_system(down={Service.PAYMENTS}) as system:
            started = time.monotonic()
            response = await system.client.get("/api/payments/webhook?payment_ref=p1")
            elapsed = time.monotonic() - started

        assert response.status_code == 503
        assert response.headers["content-type"] == PROBLEM
        assert "payments service cannot be reached" in response.json()["detail"]
        # Refused at once: not held for the upstream timeout (10 s by default).
        assert elapsed < system.settings.upstream_timeout_seconds / 2

    async def test_the_other_services_keep_working(self, start_system: Any) -> None:
        async with start_system(down={Service.PAYMENTS, Service.CALENDAR}) as system:
            admin = system.auth(Role.ADMIN)
            mentor = await system.client.get(f"/api/mentors/{MENTOR_ID}", headers=admin)
            feed = await system.client.get("/api/admin/notifications", headers=admin)
            calendar = await system.client.get(f"/api/mentors/{MENTOR_ID}/calendar", headers=admin)

        assert (mentor.status_code, feed.status_code) == (200, 200)
        assert calendar.status_code == 503
        assert "calendar" in calendar.json()["detail"]


class TestSlow:
    async def test_a_service_slower_than_the_timeout_is_a_504_within_the_bound(
        self, start_system: Any
    ) -> None:
        async with start_system(upstream_timeout_seconds=0.3) as system:
            system.upstreams[Service.ORDERS].delay = 30
            started = time.monotonic()
            response = await system.client.get(
                f"/api/mentors/{MENTOR_ID}", headers=system.auth(Role.ADMIN)
            )
            elapsed = time.monotonic() - started
            system.upstreams[Service.ORDERS].delay = 0
            after = await system.client.get(
                f"/api/mentors/{MENTOR_ID}", headers=system.auth(Role.ADMIN)
            )

        assert response.status_code == 504
        assert response.headers["content-type"] == PROBLEM
        assert "orders service did not answer within 0.3s" in response.json()["detail"]
        assert 0.3 <= elapsed < 10  # given up at its timeout, not after the service's 30 s
        assert after.status_code == 200


class TestServiceErrors:
    async def test_a_service_crash_is_a_502_problem_without_its_body(self, system: Any) -> None:
        system.upstreams[Service.NOTIFICATIONS].answer = lambda _: PlainTextResponse(
            "Traceback (most recent call last): secret stuff", 500
        )
        response = await system.client.get(
            "/api/admin/notifications", headers=system.auth(Role.ADMIN)
        )

        assert response.status_code == 502
        assert response.headers["content-type"] == PROBLEM
        assert "notifications service failed (500)" in response.json()["detail"]
        assert "Traceback" not in response.text

    async def test_a_services_own_503_problem_passes_as_it_is(self, system: Any) -> None:
        problem = {"title": "Service Unavailable", "status": 503, "detail": "Konnect is down"}
        system.upstreams[Service.PAYMENTS].answer = lambda _: JSONResponse(
            problem, 503, media_type=PROBLEM, headers={"Retry-After": "30"}
        )
        response = await system.client.get("/api/payments/webhook?payment_ref=p1")

        assert response.status_code == 503
        assert response.json() == problem
        assert response.headers["retry-after"] == "30"
