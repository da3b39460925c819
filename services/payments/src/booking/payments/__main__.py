from booking.payments.app import create_app
from booking.payments.settings import PaymentsSettings
from booking.payments.tables import SCHEMA
from booking.runtime.cli import main

main(name="payments", settings_type=PaymentsSettings, create_app=create_app, schema=SCHEMA)
