"""PaymentsSettings: docs/settings.md's environment names, sandbox defaults, hidden secrets."""

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
    "PUBLIC_BASE_URL",
    "KONNECT_TIMEOUT_SECONDS",
    "KONNECT_MAX_ATTEMPTS",
    "KONNECT_RETRY_BASE_SECONDS",
    "KONNECT_SUCCESS_URL",
    "KONNECT_FAIL_URL",
    "KONNECT_WEBHOOK_URL",
    "RECONCILIATION_INTERVAL_SECONDS",
    "RECONCILIATION_GRACE_SECONDS",
    "INITIATION_LEASE_SECONDS",
    "ESCROW_RELEASE_DELAY_MINUTES",
    "ESCROW_RELEASE_INTERVAL_SECONDS",
    "KONNECT_LOOKUPS_PER_MINUTE",
    "KONNECT_WEBHOOK_LOOKUP_SHARE",
    "UNKNOWN_REF_REPORT_INTERVAL_SECONDS",
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

    def test_reconciliation_and_escrow_defaults(self) -> None:
        settings = PaymentsSettings()
        assert settings.konnect_max_attempts == 4
        assert settings.reconciliation_interval_seconds == 30
        assert settings.reconciliation_grace_seconds == 120
        assert settings.escrow_release_delay_minutes == 1440

    def test_what_webhooks_may_cost(self) -> None:
        settings = PaymentsSettings()
        # Two replicas (the manifests' least) ask at most 60 a minute: under the 100 Konnect is
        # said to allow, with room for the init-payment calls.
        assert settings.konnect_lookups_per_minute == 600
        assert settings.konnect_webhook_lookup_share == 0.7
        assert settings.unknown_ref_report_interval_seconds == 5

    def test_konnect_urls_default_under_the_public_base_url(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("PUBLIC_BASE_URL", "https://book.example/")
        settings = PaymentsSettings()
        assert settings.konnect_webhook_url == "https://book.example/api/payments/webhook"
        assert settings.konnect_success_url is not None and settings.konnect_fail_url is not None
        assert settings.konnect_success_url.startswith("https://book.example/")
        assert settings.konnect_fail_url.startswith("https://book.example/")


class TestEnvironment:
    def test_every_documented_name_is_read(self, monkeypatch: pytest.MonkeyPatch) -> None:
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

    def test_every_setting_of_konnect_calls_and_the_sweeper_is_read(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        values = {
            "KONNECT_TIMEOUT_SECONDS": "3.5",
            "KONNECT_MAX_ATTEMPTS": "6",
            "KONNECT_RETRY_BASE_SECONDS": "0.25",
            "KONNECT_SUCCESS_URL": "https://book.example/paid",
            "KONNECT_FAIL_URL": "https://book.example/unpaid",
            "KONNECT_WEBHOOK_URL": "http://gateway:8000/api/payments/webhook",
            "RECONCILIATION_INTERVAL_SECONDS": "15",
            "RECONCILIATION_GRACE_SECONDS": "60",
            "INITIATION_LEASE_SECONDS": "90",
            "ESCROW_RELEASE_DELAY_MINUTES": "60",
            "ESCROW_RELEASE_INTERVAL_SECONDS": "5",
            "KONNECT_LOOKUPS_PER_MINUTE": "12",
            "KONNECT_WEBHOOK_LOOKUP_SHARE": "0.5",
            "UNKNOWN_REF_REPORT_INTERVAL_SECONDS": "2.5",
        }
        for name, value in values.items():
            monkeypatch.setenv(name, value)

        settings = PaymentsSettings()

        for name, value in values.items():
            read = getattr(settings, name.lower())
            assert str(read) == value or read == float(value), name

    def test_the_api_key_never_shows_in_repr(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("KONNECT_API_KEY", "real-id:real-secret")
        settings = PaymentsSettings()
        assert "real-secret" not in repr(settings)
        assert "real-secret" not in str(settings)
        # A plain str, as the environment gives it: the settings make it a secret.
        given = PaymentsSettings(konnect_api_key="sandbox-api-key")  # type: ignore[arg-type]
        assert "sandbox-api-key" not in repr(given)


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

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("KONNECT_LOOKUPS_PER_MINUTE", "0"),
            ("KONNECT_WEBHOOK_LOOKUP_SHARE", "-0.1"),
            ("KONNECT_WEBHOOK_LOOKUP_SHARE", "1.5"),
            ("UNKNOWN_REF_REPORT_INTERVAL_SECONDS", "0"),
        ],
    )
    def test_a_budget_out_of_bounds_is_refused(
        self, monkeypatch: pytest.MonkeyPatch, name: str, value: str
    ) -> None:
        monkeypatch.setenv(name, value)
        with pytest.raises(ValidationError, match=name.lower()):
            PaymentsSettings()
