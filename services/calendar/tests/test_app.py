"""The composed service: its schema matches its tables, its health reports Google."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr

from booking.calendar.app import create_app
from booking.calendar.settings import DEVELOPMENT_TOKEN_KEY, CalendarSettings
from booking.calendar.tables import SCHEMA
from booking.devtools.fixtures import free_port, health_checks, schema_differences
from booking.runtime.settings import DEVELOPMENT_JWT_SECRET, RefusedSettings


class TestMigrations:
    async def test_the_migrated_schema_is_exactly_the_tables(self, migrated: str) -> None:
        assert await schema_differences(migrated, SCHEMA) == []


class TestConsentStateKey:
    """With an identity provider, AUTH_JWT_SECRET may keep its built-in value (it signs no
    token); the consent state's key must then not be derived from it."""

    PROVIDER: dict[str, Any] = {
        "development_mode": False,
        "auth_jwks_url": "https://idp.example/jwks",
        "auth_issuer": "https://idp.example/",
        "auth_audience": "booking-api",
        "token_encryption_key": Fernet.generate_key().decode(),
    }

    def test_no_calendar_starts_with_a_state_key_anyone_can_derive(self) -> None:
        with pytest.raises(RefusedSettings, match="OAUTH_STATE_SECRET"):
            create_app(CalendarSettings(**self.PROVIDER))
        with pytest.raises(RefusedSettings, match="OAUTH_STATE_SECRET is still"):
            create_app(
                CalendarSettings(**self.PROVIDER, oauth_state_secret=SecretStr("REPLACE-WITH-IT"))
            )

    def test_its_own_secret_or_development_mode_will_do(self) -> None:
        create_app(
            CalendarSettings(**self.PROVIDER, oauth_state_secret=SecretStr("k" * 32 + "-random"))
        )
        create_app(CalendarSettings(**{**self.PROVIDER, "development_mode": True}))
        create_app(
            CalendarSettings(
                development_mode=True, auth_jwt_secret=SecretStr(DEVELOPMENT_JWT_SECRET)
            )
        )


class TestTokenKey:
    """The built-in TOKEN_ENCRYPTION_KEY ships with the code: it protects nothing."""

    DEPLOYED: dict[str, Any] = {"development_mode": False, "auth_jwt_secret": "s" * 32 + "-random"}

    def test_no_calendar_starts_with_the_development_key_outside_development_mode(self) -> None:
        with pytest.raises(RefusedSettings, match="TOKEN_ENCRYPTION_KEY holds the built-in"):
            create_app(CalendarSettings(**self.DEPLOYED))
        # Nor with it kept as an older key behind a new one.
        behind = f"{Fernet.generate_key().decode()},{DEVELOPMENT_TOKEN_KEY}"
        with pytest.raises(RefusedSettings, match="TOKEN_ENCRYPTION_KEY"):
            create_app(CalendarSettings(**self.DEPLOYED, token_encryption_key=SecretStr(behind)))

    def test_a_key_of_its_own_or_development_mode_will_do(self) -> None:
        own = Fernet.generate_key().decode()
        create_app(CalendarSettings(**self.DEPLOYED, token_encryption_key=SecretStr(own)))
        create_app(CalendarSettings(**{**self.DEPLOYED, "development_mode": True}))


def google_checks(report: dict) -> dict:
    return health_checks(report, "google:")


class TestHealth:
    async def test_google_configured_and_reachable_pass(self, calendar) -> None:
        response = await calendar.http.get("/health")

        checks = google_checks(response.json())
        assert checks["google:configured"]["status"] == "pass"
        assert checks["google:reachable"]["status"] == "pass"
        assert checks["google:reachable"]["observedUnit"] == "ms"

    async def test_google_out_of_reach_warns_and_never_touches_readiness(
        self, start_calendar
    ) -> None:
        running = await start_calendar(google_token_url=f"http://127.0.0.1:{free_port()}/token")

        full = await running.http.get("/health")
        ready = await running.http.get("/health/ready")

        assert full.status_code == 200 and full.json()["status"] == "warn"
        assert google_checks(full.json())["google:reachable"]["status"] == "warn"
        assert ready.status_code == 200 and google_checks(ready.json()) == {}

    async def test_google_not_configured_is_reported(self, start_calendar) -> None:
        running = await start_calendar(google_client_id="", google_calendar_api_url="")

        full = await running.http.get("/health")

        configured = google_checks(full.json())["google:configured"]
        assert configured["status"] == "fail"
        assert "GOOGLE_CLIENT_ID" in configured["output"]
        assert "GOOGLE_CALENDAR_API_URL" in configured["output"]
        assert (await running.http.get("/health/ready")).status_code == 200

    async def test_no_secret_is_in_any_health_report(self, calendar) -> None:
        secrets = (
            calendar.settings.google_client_secret.get_secret_value(),
            calendar.settings.token_encryption_key.get_secret_value(),
        )
        for path in ("/health", "/health/ready"):
            text = (await calendar.http.get(path)).text
            assert not any(secret in text for secret in secrets)
