"""Google's calls on calendar's /metrics: a session scheduled through two 500s counts one call
that succeeded, its retries and its duration; Google failing throughout counts one call that
was unavailable. The registry is the process's, so each check is a change."""

from __future__ import annotations

import pytest

from booking.devtools.fixtures import scrape_metrics


@pytest.fixture
async def calendar(start_on_test_broker):
    return await start_on_test_broker()


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


INSERT = {"provider": "google", "operation": "event insert"}


async def test_a_session_scheduled_through_two_failures_counts_one_call_and_two_retries(
    calendar, sandbox
):
    mentor = await calendar.connected()
    await sandbox.fault("http_500", count=2, endpoint="insert")
    before = await scrape_metrics(calendar.http)

    paid = await calendar.pay(mentor)
    await calendar.confirmed(paid.session_id)
    after = await scrape_metrics(calendar.http)

    assert moved(before, after, "booking_provider_calls_total", **INSERT, result="ok") == 1
    assert moved(before, after, "booking_provider_calls_total", **INSERT, result="unavailable") == 0
    assert moved(before, after, "booking_provider_retries_total", **INSERT) == 2
    duration = "booking_provider_call_duration_seconds_count"
    assert moved(before, after, duration, **INSERT) == 1


async def test_google_failing_throughout_counts_a_call_unavailable(calendar, sandbox):
    mentor = await calendar.connected()
    attempts = calendar.settings.google_max_attempts
    await sandbox.fault("http_503", count=attempts, endpoint="insert")
    before = await scrape_metrics(calendar.http)

    paid = await calendar.pay(mentor)
    await calendar.failed(paid.session_id)
    after = await scrape_metrics(calendar.http)

    assert moved(before, after, "booking_provider_calls_total", **INSERT, result="unavailable") == 1
    assert moved(before, after, "booking_provider_calls_total", **INSERT, result="ok") == 0
    assert moved(before, after, "booking_provider_retries_total", **INSERT) == attempts - 1
