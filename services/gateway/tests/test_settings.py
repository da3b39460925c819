"""GatewaySettings: where the gateway finds each service (docs/settings.md)."""

import pytest

from booking.gateway.settings import GatewaySettings

SERVICES = ("orders", "payments", "calendar", "notifications")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_PORT", raising=False)
    for name in SERVICES:
        monkeypatch.delenv(f"{name.upper()}_URL", raising=False)


class TestDefaults:
    def test_each_service_is_found_on_its_local_port(self) -> None:
        settings = GatewaySettings()
        assert settings.port == 8000
        assert settings.orders_url == "http://127.0.0.1:8001"
        assert settings.payments_url == "http://127.0.0.1:8002"
        assert settings.calendar_url == "http://127.0.0.1:8003"
        assert settings.notifications_url == "http://127.0.0.1:8004"


class TestEnvironment:
    def test_every_documented_name_is_read(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("GATEWAY_PORT", "9000")
        for n, name in enumerate(SERVICES, start=1):
            monkeypatch.setenv(f"{name.upper()}_URL", f"http://{name}.internal:900{n}")

        settings = GatewaySettings()

        assert settings.port == 9000
        assert settings.orders_url == "http://orders.internal:9001"
        assert settings.payments_url == "http://payments.internal:9002"
        assert settings.calendar_url == "http://calendar.internal:9003"
        assert settings.notifications_url == "http://notifications.internal:9004"

    def test_the_jwt_secret_never_shows_in_repr(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("AUTH_JWT_SECRET", "a-real-signing-secret-0123456789")
        assert "a-real-signing-secret" not in repr(GatewaySettings())
