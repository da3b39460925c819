"""PaymentsSettings: the environment names of DESIGN section 8, sandbox defaults, hidden secrets."""

from decimal import Decimal

import pytest
from pydantic import ValidationError

from booking.payments.settings import PaymentsSettings

NAMES = (
    "PAYMENTS_PORT",
    "PLATFORM_FEE_RATE",
    "KONNECT_API_URL",
    "KONNECT_API_KEY",
    "KONNECT_WALLET_ID",
    "KONNECT_PAYMENT_LIFESPAN_MINUTES",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)


class TestDefaults:
    def test_konnect_defaults_point_at_the_local_sandbox(self) -> None:
        settings = PaymentsSettings()
        assert settings.port == 8002
        assert settings.konnect_api_url == "http://127.0.0.1:8010/api/v2"
        assert settings.konnect_api_key.get_secret_value()
        assert settings.konnect_wallet_id
        assert settings.konnect_payment_lifespan_minutes == 30

    def test_the_fee_rate_is_an_exact_decimal(self) -> None:
        assert PaymentsSettings().platform_fee_rate == Decimal("0.15")


class TestEnvironment:
    def test_every_design_name_is_read(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("PAYMENTS_PORT", "9002")
        monkeypatch.setenv("PLATFORM_FEE_RATE", "0.2")
        monkeypatch.setenv("KONNECT_API_URL", "https://api.konnect.network/api/v2")
        monkeypatch.setenv("KONNECT_API_KEY", "real-id:real-secret")
        monkeypatch.setenv("KONNECT_WALLET_ID", "5f7a209aeb3f76490ac4a3d1")
        monkeypatch.setenv("KONNECT_PAYMENT_LIFESPAN_MINUTES", "45")

        settings = PaymentsSettings()

        assert settings.port == 9002
        assert settings.platform_fee_rate == Decimal("0.2")
        assert settings.konnect_api_url == "https://api.konnect.network/api/v2"
        assert settings.konnect_api_key.get_secret_value() == "real-id:real-secret"
        assert settings.konnect_wallet_id == "5f7a209aeb3f76490ac4a3d1"
        assert settings.konnect_payment_lifespan_minutes == 45

    def test_the_api_key_never_shows_in_repr(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("KONNECT_API_KEY", "real-id:real-secret")
        settings = PaymentsSettings()
        assert "real-secret" not in repr(settings)
        assert "real-secret" not in str(settings)
        assert "sandbox-api-key" not in repr(PaymentsSettings(konnect_api_key="sandbox-api-key"))


class TestValidation:
    @pytest.mark.parametrize("rate", ["-0.01", "1", "1.5"])
    def test_a_fee_rate_outside_zero_to_one_is_refused(
        self, monkeypatch: pytest.MonkeyPatch, rate: str
    ) -> None:
        monkeypatch.setenv("PLATFORM_FEE_RATE", rate)
        with pytest.raises(ValidationError, match="platform_fee_rate"):
            PaymentsSettings()

    @pytest.mark.parametrize("rate", ["0", "0.999"])
    def test_a_fee_rate_from_zero_to_below_one_is_accepted(
        self, monkeypatch: pytest.MonkeyPatch, rate: str
    ) -> None:
        monkeypatch.setenv("PLATFORM_FEE_RATE", rate)
        assert PaymentsSettings().platform_fee_rate == Decimal(rate)

    def test_a_lifespan_under_one_minute_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("KONNECT_PAYMENT_LIFESPAN_MINUTES", "0")
        with pytest.raises(ValidationError, match="konnect_payment_lifespan_minutes"):
            PaymentsSettings()
