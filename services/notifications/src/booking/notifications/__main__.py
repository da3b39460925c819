from booking.notifications.app import create_app
from booking.notifications.settings import NotificationsSettings
from booking.notifications.tables import SCHEMA
from booking.runtime.cli import main

main(
    name="notifications", settings_type=NotificationsSettings, create_app=create_app, schema=SCHEMA
)
