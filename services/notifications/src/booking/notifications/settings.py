"""Settings of the notifications service (DESIGN section 8)."""

from pydantic import Field

from booking.runtime.settings import RuntimeSettings


class NotificationsSettings(RuntimeSettings):
    port: int = Field(default=8004, validation_alias="NOTIFICATIONS_PORT")
