"""CalendarSettings: the environment names every deployment sets, sandbox defaults, the
scheduling retry schedule, hidden secrets."""

import base64
from datetime import timedelta

import pytest
from cryptography.fernet import Fernet
from pydantic import ValidationError

from booking.calendar.settings import CalendarSettings

NAMES = (
    "CALENDAR_PORT",
    "GOOGLE_CLIENT_ID",
    "GOOGLE_CLIENT_SECRET",
    "GOOGLE_AUTH_URL",
    "GOOGLE_TOKEN_URL",
    "GOOGLE_CALENDAR_API_URL",
    "TOKEN_ENCRYPTION_KEY",
    "SCHEDULING_RETRY_DELAYS_MINUTES",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)


class TestDefaults:
    def test_google_defaults_point_at_the_local_sandbox(self) -> None:
        settings = CalendarSettings()
        assert settings.port == 8003
        assert settings.google_auth_url == "http://127.0.0.1:8011/o/oauth2/v2/auth"
        assert settings.google_token_url == "http://127.0.0.1:8011/token"
        assert settings.google_calendar_api_url == "http://127.0.0.1:8011/calendar/v3"
        assert settings.google_client_id
        assert settings.google_client_secret.get_secret_value()

    def test_the_dev_encryption_key_is_a_fernet_key(self) -> None:
        # A Fernet key is 32 bytes in url-safe base64.
        key = CalendarSettings().token_encryption_key.get_secret_value()
        assert len(base64.urlsafe_b64decode(key.encode())) == 32


class TestEnvironment:
    def test_every_documented_name_is_read(self, monkeypatch: pytest.MonkeyPatch) -> None:
        key = base64.urlsafe_b64encode(b"k" * 32).decode()
        monkeypatch.setenv("CALENDAR_PORT", "9003")
        monkeypatch.setenv("GOOGLE_CLIENT_ID", "id.apps.googleusercontent.com")
        monkeypatch.setenv("GOOGLE_CLIENT_SECRET", "real-client-secret")
        monkeypatch.setenv("GOOGLE_AUTH_URL", "https://accounts.google.com/o/oauth2/v2/auth")
        monkeypatch.setenv("GOOGLE_TOKEN_URL", "https://oauth2.googleapis.com/token")
        monkeypatch.setenv("GOOGLE_CALENDAR_API_URL", "https://www.googleapis.com/calendar/v3")
        monkeypatch.setenv("TOKEN_ENCRYPTION_KEY", key)

        settings = CalendarSettings()

        assert settings.port == 9003
        assert settings.google_client_id == "id.apps.googleusercontent.com"
        assert settings.google_client_secret.get_secret_value() == "real-client-secret"
        assert settings.google_auth_url == "https://accounts.google.com/o/oauth2/v2/auth"
        assert settings.google_token_url == "https://oauth2.googleapis.com/token"
        assert settings.google_calendar_api_url == "https://www.googleapis.com/calendar/v3"
        assert settings.token_encryption_key.get_secret_value() == key

    def test_secrets_never_show_in_repr(self, monkeypatch: pytest.MonkeyPatch) -> None:
        key = base64.urlsafe_b64encode(b"s" * 32).decode()
        monkeypatch.setenv("GOOGLE_CLIENT_SECRET", "real-client-secret")
        monkeypatch.setenv("TOKEN_ENCRYPTION_KEY", key)
        shown = repr(CalendarSettings()) + str(CalendarSettings())
        assert "real-client-secret" not in shown
        assert key not in shown

    def test_several_keys_newest_first_are_taken(self, monkeypatch: pytest.MonkeyPatch) -> None:
        new, old = Fernet.generate_key().decode(), Fernet.generate_key().decode()
        monkeypatch.setenv("TOKEN_ENCRYPTION_KEY", f"{new},{old}")
        assert CalendarSettings().token_encryption_key.get_secret_value() == f"{new},{old}"

    @pytest.mark.parametrize(
        ("value", "reason"),
        [
            ("", "key 1 of 1 is empty"),
            ("{new},", "key 2 of 2 is empty"),
            ("{new},{new}", "key 2 of 2 repeats key 1"),
            ("{new},not-a-key-{old}", "key 2 of 2 is not a Fernet key"),
        ],
        ids=["empty", "a stray comma", "a key twice", "a malformed older key"],
    )
    def test_a_malformed_key_list_is_refused_without_showing_it(
        self, monkeypatch: pytest.MonkeyPatch, value: str, reason: str
    ) -> None:
        new, old = Fernet.generate_key().decode(), Fernet.generate_key().decode()
        monkeypatch.setenv("TOKEN_ENCRYPTION_KEY", value.format(new=new, old=old))
        with pytest.raises(ValidationError) as refused:
            CalendarSettings()
        message = str(refused.value)
        assert "TOKEN_ENCRYPTION_KEY must be one or more Fernet keys" in message
        assert reason in message
        assert new not in message and old not in message

    def test_default_secrets_never_show_in_repr(self) -> None:
        settings = CalendarSettings()
        shown = repr(settings)
        assert settings.google_client_secret.get_secret_value() not in shown
        assert settings.token_encryption_key.get_secret_value() not in shown


class TestRetrySchedule:
    def test_by_default_four_delays_one_five_fifteen_sixty_minutes(self) -> None:
        assert CalendarSettings().retry_schedule.delays == tuple(
            timedelta(minutes=m) for m in (1, 5, 15, 60)
        )

    def test_the_environment_sets_it(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SCHEDULING_RETRY_DELAYS_MINUTES", "0.5,2,10")

        delays = CalendarSettings().retry_schedule.delays

        assert delays == (timedelta(seconds=30), timedelta(minutes=2), timedelta(minutes=10))

    @pytest.mark.parametrize("value", ["", "soon", "1,0", "-1"])
    def test_a_schedule_that_is_not_positive_minutes_is_refused(
        self, monkeypatch: pytest.MonkeyPatch, value: str
    ) -> None:
        monkeypatch.setenv("SCHEDULING_RETRY_DELAYS_MINUTES", value)
        with pytest.raises(ValidationError, match="scheduling_retry_delays_minutes"):
            CalendarSettings()
