from booking.calendar.app import create_app
from booking.calendar.settings import CalendarSettings
from booking.calendar.tables import SCHEMA
from booking.runtime.cli import main

main(name="calendar", settings_type=CalendarSettings, create_app=create_app, schema=SCHEMA)
