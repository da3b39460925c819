"""The currencies the platform sells in and their minor units: one table, read everywhere."""

from typing import get_args

import pytest

from booking.contracts.money import (
    MINOR_UNITS_PER_MAJOR,
    PRICE_CEILING_MINOR_UNITS,
    KonnectCurrency,
    format_money,
    major_to_minor,
    minor_units_per_major,
)


class TestTheTable:
    def test_it_holds_konnects_currencies_with_their_real_minor_units(self) -> None:
        assert dict(MINOR_UNITS_PER_MAJOR) == {"TND": 1000, "EUR": 100, "USD": 100}
        assert set(get_args(KonnectCurrency)) == set(MINOR_UNITS_PER_MAJOR)

    def test_it_cannot_be_changed_at_run_time(self) -> None:
        with pytest.raises(TypeError):
            MINOR_UNITS_PER_MAJOR["GBP"] = 100  # type: ignore[index]

    @pytest.mark.parametrize("currency", ["XYZ", "tnd", "", "GBP"])
    def test_a_currency_konnect_does_not_take_is_refused_by_name(self, currency: str) -> None:
        with pytest.raises(ValueError, match="not a currency the platform takes"):
            minor_units_per_major(currency)

    @pytest.mark.parametrize(
        ("major", "currency", "minor"), [(10, "TND", 10_000), (10, "EUR", 1_000), (1, "USD", 100)]
    )
    def test_major_units_convert_by_the_table(self, major: int, currency: str, minor: int) -> None:
        assert major_to_minor(major, currency) == minor

    def test_the_ceiling_is_a_million_dinars_and_more_in_the_others(self) -> None:
        assert major_to_minor(1_000_000, "TND") == PRICE_CEILING_MINOR_UNITS
        assert major_to_minor(1_000_000, "EUR") < PRICE_CEILING_MINOR_UNITS


class TestFormatMoney:
    @pytest.mark.parametrize(
        ("amount", "currency", "shown"),
        [
            (120_000, "TND", "120.000 TND"),
            (5, "TND", "0.005 TND"),
            (12_345, "EUR", "123.45 EUR"),
            (7, "USD", "0.07 USD"),
            (-1_500, "TND", "-1.500 TND"),
            (0, "EUR", "0.00 EUR"),
        ],
    )
    def test_amounts_are_shown_with_the_currencys_own_decimals(
        self, amount: int, currency: str, shown: str
    ) -> None:
        assert format_money(amount, currency) == shown

    def test_a_currency_outside_the_table_is_shown_in_bare_minor_units(self) -> None:
        assert format_money(1234, "JPY") == "1234 JPY (minor units)"
