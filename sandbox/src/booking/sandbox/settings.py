"""The sandbox providers' settings: where they listen and how each one behaves."""

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SandboxSettings(BaseSettings):
    # populate_by_name: tests build settings by field name, the environment uses the aliases.
    model_config = SettingsConfigDict(
        env_file=None, extra="ignore", case_sensitive=False, populate_by_name=True
    )

    bind_host: str = "127.0.0.1"
    konnect_port: int = Field(default=8010, validation_alias="SANDBOX_KONNECT_PORT")
    google_port: int = Field(default=8011, validation_alias="SANDBOX_GOOGLE_PORT")
    log_level: str = "INFO"

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

    @model_validator(mode="after")
    def _default_public_urls(self) -> "SandboxSettings":
        if not self.konnect_public_url:
            self.konnect_public_url = f"http://127.0.0.1:{self.konnect_port}"
        self.konnect_public_url = self.konnect_public_url.rstrip("/")
        if not self.google_public_url:
            self.google_public_url = f"http://127.0.0.1:{self.google_port}"
        self.google_public_url = self.google_public_url.rstrip("/")
        return self
