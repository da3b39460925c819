"""Settings of the orders service, from the environment, with defaults that run locally."""

from pydantic import Field

from booking.contracts.money import MINOR_UNITS_PER_MAJOR, PRICE_CEILING_MINOR_UNITS
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

    # The most an offering may cost, in whole units of its own currency (10000: 10,000 TND,
    # EUR or USD), converted to minor units by the contract's table. One number for every
    # currency: it bounds a price typed in the wrong unit, not a market. Never above the
    # contract's ceiling in any currency.
    offering_max_price_major_units: int = Field(
        default=10_000,
        ge=1,
        le=PRICE_CEILING_MINOR_UNITS // max(MINOR_UNITS_PER_MAJOR.values()),
    )
    # A session may be booked to start at most this many days ahead.
    booking_horizon_days: int = Field(default=365, ge=1, le=3660)
