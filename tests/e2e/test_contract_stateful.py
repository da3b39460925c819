"""Chains of calls along the links of the gateway's OpenAPI, against the real services: a mentor
registered, given an offering, booked by a mentee; the order read, cancelled, its escrow read and
settled, its session's scheduling retried; no answer is a 5xx or breaks the document.

booking.devtools.contract_run runs the chains (the gateway's own tests run the same against
stand-ins); here every answer is the real services' own.
"""

from __future__ import annotations

import asyncio

import pytest

from booking.devtools.contract_run import bounded, link_names, run_stateful_contract
from booking.runtime.settings import RuntimeSettings

pytestmark = pytest.mark.e2e

# A minute or two on a shared two-core machine, the system's start included.
RUN = bounded(max_examples=40, steps=15)
# The booking flow: a fresh system has no notifications or dead letters to follow links from.
BOOKING_FLOW = r"^/api/(mentors|bookings|orders|admin/(mentors|orders|sessions))"
# The links whose success shows a chain reached an order: a booking's, an order's actions.
ORDER_LINKS = {"GetOrder", "CancelOrder", "GetEscrow", "SettleEscrow", "RetryScheduling"}


@pytest.mark.timeout(360)  # the system's start counts toward it
async def test_chains_of_calls_along_the_links_meet_no_server_error(running_system) -> None:
    secret = running_system.env.get("AUTH_JWT_SECRET") or RuntimeSettings().auth_jwt_secret
    if not isinstance(secret, str):
        secret = secret.get_secret_value()
    followed = await asyncio.to_thread(
        run_stateful_contract, running_system.gateway, secret, RUN, BOOKING_FLOW
    )
    # The chains went past the first step: a booking made from an offering's link, then one of
    # the order's actions on it.
    names = link_names(followed)
    assert "Book" in names and names & ORDER_LINKS, sorted(followed)
