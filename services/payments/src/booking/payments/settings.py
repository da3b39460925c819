"""Settings of the payments service (DESIGN section 8)."""

from pydantic import Field

from booking.runtime.settings import RuntimeSettings


class PaymentsSettings(RuntimeSettings):
    port: int = Field(default=8002, validation_alias="PAYMENTS_PORT")
