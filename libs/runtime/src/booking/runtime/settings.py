"""Settings from the environment (docs/settings.md), with defaults that run locally."""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
# Public, so only development mode accepts it (booking.runtime.auth.check_auth_settings).
DEVELOPMENT_JWT_SECRET = "dev-only-secret-change-me-0123456789abcdef"


class RefusedSettings(Exception):
    """Settings a process must not start with; the message names the setting and what to do."""


def async_database_url(url: str) -> str:
    """The SQLAlchemy asyncpg form of a plain `postgresql://` URL (as ops write it)."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    raise ValueError("DATABASE_URL must be a postgresql:// URL")


class RuntimeSettings(BaseSettings):
    """What every service reads. A service subclasses this and adds its own settings."""

    # hide_input_in_errors: a refused value (a URL with its password, a secret) is not printed.
    model_config = SettingsConfigDict(
        env_file=None, extra="ignore", case_sensitive=False, hide_input_in_errors=True
    )

    database_url: str = DEFAULT_DATABASE_URL
    rabbitmq_url: SecretStr = SecretStr(DEFAULT_RABBITMQ_URL)
    public_base_url: str = "http://127.0.0.1:8000"
    # Bearer tokens (docs/security.md). HS256 signed with this secret: development, or a
    # deployment without an identity provider (then at least 32 random bytes).
    auth_jwt_secret: SecretStr = SecretStr(DEVELOPMENT_JWT_SECRET)
    # An identity provider's JSON Web Key Set: its RS256/ES256 tokens are verified with these
    # keys, and HS256 is refused (outside development mode). Needs AUTH_ISSUER, AUTH_AUDIENCE.
    auth_jwks_url: str | None = None
    auth_issuer: str | None = None  # the tokens' `iss`, checked when set
    auth_audience: str | None = None  # must be (one of) the tokens' `aud`, checked when set
    # Where the role is in the claims: a claim's name (`role`, `https://x.example/roles`) or a
    # dotted path (`realm_access.roles`); its value a string or a list of strings.
    auth_role_claim: str = "role"
    # The provider's role names onto ours, as JSON: {"platform-admin": "admin", "coach":
    # "mentor"}. When set, only these names count; otherwise admin, mentor and mentee do.
    auth_role_values: dict[str, Literal["admin", "mentor", "mentee"]] = {}
    # No token may live longer (exp - iat; without iat, exp - now), whoever signed it.
    auth_max_token_lifetime_seconds: int = Field(default=86400, gt=0)
    # Clock skew allowed on exp, nbf and iat.
    auth_leeway_seconds: float = Field(default=5.0, ge=0, le=300)
    # The provider's keys: each fetch may take this long; kept this long, then fetched again
    # at the next token; an unknown `kid` fetches them again, at most once per interval.
    auth_jwks_timeout_seconds: float = Field(default=5.0, gt=0)
    auth_jwks_cache_seconds: float = Field(default=300.0, gt=0)
    auth_jwks_refetch_interval_seconds: float = Field(default=10.0, gt=0)
    # Order links (an order's page for whoever holds the link, e.g. the payer coming back from
    # Konnect): read-only tokens scoped to one order, signed with a key of their own: this
    # secret, or else one derived from AUTH_JWT_SECRET (never the JWT secret itself).
    order_link_secret: SecretStr | None = None
    order_link_ttl_hours: int = Field(default=168, gt=0)
    # Local runs and tests only (`make run` and the test suite turn it on): it allows the built-in
    # JWT secret and HS256 next to an identity provider, and exempts loopback from the webhook's
    # per-address limit. A deployment leaves it off.
    development_mode: bool = False
    log_level: str = "INFO"
    # One JSON line per HTTP request on the `booking.access` logger (method, route template,
    # status, duration, correlation id), at INFO whatever LOG_LEVEL says; false turns them off.
    access_log: bool = True
    bind_host: str = "127.0.0.1"
    port: int = 8000  # each service reads its own <SERVICE>_PORT instead

    # Broker topology. The names are the documented ones (docs/architecture.md); tests give each run
    # its own.
    events_exchange: str = "booking.events"
    admin_alerts_exchange: str = "admin.alerts"
    # Every change of an order, for the gateway's streams (a fanout, like the alerts).
    order_changes_exchange: str = "order.changes"
    queue_prefix: str = ""
    broker_reconnect_interval_seconds: float = Field(default=2.0, gt=0)

    # Consumers: bounded retries with growing delay, then the dead-letter queue.
    consumer_prefetch: int = Field(default=128, ge=1)
    consumer_concurrency: int = Field(default=8, ge=1)
    consumer_max_batch: int = Field(default=32, ge=1)
    consumer_max_attempts: int = Field(default=5, ge=1)
    consumer_retry_base_delay_ms: int = Field(default=1000, ge=1)

    # Outbox relay.
    outbox_batch_size: int = Field(default=200, ge=1)
    outbox_relay_concurrency: int = Field(default=2, ge=1)
    outbox_poll_interval_seconds: float = Field(default=1.0, gt=0)
    # Under load (the last batch held more than one event) a woken relay waits this long before
    # it claims, so the commits landing meanwhile share its claim; idle, it claims at once.
    outbox_linger_ms: float = Field(default=5.0, ge=0)
    outbox_lag_warn_seconds: float = Field(default=30.0, gt=0)
    # An event no queue takes waits 1 s, then twice as long each time, at most this long.
    outbox_unroutable_retry_max_seconds: float = Field(default=30.0, gt=0)
    # The admins hear of unroutable events of one type at most once per this long.
    outbox_unroutable_alert_window_seconds: float = Field(default=3600.0, gt=0)

    # Housekeeping: sent events are kept for audit, inbox records far past any redelivery.
    outbox_retention_hours: float = Field(default=168, gt=0)
    inbox_retention_hours: float = Field(default=720, gt=0)
    housekeeping_interval_seconds: float = Field(default=300, gt=0)

    health_check_timeout_seconds: float = Field(default=2.0, gt=0)

    @field_validator("database_url")
    @classmethod
    def _plain_postgres_url(cls, value: str) -> str:
        async_database_url(value)  # raises on anything that is not Postgres
        return value

    @field_validator("auth_jwks_url", "auth_issuer", "auth_audience", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # A manifest's `AUTH_ISSUER=` means "not set", not "the empty issuer".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("auth_jwks_url")
    @classmethod
    def _a_web_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("AUTH_JWKS_URL must be an https:// URL")
        return value

    @field_validator("auth_role_claim")
    @classmethod
    def _a_claim_name(cls, value: str) -> str:
        if not value.strip(". "):
            raise ValueError("AUTH_ROLE_CLAIM must name a claim, e.g. role or realm_access.roles")
        return value

    @property
    def async_database_url(self) -> str:
        return async_database_url(self.database_url)

    @property
    def order_link_key(self) -> bytes:
        """The HS256 key of order tokens (booking.runtime.auth.issue_order_token). Whether a
        deployment may use it is `booking.runtime.auth.check_order_link_settings`."""
        own = self.order_link_secret
        if own is not None and own.get_secret_value():
            return own.get_secret_value().encode()
        # A key of its own, derived one way: an order link's key never signs a login token.
        return hmac.new(
            self.auth_jwt_secret.get_secret_value().encode(),
            b"booking.runtime order link v1",
            hashlib.sha256,
        ).digest()
