# Shared fixtures for every package's tests: real Postgres and RabbitMQ, isolated per test.
pytest_plugins = ["booking.runtime.testing"]
