"""Settings of the calendar service (DESIGN section 8)."""

from pydantic import Field, SecretStr

from booking.runtime.settings import RuntimeSettings


class CalendarSettings(RuntimeSettings):
    port: int = Field(default=8003, validation_alias="CALENDAR_PORT")

    # Google OAuth 2.0 and Calendar API v3. The defaults reach the local sandbox
    # (sandbox-google, port 8011); the client id and secret are the sandbox's, for local runs.
    google_client_id: str = "sandbox-client-id"
    google_client_secret: SecretStr = SecretStr("sandbox-client-secret")
    google_auth_url: str = "http://127.0.0.1:8011/o/oauth2/v2/auth"
    google_token_url: str = "http://127.0.0.1:8011/token"
    google_calendar_api_url: str = "http://127.0.0.1:8011/calendar/v3"  # base up to /calendar/v3

    # Fernet key that encrypts the mentors' refresh tokens at rest. This default is a valid
    # Fernet key for local runs only: set TOKEN_ENCRYPTION_KEY anywhere else.
    token_encryption_key: SecretStr = SecretStr("MTwwuHU140rXYBgtWzWq96-Yyntd3Gz59VDGQdaoikw=")
