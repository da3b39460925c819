"""The public contract's request bodies: what they refuse before any service sees a request."""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from booking.contracts import http
from booking.contracts.http import OfferingCreate, Price
from booking.contracts.money import PRICE_CEILING_MINOR_UNITS

OFFERING = {
    "title": "Career chat",
    "duration_minutes": 60,
    "price": {"amount": 1, "currency": "TND"},
}


def refusal(body: dict[str, Any]) -> tuple[str, str]:
    """The one error `body` meets as an offering: (its field, its type)."""
    with pytest.raises(ValidationError) as refused:
        OfferingCreate.model_validate(body)
    [error] = refused.value.errors()
    return ".".join(str(part) for part in error["loc"]), error["type"]


class TestPrice:
    @pytest.mark.parametrize("currency", ["TND", "EUR", "USD"])
    def test_konnects_currencies_are_taken(self, currency: str) -> None:
        price = Price.model_validate({"amount": 120_000, "currency": currency})
        assert (price.amount, price.currency) == (120_000, currency)

    def test_the_ceiling_itself_is_taken(self) -> None:
        assert Price(amount=PRICE_CEILING_MINOR_UNITS, currency="EUR").amount == 10**9

    @pytest.mark.parametrize(
        ("price", "field", "rule"),
        [
            ({"amount": 0, "currency": "TND"}, "price.amount", "greater_than"),
            ({"amount": -1, "currency": "TND"}, "price.amount", "greater_than"),
            (
                {"amount": PRICE_CEILING_MINOR_UNITS + 1, "currency": "TND"},
                "price.amount",
                "less_than_equal",
            ),
            ({"amount": 2**63, "currency": "TND"}, "price.amount", "less_than_equal"),
            ({"amount": 1.0, "currency": "TND"}, "price.amount", "int_type"),
            ({"amount": "1", "currency": "TND"}, "price.amount", "int_type"),
            ({"amount": 1, "currency": "XYZ"}, "price.currency", "literal_error"),
            ({"amount": 1, "currency": "tnd"}, "price.currency", "literal_error"),
            ({"amount": 1, "currency": "GBP"}, "price.currency", "literal_error"),
            ({"amount": 1, "currency": "TND", "fx": 1}, "price.fx", "extra_forbidden"),
        ],
        ids=[
            "zero",
            "negative",
            "over the ceiling",
            "beyond 64 bits",
            "float",
            "string",
            "unknown currency",
            "lower-case currency",
            "a currency Konnect does not take",
            "extra field",
        ],
    )
    def test_a_price_konnect_could_not_take_is_refused_naming_the_field(
        self, price: dict[str, Any], field: str, rule: str
    ) -> None:
        assert refusal({**OFFERING, "price": price}) == (field, rule)

    def test_the_openapi_schema_shows_the_rules(self) -> None:
        schema = Price.model_json_schema()
        amount, currency = schema["properties"]["amount"], schema["properties"]["currency"]
        assert amount["exclusiveMinimum"] == 0 and amount["maximum"] == PRICE_CEILING_MINOR_UNITS
        assert currency["enum"] == ["TND", "EUR", "USD"]


class TestDuration:
    @pytest.mark.parametrize("minutes", [15, 60, 480])
    def test_fifteen_minutes_to_eight_hours_are_taken(self, minutes: int) -> None:
        body = {**OFFERING, "duration_minutes": minutes}
        assert OfferingCreate.model_validate(body).duration_minutes == minutes

    @pytest.mark.parametrize(
        ("minutes", "rule"),
        [(14, "greater_than_equal"), (0, "greater_than_equal"), (481, "less_than_equal")],
    )
    def test_shorter_or_longer_is_refused(self, minutes: int, rule: str) -> None:
        assert refusal({**OFFERING, "duration_minutes": minutes}) == ("duration_minutes", rule)


class TestInstants:
    """Times a service compares in Postgres must exist in UTC; an offset that pushes one past
    year 1 or 9999 is the caller's error (422), never a 500 deep in a service."""

    BOOKING = {
        "offering_id": "6f1c2f52-6ad8-4a1e-9a51-2f1a8f6c2b10",
        "mentee": {"first_name": "Sami", "last_name": "Trabelsi", "email": "sami@example.com"},
    }

    @pytest.mark.parametrize("instant", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
    def test_a_time_outside_utcs_years_is_refused(self, instant: str) -> None:
        with pytest.raises(ValidationError, match="outside the years 1 to 9999 in UTC"):
            http.BookingCreate.model_validate({**self.BOOKING, "start_at": instant})
        with pytest.raises(ValidationError, match="outside the years 1 to 9999 in UTC"):
            http.FeedFilter.model_validate({"since": instant})

    def test_a_time_keeps_its_offset(self) -> None:
        booking = http.BookingCreate.model_validate(
            {**self.BOOKING, "start_at": "2030-05-01T10:00:00+01:00"}
        )
        assert booking.start_at == datetime(2030, 5, 1, 9, 0, tzinfo=UTC)
        assert booking.start_at.utcoffset() == timedelta(hours=1)

    def test_a_dead_letter_cursor_outside_utcs_years_is_refused(self) -> None:
        token = http.cursor_token("0001-01-01T00:00:00+01:00|1")
        with pytest.raises(ValueError, match="not one this listing gave"):
            http.DeadLetterCursor.decode(token)


def test_a_bulk_replays_type_holds_no_nul() -> None:
    with pytest.raises(ValidationError):
        http.DeadLetterFilter.model_validate({"type": "Payment\x00Completed"})
