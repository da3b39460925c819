"""Settings of the payments service (DESIGN section 8)."""

from decimal import Decimal

from pydantic import Field, SecretStr

from booking.runtime.settings import RuntimeSettings


class PaymentsSettings(RuntimeSettings):
    port: int = Field(default=8002, validation_alias="PAYMENTS_PORT")

    # The platform's share of each payment, a decimal fraction (0.15 = 15%); the rest is held
    # in escrow for the mentor.
    platform_fee_rate: Decimal = Field(default=Decimal("0.15"), ge=0, lt=1)

    # Konnect API v2. The defaults reach the local sandbox (sandbox-konnect, port 8010).
    konnect_api_url: str = "http://127.0.0.1:8010/api/v2"
    # Sent as `x-api-key: <id>:<secret>`; this default is for local runs against the sandbox.
    konnect_api_key: SecretStr = SecretStr("sandbox-api-key-id:sandbox-api-key-secret")
    # The wallet that receives the payments (Konnect wallet ids are 24 hex characters).
    konnect_wallet_id: str = "000000000000000000000001"
    # How long a payment link stays payable.
    konnect_payment_lifespan_minutes: int = Field(default=30, ge=1)
