from booking.gateway.app import create_app
from booking.gateway.settings import GatewaySettings
from booking.runtime.cli import main

main(name="gateway", settings_type=GatewaySettings, create_app=create_app)
