"""Settings of the gateway service (DESIGN section 8)."""

from pydantic import Field

from booking.runtime.settings import RuntimeSettings


class GatewaySettings(RuntimeSettings):
    port: int = Field(default=8000, validation_alias="GATEWAY_PORT")

    # Where the gateway finds each service (`make run` sets them from the ports when unset).
    orders_url: str = "http://127.0.0.1:8001"
    payments_url: str = "http://127.0.0.1:8002"
    calendar_url: str = "http://127.0.0.1:8003"
    notifications_url: str = "http://127.0.0.1:8004"
