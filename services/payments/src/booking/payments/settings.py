"""Settings of the payments service (docs/settings.md)."""

from decimal import Decimal

from pydantic import Field, SecretStr, model_validator

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

    # One Konnect call (connect, write, read) may take this long before it counts as a timeout.
    konnect_timeout_seconds: float = Field(default=10.0, gt=0)
    # Attempts per Konnect call, the first included; only timeouts, 429 and 5xx are retried.
    konnect_max_attempts: int = Field(default=4, ge=1)
    # The first retry waits up to this long; each further one up to twice as long (full jitter).
    konnect_retry_base_seconds: float = Field(default=0.5, ge=0)
    # A 429's Retry-After is honoured up to this long; a longer one ends the retries.
    konnect_retry_after_max_seconds: float = Field(default=5.0, ge=0)
    # Where Konnect sends the payer's browser after paying or failing: each payment's own
    # address under these, `<this>/<order id>?outcome=success|failed&token=<order link>` (Konnect
    # adds `payment_ref`). Default: the gateway's return page, `<PUBLIC_BASE_URL>/pay/return`.
    # Set them for a front end of your own, which then reads the order with the token.
    konnect_success_url: str | None = None
    konnect_fail_url: str | None = None
    # Where Konnect calls (`GET <this>?payment_ref=...`, through the gateway);
    # default: under PUBLIC_BASE_URL. Set apart where Konnect reaches the gateway by another
    # address than browsers do (Compose: the sandbox calls the gateway's container).
    konnect_webhook_url: str | None = None

    # Payment reads at Konnect (`GET /payments/{ref}`: a webhook's and reconciliation's) one
    # replica may make per minute, a minute's worth at once at most; a read's retries count as
    # one. Every paid booking needs one read, so this also caps confirmations per replica: the
    # default (10 a second) carries the drills' load and a busy day's peak. Konnect's rate limit
    # is undocumented (one source says 100 requests a minute per account) and every replica has
    # its own budget: in a deployment, keep replicas x this, plus the init-payment calls (one per
    # booking, not counted here), under your account's limit.
    konnect_lookups_per_minute: int = Field(default=600, ge=1)
    # The most of those webhooks may use: the rest is reconciliation's, so a flood of webhooks
    # never starves the sweeper. A webhook that finds its share spent is answered 503 with
    # Retry-After; the payment stays pending and reconciliation settles it.
    konnect_webhook_lookup_share: float = Field(default=0.7, ge=0, le=1)
    # Webhooks naming a ref none of our payments has cost no Konnect call: they are counted, and
    # reported (PaymentAnomalyDetected, unknown_payment_ref) at most once per this long with how
    # many came and a sample of their refs; the first after a quiet spell at once.
    unknown_ref_report_interval_seconds: float = Field(default=5.0, gt=0)

    # Reconciliation: pending payments older than the grace period are asked of Konnect at most
    # once per interval (lost webhooks), and expired past their lifespan.
    reconciliation_interval_seconds: float = Field(default=30.0, gt=0)
    reconciliation_grace_seconds: float = Field(default=120.0, ge=0)
    reconciliation_batch_size: int = Field(default=50, ge=1)
    # A replica initiating a payment holds it this long; past it, the sweeper initiates it again
    # (the replica crashed). Longer than a Konnect call with all its retries.
    initiation_lease_seconds: float = Field(default=120.0, gt=0)
    # A payment nobody claimed this long after it was opened is initiated by the sweeper (the
    # replica crashed before its first attempt).
    initiation_grace_seconds: float = Field(default=10.0, ge=0)

    # The mentor's escrow is released this long after the session ends.
    escrow_release_delay_minutes: float = Field(default=1440, ge=0)
    escrow_release_interval_seconds: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _konnect_urls_default_under_public_base_url(self) -> "PaymentsSettings":
        base = self.public_base_url.rstrip("/")
        if self.konnect_webhook_url is None:
            self.konnect_webhook_url = f"{base}/api/payments/webhook"
        if self.konnect_success_url is None:
            self.konnect_success_url = f"{base}/pay/return"
        if self.konnect_fail_url is None:
            self.konnect_fail_url = f"{base}/pay/return"
        return self
