"""The currencies the platform sells in, and how many minor units make one of each.

Payments go through Konnect, which holds a payment in TND, EUR or USD (its `token`) and counts
amounts in the currency's minor unit: millimes for TND (1 TND = 1000), cents for EUR and USD
(100). The table is written once, here: whatever converts or shows an amount reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal, get_args

KonnectCurrency = Literal["TND", "EUR", "USD"]
"""A currency Konnect takes a payment in."""

MINOR_UNITS_PER_MAJOR: Mapping[str, int] = MappingProxyType({"TND": 1000, "EUR": 100, "USD": 100})
"""How many minor units make one major unit, per currency Konnect takes."""

if set(get_args(KonnectCurrency)) != set(MINOR_UNITS_PER_MAJOR):  # pragma: no cover
    raise RuntimeError("KonnectCurrency and MINOR_UNITS_PER_MAJOR must name the same currencies")

PRICE_CEILING_MINOR_UNITS = 1_000_000_000
"""The most a price may be in any currency, in minor units (1,000,000 TND; 10,000,000 EUR or
USD): a bound on what is surely a mistake (a price typed in the wrong unit), far above any
session. The platform's own maximum (orders' OFFERING_MAX_PRICE_MAJOR_UNITS) is lower."""


def minor_units_per_major(currency: str) -> int:
    """How many minor units make one `currency`; ValueError for a currency Konnect does not take."""
    try:
        return MINOR_UNITS_PER_MAJOR[currency]
    except KeyError:
        known = ", ".join(MINOR_UNITS_PER_MAJOR)
        raise ValueError(f"{currency!r} is not a currency the platform takes ({known})") from None


def major_to_minor(major_units: int, currency: str) -> int:
    """`major_units` whole units of `currency` in its minor unit (10 TND -> 10000)."""
    return major_units * minor_units_per_major(currency)


def format_money(amount: int, currency: str) -> str:
    """An amount in minor units as the currency writes it: (120000, TND) -> `120.000 TND`.

    A currency not in the table is shown as its bare minor units, never guessed at.
    """
    per_major = MINOR_UNITS_PER_MAJOR.get(currency)
    if per_major is None:
        return f"{amount} {currency} (minor units)"
    digits = len(str(per_major)) - 1
    whole, fraction = divmod(abs(amount), per_major)
    sign = "-" if amount < 0 else ""
    return f"{sign}{whole}.{fraction:0{digits}d} {currency}"
