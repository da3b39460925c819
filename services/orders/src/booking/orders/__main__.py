from booking.orders.app import create_app
from booking.orders.settings import OrdersSettings
from booking.orders.tables import SCHEMA
from booking.runtime.cli import main

main(name="orders", settings_type=OrdersSettings, create_app=create_app, schema=SCHEMA)
