"""Settings of the notifications service (docs/settings.md)."""

from pydantic import Field

from booking.runtime.settings import RuntimeSettings


class NotificationsSettings(RuntimeSettings):
    port: int = Field(default=8004, validation_alias="NOTIFICATIONS_PORT")

    # NOTIFICATION_DEDUP_WINDOW_SECONDS: a repeat of an alert (same fingerprint) this long after
    # its notification's first occurrence or sooner counts up on it instead of adding one.
    notification_dedup_window_seconds: float = Field(default=3600, gt=0)
