"""Settings of the gateway service (DESIGN section 8)."""

from pydantic import Field

from booking.runtime.settings import RuntimeSettings


class GatewaySettings(RuntimeSettings):
    port: int = Field(default=8000, validation_alias="GATEWAY_PORT")
