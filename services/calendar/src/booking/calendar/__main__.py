from booking.calendar.app import create_app, rotate_token_key_command
from booking.calendar.settings import CalendarSettings
from booking.calendar.tables import SCHEMA
from booking.runtime.cli import Command, main

main(
    name="calendar",
    settings_type=CalendarSettings,
    create_app=create_app,
    schema=SCHEMA,
    commands={
        "rotate-token-key": Command(
            help="re-encrypt every stored refresh token with the first key of "
            "TOKEN_ENCRYPTION_KEY (safe while the service runs; run again: changes nothing)",
            run=rotate_token_key_command,
        )
    },
)
