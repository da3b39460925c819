"""Settings of the calendar service: the shared ones, Google, the consent, scheduling."""

import hashlib
import hmac

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from booking.calendar.domain import RetrySchedule
from booking.calendar.tokens import fernet_keys
from booking.runtime.settings import RuntimeSettings

# Published with the code, so it protects nothing: development mode only.
DEVELOPMENT_TOKEN_KEY = "MTwwuHU140rXYBgtWzWq96-Yyntd3Gz59VDGQdaoikw="


class CalendarSettings(RuntimeSettings):
    # A refused setting is reported without its value: it may be a key or a secret.
    model_config = SettingsConfigDict(hide_input_in_errors=True)

    port: int = Field(default=8003, validation_alias="CALENDAR_PORT")

    # Google OAuth 2.0 and Calendar API v3. The defaults reach the local sandbox
    # (sandbox-google, port 8011); the client id and secret are the sandbox's, for local runs.
    google_client_id: str = "sandbox-client-id"
    google_client_secret: SecretStr = SecretStr("sandbox-client-secret")
    google_auth_url: str = "http://127.0.0.1:8011/o/oauth2/v2/auth"
    google_token_url: str = "http://127.0.0.1:8011/token"
    google_calendar_api_url: str = "http://127.0.0.1:8011/calendar/v3"  # base up to /calendar/v3

    # Fernet keys that encrypt the mentors' refresh tokens at rest, separated by commas, newest
    # first: tokens are encrypted with the first and open with any (rotation: put a new key in
    # front, run `python -m booking.calendar rotate-token-key`, then drop the old one). This
    # default is a valid Fernet key for local runs only: outside development mode calendar refuses
    # to start with it in the list.
    token_encryption_key: SecretStr = SecretStr(DEVELOPMENT_TOKEN_KEY)

    # One Google call (connect, write, read) may take this long before it counts as a timeout.
    google_timeout_seconds: float = Field(default=10.0, gt=0)
    # Attempts per Google call, the first included; only timeouts, 429, 403 rate limits and 5xx
    # are retried. Google's own clients back off 1, 2, 4, 8, 16 s.
    google_max_attempts: int = Field(default=5, ge=1)
    # The first retry waits up to this long; each further one up to twice as long (full jitter).
    google_retry_base_seconds: float = Field(default=1.0, ge=0)
    # A Retry-After is honoured up to this long; a longer one ends the retries.
    google_retry_after_max_seconds: float = Field(default=20.0, ge=0)
    # While the Meet data of a new event is pending, the event is read again this many times,
    # the first wait this long and each further one twice as long.
    google_meet_poll_attempts: int = Field(default=5, ge=0)
    google_meet_poll_base_seconds: float = Field(default=0.5, ge=0)
    # An access token is used until this long before Google said it expires.
    google_token_expiry_margin_seconds: float = Field(default=60.0, ge=0)

    # The consent round trip: the signed `state` is good this long, once. Its key is this
    # setting, or else derived from AUTH_JWT_SECRET (never the JWT secret itself).
    oauth_state_lifetime_seconds: float = Field(default=600.0, gt=0)
    oauth_state_secret: SecretStr | None = None

    # Scheduling a booking: the replica that claimed it holds it this long (longer than a Google
    # call with all its retries and Meet polls); past it, the sweeper schedules it again.
    scheduling_lease_seconds: float = Field(default=300.0, gt=0)
    # A pending booking nobody claimed this long after its last change is scheduled by the
    # sweeper (the replica crashed before its first attempt).
    scheduling_grace_seconds: float = Field(default=10.0, ge=0)
    # Scheduling runs per booking while Google keeps the Meet data pending; then it fails.
    scheduling_max_attempts: int = Field(default=5, ge=1)
    # A booking that failed with calendar_api_error, unexpected_error or store_not_found waits
    # this many minutes before its next attempt, then the next, ...; the failure after the
    # last delay is final (docs/recovery.md, section 6). Tests may shorten the delays, never
    # change their count.
    scheduling_retry_delays_minutes: str = "1,5,15,60"
    # After a run that left the Meet data pending, the sweeper looks again this much later.
    meet_pending_retry_seconds: float = Field(default=60.0, gt=0)

    # The sweeper of interrupted bookings, in every replica.
    sweeper_interval_seconds: float = Field(default=30.0, gt=0)
    sweeper_batch_size: int = Field(default=50, ge=1)

    @field_validator("token_encryption_key")
    @classmethod
    def _fernet_keys(cls, value: SecretStr) -> SecretStr:
        fernet_keys(value.get_secret_value())
        return value

    @field_validator("scheduling_retry_delays_minutes")
    @classmethod
    def _a_schedule(cls, value: str) -> str:
        RetrySchedule.from_minutes(value)
        return value

    @property
    def retry_schedule(self) -> RetrySchedule:
        return RetrySchedule.from_minutes(self.scheduling_retry_delays_minutes)

    @property
    def oauth_state_key(self) -> bytes:
        """The HMAC key of the consent `state`."""
        if self.oauth_state_secret is not None and self.oauth_state_secret.get_secret_value():
            return self.oauth_state_secret.get_secret_value().encode()
        # A key of its own, derived one way: a leaked state key never signs a JWT.
        return hmac.new(
            self.auth_jwt_secret.get_secret_value().encode(),
            b"booking.calendar oauth state v1",
            hashlib.sha256,
        ).digest()

    @property
    def oauth_redirect_uri(self) -> str:
        """Where Google sends the browser back, through the gateway."""
        return f"{self.public_base_url.rstrip('/')}/api/calendar/oauth/callback"
