"""Settings of the calendar service (DESIGN section 8)."""

from pydantic import Field

from booking.runtime.settings import RuntimeSettings


class CalendarSettings(RuntimeSettings):
    port: int = Field(default=8003, validation_alias="CALENDAR_PORT")
