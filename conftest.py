# Shared fixtures for every package's tests: real Postgres and RabbitMQ, isolated per test.
import os

import pytest

pytest_plugins = ["booking.devtools.fixtures"]

# The tests run the system as `make run` does: in development mode (the built-in JWT secret,
# loopback exempt from the webhook's per-address limit). Tests of the deployed behaviour turn it
# off for their own settings or processes.
os.environ.setdefault("DEVELOPMENT_MODE", "true")

# A test that uses one of these reaches Postgres or RabbitMQ; `make test-fast` leaves it out.
SERVER_FIXTURES = {"database_url", "rabbitmq_url"}


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.servers)
