"""Settings of the gateway service (docs/settings.md)."""

from typing import Annotated

from pydantic import BeforeValidator, Field
from pydantic_settings import NoDecode

from booking.gateway.forwarded import Networks, parse_networks
from booking.runtime.settings import RuntimeSettings

# Comma-separated IPs and CIDR networks (not JSON, as pydantic-settings would read a tuple).
NetworkList = Annotated[Networks, NoDecode, BeforeValidator(parse_networks)]


class GatewaySettings(RuntimeSettings):
    port: int = Field(default=8000, validation_alias="GATEWAY_PORT")

    # Where the gateway finds each service (`make run` sets them from the ports when unset).
    orders_url: str = "http://127.0.0.1:8001"
    payments_url: str = "http://127.0.0.1:8002"
    calendar_url: str = "http://127.0.0.1:8003"
    notifications_url: str = "http://127.0.0.1:8004"

    # Forwarding to the services: one pooled client per service (its idle connections close
    # after 2 s, under the services' keep-alive, so no cap on how many stay idle is needed).
    upstream_timeout_seconds: float = Field(default=10.0, gt=0)
    upstream_connect_timeout_seconds: float = Field(default=3.0, gt=0)
    upstream_max_connections: int = Field(default=100, ge=1)

    # Who the client is (booking.gateway.forwarded): X-Forwarded-For is read only from these
    # proxies (the ingress controller's addresses); empty, the peer is the client.
    trusted_proxies: NetworkList = ()

    # Limits on what callers may send.
    max_body_bytes: int = Field(default=64 * 1024, ge=1)
    # Per client IP and replica on the unauthenticated routes: the OAuth callback, and apart from
    # it Konnect's webhook. Konnect's sending addresses are exempt from the webhook's limit, and
    # loopback too in development mode; anyone else calling it gets the low limit.
    rate_limit_per_minute: int = Field(default=120, ge=1)
    webhook_rate_limit_per_minute: int = Field(default=60, ge=1)
    konnect_webhook_sources: NetworkList = ()
    # Clients each limit tracks in a minute; past it, new ones share one count (bounded memory).
    rate_limit_max_clients: int = Field(default=10_000, ge=1)

    # System health: the aggregated report, and the monitor that alerts the admins.
    health_upstream_timeout_seconds: float = Field(default=3.0, gt=0)
    # The public /health reuses one report this long: anyone may ask, and each report asks
    # every service.
    health_public_max_age_seconds: float = Field(default=1.0, ge=0)
    health_monitor_interval_seconds: float = Field(default=15.0, gt=0)
    health_monitor_failures_to_alert: int = Field(default=3, ge=1)

    # The admins' live alert websocket, /ws/admin (see booking.gateway.alerts).
    alerts_ping_interval_seconds: float = Field(default=20.0, gt=0)
    alerts_ping_timeout_seconds: float = Field(default=20.0, gt=0)
    # Frames that may wait for one admin's socket; beyond that the admin is dropped (4408).
    alerts_client_queue_size: int = Field(default=256, ge=2)
    # Notifications per page when a resume replays from the notifications service.
    alerts_replay_page_size: int = Field(default=100, ge=1, le=1000)
    alerts_notifications_timeout_seconds: float = Field(default=5.0, gt=0)
    # How long the close frame of a dropped admin may wait behind what it has not read.
    alerts_close_timeout_seconds: float = Field(default=5.0, gt=0)

    # Order streams, GET /api/orders/{id}/events (see booking.gateway.order_stream): a comment
    # this often keeps an idle stream open through proxies; changes that may wait for one
    # client before it is dropped; how long one write to it may wait on a client not reading.
    order_stream_keepalive_seconds: float = Field(default=15.0, gt=0)
    order_stream_queue_size: int = Field(default=16, ge=2)
    order_stream_write_timeout_seconds: float = Field(default=30.0, gt=0)
