"""Settings of the orders service (DESIGN section 8)."""

from pydantic import Field

from booking.runtime.settings import RuntimeSettings


class OrdersSettings(RuntimeSettings):
    port: int = Field(default=8001, validation_alias="ORDERS_PORT")
