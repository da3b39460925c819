"""Where the sandbox providers listen: SANDBOX_KONNECT_PORT, SANDBOX_GOOGLE_PORT (DESIGN 8)."""

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class SandboxSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    bind_host: str = "127.0.0.1"
    konnect_port: int = Field(default=8010, validation_alias="SANDBOX_KONNECT_PORT")
    google_port: int = Field(default=8011, validation_alias="SANDBOX_GOOGLE_PORT")
    log_level: str = "INFO"
