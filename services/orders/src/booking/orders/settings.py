"""Settings of the orders service, from the environment, with defaults that run locally."""

from pydantic import Field

from booking.runtime.settings import RuntimeSettings


class OrdersSettings(RuntimeSettings):
    port: int = Field(default=8001, validation_alias="ORDERS_PORT")

    # An order whose payment has not opened this long after its booking fails and frees its
    # slot (docs/recovery.md section 5). Longer than payments takes to open one, retries and all.
    payment_opening_timeout_minutes: float = Field(default=30, gt=0)
    # How often (jittered) each replica's sweeper looks for such orders, and how many it fails
    # per transaction.
    orders_sweeper_interval_seconds: float = Field(default=60.0, gt=0)
    orders_sweeper_batch_size: int = Field(default=100, ge=1)
