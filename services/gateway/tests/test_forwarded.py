"""forwarded: who the client is; X-Forwarded-For is read from trusted proxies only."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from booking.gateway.forwarded import client_address, parse_networks
from booking.gateway.settings import GatewaySettings
from booking.gateway.upstreams import Service

INGRESS = parse_networks("10.0.0.0/8, fd00::/8")
PROXY = "10.0.0.7"  # an ingress controller's pod


def client(peer: str | None, *forwarded_for: str, trusted=INGRESS) -> str | None:
    found = client_address(peer, list(forwarded_for), trusted)
    return None if found is None else str(found)


class TestWithoutTrustedProxies:
    def test_the_peer_is_the_client_whatever_the_header_says(self) -> None:
        assert client("203.0.113.9", "198.51.100.1", trusted=()) == "203.0.113.9"
        assert client(PROXY, "198.51.100.1", trusted=()) == PROXY

    def test_an_untrusted_peers_header_is_ignored(self) -> None:
        assert client("203.0.113.9", "198.51.100.1, 10.0.0.8") == "203.0.113.9"


class TestThroughTrustedProxies:
    def test_the_address_the_proxy_was_reached_from_is_the_client(self) -> None:
        assert client(PROXY, "198.51.100.7") == "198.51.100.7"

    def test_entries_the_client_prepended_are_never_read(self) -> None:
        # The client sent "X-Forwarded-For: 203.0.113.1, 10.0.0.3"; the ingress appended its peer.
        assert client(PROXY, "203.0.113.1, 10.0.0.3, 198.51.100.7") == "198.51.100.7"

    def test_a_chain_of_trusted_proxies_is_walked_from_the_right(self) -> None:
        assert client(PROXY, "203.0.113.1, 198.51.100.7, 10.1.2.3, 10.0.0.9") == "198.51.100.7"

    def test_several_header_lines_are_one_list_in_order(self) -> None:
        assert client(PROXY, "203.0.113.1", "198.51.100.7, 10.0.0.9") == "198.51.100.7"

    def test_a_caller_inside_the_trusted_networks_is_the_leftmost_hop(self) -> None:
        assert client(PROXY, "10.2.0.1, 10.0.0.9") == "10.2.0.1"

    def test_no_header_leaves_the_proxy_as_the_client(self) -> None:
        assert client(PROXY) == PROXY

    @pytest.mark.parametrize(
        "malformed", ["unknown", "198.51.100.7:5000", "[2001:db8::1]", "", "198.51.100.300"]
    )
    def test_a_malformed_entry_ends_the_walk_at_the_hop_that_appended_it(
        self, malformed: str
    ) -> None:
        # Nothing left of a malformed entry is believed: a client cannot pick its address so.
        assert client(PROXY, f"198.51.100.1, {malformed}") == PROXY
        assert client(PROXY, f"198.51.100.1, {malformed}, 10.0.0.9") == "10.0.0.9"

    def test_ipv6_clients_and_proxies(self) -> None:
        assert client("fd00::7", "2001:db8::1, 2001:db8:1::5") == "2001:db8:1::5"
        assert client("fd00::7", "2001:db8:1::5, fd00::9") == "2001:db8:1::5"
        assert client("2001:db8::66", "198.51.100.1") == "2001:db8::66"  # not trusted

    def test_an_ipv4_mapped_peer_is_its_ipv4_address(self) -> None:
        # A dual-stack socket shows an IPv4 peer as ::ffff:a.b.c.d.
        assert client("::ffff:10.0.0.7", "198.51.100.7") == "198.51.100.7"
        assert client("::ffff:203.0.113.9", trusted=()) == "203.0.113.9"

    def test_a_peer_that_is_no_ip_address_is_no_client_address(self) -> None:
        assert client(None, "198.51.100.7") is None
        assert client("/run/gateway.sock", "198.51.100.7") is None


class TestTheSettings:
    def test_none_by_default(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("TRUSTED_PROXIES", raising=False)
        monkeypatch.delenv("KONNECT_WEBHOOK_SOURCES", raising=False)
        settings = GatewaySettings()
        assert settings.trusted_proxies == settings.konnect_webhook_sources == ()

    def test_addresses_and_networks_comma_separated(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("TRUSTED_PROXIES", "10.0.0.0/8, 192.0.2.7,fd00::/8,")
        monkeypatch.setenv("KONNECT_WEBHOOK_SOURCES", "198.51.100.0/24")
        settings = GatewaySettings()
        assert [str(n) for n in settings.trusted_proxies] == [
            "10.0.0.0/8",
            "192.0.2.7/32",
            "fd00::/8",
        ]
        assert [str(n) for n in settings.konnect_webhook_sources] == ["198.51.100.0/24"]

    @pytest.mark.parametrize("bad", ["ingress-nginx", "10.0.0.0/33", "10.0.0.1/8", "*"])
    def test_anything_else_stops_the_gateway_from_starting(
        self, monkeypatch: pytest.MonkeyPatch, bad: str
    ) -> None:
        monkeypatch.setenv("TRUSTED_PROXIES", f"10.0.0.0/8,{bad}")
        with pytest.raises(ValidationError, match="trusted_proxies"):
            GatewaySettings()


class TestWhatTheServicesAreTold:
    async def test_the_client_address_alone_whatever_the_client_wrote(
        self, start_system: Any
    ) -> None:
        async with start_system(trusted_proxies="10.0.0.0/8") as system:
            spoofed = {"X-Forwarded-For": "203.0.113.1"}
            via_ingress = {"X-Forwarded-For": "203.0.113.1, 198.51.100.7"}
            await system.peer("198.51.100.20").get(
                "/api/payments/webhook?payment_ref=a", headers=spoofed
            )
            await system.peer(PROXY).get("/api/payments/webhook?payment_ref=b", headers=via_ingress)
            await system.client.get("/api/payments/webhook?payment_ref=c", headers=spoofed)
            told = [
                r.headers["x-forwarded-for"] for r in system.upstreams[Service.PAYMENTS].requests
            ]

        # The last through the real server: uvicorn did not rewrite its loopback peer either.
        assert told == ["198.51.100.20", "198.51.100.7", "127.0.0.1"]
