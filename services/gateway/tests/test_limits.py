"""Limits: oversized bodies are a 413, a flood of unauthenticated requests a 429, counted per
client address (booking.gateway.forwarded), Konnect's own addresses exempt from the webhook's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx

from booking.gateway.forwarded import parse_address, parse_networks
from booking.gateway.limits import RateLimiter
from booking.gateway.upstreams import Service
from booking.runtime.auth import Role

MENTOR_BODY = {"name": "Amel", "email": "amel@example.com", "timezone": "Africa/Tunis"}
STRANGER = "203.0.113.9"  # an address on the internet, neither Konnect nor a proxy
KONNECT = "198.51.100.20"
INGRESS = "10.0.0.7"  # an ingress controller's pod
WEBHOOK = "/api/payments/webhook?payment_ref=p"
CALLBACK = "/api/calendar/oauth/callback?code=c&state=s"
# A secret of its own: outside development mode the built-in one is not for serving.
DEPLOYED = {"development_mode": False, "auth_jwt_secret": "a-deployed-signing-secret-0123456789"}


async def statuses(client: httpx.AsyncClient, path: str, times: int, **kwargs: Any) -> list[int]:
    return [(await client.get(path, **kwargs)).status_code for _ in range(times)]


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
            caller = system.peer(STRANGER)
            responses = await asyncio.gather(
                *(caller.get("/api/payments/webhook?payment_ref=p") for _ in range(40))
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
            caller = system.peer(STRANGER)
            webhooks = [
                (await caller.get("/api/payments/webhook?payment_ref=p")).status_code
                for _ in range(10)
            ]
            callbacks = [
                (await caller.get("/api/calendar/oauth/callback?code=c&state=s")).status_code
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


class TestTheClientsAddress:
    async def test_a_forwarded_header_from_an_untrusted_peer_changes_nothing(
        self, start_system: Any
    ) -> None:
        async with start_system(rate_limit_per_minute=2, trusted_proxies="10.0.0.0/8") as system:
            caller = system.peer(STRANGER)
            found = [
                await caller.get(CALLBACK, headers={"X-Forwarded-For": f"198.51.100.{n}"})
                for n in range(3)
            ]

        assert [r.status_code for r in found] == [200, 200, 429]
        assert STRANGER in found[-1].json()["detail"]

    async def test_through_a_trusted_proxy_the_client_cannot_escape_by_prepending_entries(
        self, start_system: Any
    ) -> None:
        async with start_system(rate_limit_per_minute=2, trusted_proxies="10.0.0.0/8") as system:
            ingress = system.peer(INGRESS)

            def as_seen_by_the_ingress(client: str, claimed: str) -> dict[str, str]:
                return {"X-Forwarded-For": f"{claimed}, {client}"}  # it appends its peer

            cheater = [
                await ingress.get(CALLBACK, headers=as_seen_by_the_ingress(STRANGER, fake))
                for fake in ("198.51.100.1", "10.0.0.8", "203.0.113.10")
            ]
            # The ingress is no client: someone else behind it has a limit of their own.
            other = await statuses(
                ingress, CALLBACK, 2, headers=as_seen_by_the_ingress("203.0.113.50", STRANGER)
            )

        assert [r.status_code for r in cheater] == [200, 200, 429]
        assert STRANGER in cheater[-1].json()["detail"]
        assert other == [200, 200]

    async def test_an_ipv6_client_is_limited_by_its_64_block(self, start_system: Any) -> None:
        async with start_system(rate_limit_per_minute=2, trusted_proxies="fd00::/8") as system:
            ingress = system.peer("fd00::7")
            # Through the ingress, two addresses of one /64, then one of the next /64.
            first = await statuses(
                ingress, CALLBACK, 2, headers={"X-Forwarded-For": "2001:db8:1:2::1"}
            )
            same_block = await statuses(
                ingress, CALLBACK, 1, headers={"X-Forwarded-For": "2001:db8:1:2:ffff::9"}
            )
            next_block = await statuses(
                ingress, CALLBACK, 1, headers={"X-Forwarded-For": "2001:db8:1:3::1"}
            )
            direct = await statuses(system.peer("2001:db8:9::1"), CALLBACK, 3)

        assert (first, same_block, next_block) == ([200, 200], [429], [200])
        assert direct == [200, 200, 429]


class TestTheWebhooksAddressRules:
    async def test_anyone_but_konnect_gets_the_low_limit_by_default(
        self, start_system: Any
    ) -> None:
        async with start_system() as system:  # the default limits
            found = await statuses(system.peer(STRANGER), WEBHOOK, 61)
            refused = await system.peer(STRANGER).get(WEBHOOK)

        assert found == [200] * 60 + [429]
        assert refused.headers["content-type"] == "application/problem+json"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert "at most 60 a minute" in refused.json()["detail"]

    async def test_konnects_addresses_are_never_held_back(self, start_system: Any) -> None:
        limits = {"webhook_rate_limit_per_minute": 2, "konnect_webhook_sources": "198.51.100.0/24"}
        async with start_system(**limits, trusted_proxies="10.0.0.0/8") as system:
            direct = await statuses(system.peer(KONNECT), WEBHOOK, 10)
            via_ingress = await statuses(
                system.peer(INGRESS), WEBHOOK, 10, headers={"X-Forwarded-For": KONNECT}
            )
            # Claiming to be Konnect, to the left of what the ingress appended, is worth nothing.
            pretender = await statuses(
                system.peer(INGRESS),
                WEBHOOK,
                3,
                headers={"X-Forwarded-For": f"{KONNECT}, {STRANGER}"},
            )
            reached = len(system.upstreams[Service.PAYMENTS].requests)

        assert direct == via_ingress == [200] * 10
        assert pretender == [200, 200, 429]
        assert reached == 22

    async def test_loopback_is_exempt_in_development_mode(self, start_system: Any) -> None:
        async with start_system(webhook_rate_limit_per_minute=2, development_mode=True) as system:
            served = await statuses(system.client, WEBHOOK, 5)  # the real server, from 127.0.0.1
            ipv6 = await statuses(system.peer("::1"), WEBHOOK, 5)
            stranger = await statuses(system.peer(STRANGER), WEBHOOK, 3)

        assert served == ipv6 == [200] * 5
        assert stranger == [200, 200, 429]

    async def test_loopback_is_limited_like_anyone_outside_development_mode(
        self, start_system: Any
    ) -> None:
        async with start_system(webhook_rate_limit_per_minute=2, **DEPLOYED) as system:
            served = await statuses(system.client, WEBHOOK, 3)
            ipv6 = await statuses(system.peer("::1"), WEBHOOK, 3)

        assert served == ipv6 == [200, 200, 429]


class TestRateLimiter:
    def test_the_count_starts_again_each_minute(self) -> None:
        now = [120.0]
        limiter = RateLimiter(2, clock=lambda: now[0])
        a, b = parse_address("192.0.2.1"), parse_address("192.0.2.2")

        assert limiter.retry_after(a) is None
        assert limiter.retry_after(a) is None
        assert limiter.retry_after(b) is None
        now[0] = 150.0
        assert limiter.retry_after(a) == 30
        now[0] = 180.0
        assert limiter.retry_after(a) is None

    def test_a_flood_of_distinct_addresses_is_held_to_a_bounded_table(self) -> None:
        now = [0.0]
        limiter = RateLimiter(5, max_clients=100, clock=lambda: now[0])
        known = parse_address("192.0.2.1")
        assert limiter.retry_after(known) is None

        flood = [
            parse_address(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}") for n in range(20_000)
        ]
        allowed = sum(limiter.retry_after(address) is None for address in flood)

        assert limiter.tracked == 100  # the table stopped growing at its cap
        # 99 flooders had a place of their own; the 19,901 after them shared one count of 5.
        assert allowed == 99 + 5
        assert limiter.retry_after(known) is None  # a client counted before keeps its own count
        now[0] = 60.0
        assert limiter.retry_after(flood[-1]) is None  # a new minute, a new table
        assert limiter.tracked == 1

    def test_exempt_addresses_are_not_counted(self) -> None:
        limiter = RateLimiter(1, exempt=parse_networks("198.51.100.0/24, ::1"))
        for address in ("198.51.100.20", "198.51.100.21", "::1"):
            for _ in range(3):
                assert limiter.retry_after(parse_address(address)) is None
        assert limiter.tracked == 0
        assert limiter.retry_after(parse_address("203.0.113.9")) is None
        assert limiter.retry_after(parse_address("203.0.113.9")) is not None
