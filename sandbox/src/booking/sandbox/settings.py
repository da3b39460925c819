"""The sandbox providers' settings: where they listen and how each one behaves."""

from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from booking.runtime.auth import GENERATE_SECRET, secret_weakness

# The control API's token when SANDBOX_CONTROL_TOKEN is unset, in development mode only: public
# (it is written here), so that `make run` and the tests need no setup.
DEVELOPMENT_CONTROL_TOKEN = "sandbox-dev-control-token"


class SandboxSettings(BaseSettings):
    # populate_by_name: tests build settings by field name, the environment uses the aliases.
    model_config = SettingsConfigDict(
        env_file=None, extra="ignore", case_sensitive=False, populate_by_name=True
    )

    bind_host: str = "127.0.0.1"
    konnect_port: int = Field(default=8010, validation_alias="SANDBOX_KONNECT_PORT")
    google_port: int = Field(default=8011, validation_alias="SANDBOX_GOOGLE_PORT")
    log_level: str = "INFO"

    # Local runs and tests only (`make run` and the test suite set DEVELOPMENT_MODE): the control
    # API then takes DEVELOPMENT_CONTROL_TOKEN when no token is set, and /_sandbox/webhooks/send
    # may call loopback addresses. A deployment leaves it off.
    development_mode: bool = Field(default=False, validation_alias="DEVELOPMENT_MODE")
    # What every /_sandbox call must send as `Authorization: Bearer <token>`. Unset outside
    # development mode, the control API is off (every call 401); the provider APIs and the
    # browser pages never ask for it.
    control_token: SecretStr | None = Field(default=None, validation_alias="SANDBOX_CONTROL_TOKEN")

    # The key every /api/v2 call must send as `x-api-key`: the payments service's default
    # KONNECT_API_KEY, so a local run needs no configuration.
    konnect_api_key: SecretStr = Field(
        default=SecretStr("sandbox-api-key-id:sandbox-api-key-secret"),
        validation_alias="SANDBOX_KONNECT_API_KEY",
    )
    # Where a payer's browser reaches the sandbox (payUrl points here); by default the sandbox
    # itself on its port. In containers the API host and the browser's host differ.
    konnect_public_url: str = Field(default="", validation_alias="SANDBOX_KONNECT_PUBLIC_URL")
    # How long a "timeout" fault hangs before it answers 504: longer than a client's timeout.
    konnect_timeout_fault_seconds: float = Field(
        default=30.0, ge=0, validation_alias="SANDBOX_KONNECT_TIMEOUT_FAULT_SECONDS"
    )
    # How long the sandbox waits for a merchant's webhook endpoint to answer.
    konnect_webhook_timeout_seconds: float = Field(
        default=10.0, gt=0, validation_alias="SANDBOX_KONNECT_WEBHOOK_TIMEOUT_SECONDS"
    )
    # The hosts (names or IP addresses, comma-separated) /_sandbox/webhooks/send may call besides
    # the webhook URLs of the sandbox's own payments; development mode adds loopback. Anything
    # wider would make the sandbox a relay to any address its network reaches.
    konnect_forged_webhook_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias="SANDBOX_KONNECT_FORGED_WEBHOOK_HOSTS"
    )

    # The OAuth client the calendar service uses by default (GOOGLE_CLIENT_ID / _SECRET), so a
    # local run needs no configuration. The sandbox knows this one client only.
    google_client_id: str = Field(
        default="sandbox-client-id", validation_alias="SANDBOX_GOOGLE_CLIENT_ID"
    )
    google_client_secret: SecretStr = Field(
        default=SecretStr("sandbox-client-secret"), validation_alias="SANDBOX_GOOGLE_CLIENT_SECRET"
    )
    # Where a browser reaches the sandbox (htmlLink points here); by default the sandbox itself.
    google_public_url: str = Field(default="", validation_alias="SANDBOX_GOOGLE_PUBLIC_URL")
    # Google's access tokens live about an hour: 3599 s is what its token endpoint answers.
    google_access_token_seconds: int = Field(
        default=3599, ge=1, validation_alias="SANDBOX_GOOGLE_ACCESS_TOKEN_SECONDS"
    )
    # How many reads of a new event (its insert's answer included) still show its Meet data
    # `pending`: Google may attach the Meet link after answering, and clients must read again.
    google_meet_pending_reads: int = Field(
        default=0, ge=0, validation_alias="SANDBOX_GOOGLE_MEET_PENDING_READS"
    )

    @field_validator("control_token", mode="before")
    @classmethod
    def _blank_token_is_unset(cls, value: object) -> object:
        # `SANDBOX_CONTROL_TOKEN=` (compose's `${VAR:-}`) means "not set", not an empty token.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("konnect_forged_webhook_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            # IPv6 addresses may come bracketed, as in a URL; the URL's host is compared without.
            return [str(h).strip().strip("[]").lower() for h in value if str(h).strip()]
        return value

    @model_validator(mode="after")
    def _no_guessable_token_outside_development(self) -> "SandboxSettings":
        token = self.control_token.get_secret_value() if self.control_token else None
        if token is None or self.development_mode:
            return self
        weakness = secret_weakness(token, built_in=DEVELOPMENT_CONTROL_TOKEN)
        if weakness is not None:
            raise ValueError(
                f"SANDBOX_CONTROL_TOKEN {weakness}; outside development mode set a random one "
                f"({GENERATE_SECRET})"
            )
        return self

    def control_api_token(self) -> str | None:
        """The token the control API takes: the one set, else in development mode the
        development token; None means the control API is off."""
        if self.control_token is not None:
            return self.control_token.get_secret_value()
        return DEVELOPMENT_CONTROL_TOKEN if self.development_mode else None

    @model_validator(mode="after")
    def _default_public_urls(self) -> "SandboxSettings":
        if not self.konnect_public_url:
            self.konnect_public_url = f"http://127.0.0.1:{self.konnect_port}"
        self.konnect_public_url = self.konnect_public_url.rstrip("/")
        if not self.google_public_url:
            self.google_public_url = f"http://127.0.0.1:{self.google_port}"
        self.google_public_url = self.google_public_url.rstrip("/")
        return self
