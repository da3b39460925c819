"""Who the client is: the peer, or, behind trusted proxies, the address they say they were
reached from. The one rule for a client's address (uvicorn's own X-Forwarded-For handling is
off in every service), used by the rate limits and by the X-Forwarded-For sent to the services.

Each proxy appends the address it was connected from to X-Forwarded-For, so only the entries
that trusted proxies appended can be believed, and those are at the right. The header is read
from the right while the hop is a trusted proxy; the first address that is not one is the
client. Entries further left are whatever the client sent and are never read, so prepending
fake entries changes nothing. An entry that is not a plain address (a port, brackets, `unknown`,
an empty one) ends the walk at the trusted hop that appended it: nothing better founded is known,
and the hop is an address the client cannot choose. A chain of trusted hops only is a call from
inside the trusted networks: its leftmost hop is the client.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from fastapi import Request

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
Networks = tuple[IPNetwork, ...]

LOOPBACK: Networks = (ip_network("127.0.0.0/8"), ip_network("::1/128"))


def parse_networks(value: object) -> Networks:
    """Addresses and CIDR networks, IPv4 or IPv6, comma-separated (`10.0.0.0/8, fd00::/8`) or
    as a sequence; empty for none. Host bits under a prefix (`10.0.0.1/8`) are refused as a
    likely typo rather than widened."""
    if isinstance(value, str):
        items: list[object] = [item.strip() for item in value.split(",") if item.strip()]
    elif isinstance(value, list | tuple | set | frozenset):
        items = list(value)
    else:
        raise ValueError("expected IP addresses or CIDR networks, comma-separated")
    networks = []
    for item in items:
        try:
            networks.append(ip_network(item))  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"{exc}; expected IP addresses or CIDR networks, comma-separated"
            ) from None
    return tuple(networks)


def parse_address(text: str) -> IPAddress | None:
    """`text` as an IP address (an IPv4-mapped IPv6 one as the IPv4 address); None if it is not
    exactly one."""
    try:
        address = ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:10.1.2.3 from a dual-stack socket is 10.1.2.3
    return address


def within(address: IPAddress | None, networks: Networks) -> bool:
    return address is not None and any(address in network for network in networks)


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: Networks
) -> IPAddress | None:
    """The client's address, from the connection's `peer`, the X-Forwarded-For header's values
    in order (`forwarded_for`) and the `trusted` proxies' networks (the module's rule). None
    when the peer is not an IP address (a Unix socket)."""
    hop = parse_address(peer) if peer is not None else None
    if hop is None or not within(hop, trusted):
        return hop
    for entry in reversed(",".join(forwarded_for).split(",")):
        appended = parse_address(entry)
        if appended is None:
            break  # malformed (or no header): the trusted hop that handed it on is the client
        hop = appended
        if not within(hop, trusted):
            break
    return hop


def request_client(request: Request) -> IPAddress | None:
    """The client of `request`, by the gateway's TRUSTED_PROXIES (kept on the app's state; an
    app without them trusts no proxy)."""
    return client_address(
        request.client.host if request.client else None,
        request.headers.getlist("x-forwarded-for"),
        getattr(request.app.state, "trusted_proxies", ()),
    )
