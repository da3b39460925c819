# Shared fixtures for every package's tests: real Postgres and RabbitMQ, isolated per test.
import os

pytest_plugins = ["booking.devtools.fixtures"]

# The tests run the system as `make run` does: in development mode (the built-in JWT secret,
# loopback exempt from the webhook's per-address limit). Tests of the deployed behaviour turn it
# off for their own settings or processes.
os.environ.setdefault("DEVELOPMENT_MODE", "true")
