"""Settings: the documented names, a plain postgresql:// URL, secrets kept out of reprs."""

import pytest
from pydantic import ValidationError

from booking.runtime.settings import RuntimeSettings, async_database_url


def test_a_plain_postgres_url_gets_the_asyncpg_driver():
    assert async_database_url("postgresql://u@h:5432/db") == "postgresql+asyncpg://u@h:5432/db"
    assert async_database_url("postgres://u@h/db") == "postgresql+asyncpg://u@h/db"


def test_a_non_postgres_url_is_refused():
    with pytest.raises(ValidationError, match="postgresql"):
        RuntimeSettings(database_url="mysql://u@h/db")


def test_settings_come_from_the_documented_names(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://x@db:5432/booking")
    monkeypatch.setenv("RABBITMQ_URL", "amqp://u:p@mq:5672/")
    monkeypatch.setenv("AUTH_JWT_SECRET", "s3cret-value")
    settings = RuntimeSettings()
    assert settings.async_database_url == "postgresql+asyncpg://x@db:5432/booking"
    assert settings.rabbitmq_url.get_secret_value() == "amqp://u:p@mq:5672/"
    assert "s3cret-value" not in repr(settings)
    assert "u:p@" not in repr(settings)


def test_a_refused_value_is_not_printed() -> None:
    """A refused DATABASE_URL carries its password: the error names the setting, not the value."""
    with pytest.raises(ValueError) as refused:
        RuntimeSettings(database_url="mysql://booking:hunter2@db/booking")
    assert "DATABASE_URL must be a postgresql:// URL" in str(refused.value)
    assert "hunter2" not in str(refused.value)
