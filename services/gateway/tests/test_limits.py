"""Limits: oversized bodies are a 413, a flood of unauthenticated requests a 429."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from booking.gateway.limits import RateLimiter
from booking.gateway.upstreams import Service
from booking.runtime.auth import Role

MENTOR_BODY = {"name": "Amel", "email": "amel@example.com", "timezone": "Africa/Tunis"}


class TestBodySize:
    async def test_a_declared_oversized_body_is_413_before_anything_else(
        self, start_system: Any
    ) -> None:
        async with start_system(max_body_bytes=1024) as system:
            response = await system.client.post(
                "/api/mentors",
                content=b'{"name": "' + b"a" * 5000 + b'"}',
                headers={**system.auth(Role.ADMIN), "Content-Type": "application/json"},
            )
            assert not system.received()

        assert response.status_code == 413
        assert response.headers["content-type"] == "application/problem+json"
        assert "1024 bytes" in response.json()["detail"]
        assert "x-correlation-id" in response.headers

    async def test_a_streamed_oversized_body_is_413(self, start_system: Any) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"x" * 512

        async with start_system(max_body_bytes=1024) as system:
            response = await system.client.post(
                "/api/mentors",
                content=chunks(),  # no Content-Length: chunked
                headers={**system.auth(Role.ADMIN), "Content-Type": "application/json"},
            )
            assert not system.received()

        assert response.status_code == 413
        assert response.headers["content-type"] == "application/problem+json"

    async def test_a_body_within_the_limit_goes_through(self, start_system: Any) -> None:
        async with start_system(max_body_bytes=1024) as system:
            response = await system.client.post(
                "/api/mentors", json=MENTOR_BODY, headers=system.auth(Role.ADMIN)
            )
        assert response.status_code == 201


class TestRateLimit:
    async def test_a_flood_of_webhooks_is_turned_away_with_429(self, start_system: Any) -> None:
        async with start_system(webhook_rate_limit_per_minute=5) as system:
            responses = await asyncio.gather(
                *(system.client.get("/api/payments/webhook?payment_ref=p") for _ in range(40))
            )
            reached = len(system.upstreams[Service.PAYMENTS].requests)

        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) == reached == 5
        assert statuses.count(429) == 35
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["content-type"] == "application/problem+json"
        assert 1 <= int(refused.headers["retry-after"]) <= 60

    async def test_the_webhook_and_the_oauth_callback_are_limited_apart(
        self, start_system: Any
    ) -> None:
        limits = {"rate_limit_per_minute": 2, "webhook_rate_limit_per_minute": 50}
        async with start_system(**limits) as system:
            webhooks = [
                (await system.client.get("/api/payments/webhook?payment_ref=p")).status_code
                for _ in range(10)
            ]
            callbacks = [
                (await system.client.get("/api/calendar/oauth/callback?code=c&state=s")).status_code
                for _ in range(3)
            ]
        assert webhooks == [200] * 10  # Konnect's notifications are not held to the browsers' limit
        assert callbacks == [200, 200, 429]

    async def test_routes_with_a_token_are_not_limited(self, start_system: Any) -> None:
        async with start_system(rate_limit_per_minute=2) as system:
            admin = system.auth(Role.ADMIN)
            statuses = [
                (await system.client.get("/api/admin/notifications", headers=admin)).status_code
                for _ in range(6)
            ]
        assert statuses == [200] * 6


class TestRateLimiter:
    def test_the_count_starts_again_each_minute(self) -> None:
        now = [120.0]
        limiter = RateLimiter(2, clock=lambda: now[0])

        assert limiter.retry_after("a") is None
        assert limiter.retry_after("a") is None
        assert limiter.retry_after("b") is None
        now[0] = 150.0
        assert limiter.retry_after("a") == 30
        now[0] = 180.0
        assert limiter.retry_after("a") is None
