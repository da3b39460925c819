"""The pieces every outside-system client shares: Retry-After, failure names, the checks."""

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx

from booking.runtime.outside import (
    configured_check,
    describe_failure,
    reachable_check,
    retry_after,
)


def answer(**headers: str) -> httpx.Response:
    return httpx.Response(429, headers=headers)


class TestRetryAfter:
    def test_seconds_an_http_date_or_nothing(self):
        assert retry_after(answer(**{"retry-after": "3"})) == 3.0
        later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
        assert 25 <= retry_after(answer(**{"retry-after": later})) <= 30
        assert retry_after(answer()) is None
        assert retry_after(answer(**{"retry-after": "soon"})) is None
        assert retry_after(answer(**{"retry-after": "-5"})) == 0.0


class TestChecks:
    async def test_configured_names_what_is_missing(self):
        missing = await configured_check("konnect", ["KONNECT_API_KEY"], "https://k.example")
        assert (missing.status, missing.output) == ("fail", "not set: KONNECT_API_KEY")
        assert (await configured_check("konnect", [], "https://k.example")).status == "pass"

    async def test_any_answer_is_reachable_and_no_answer_only_warns(self):
        async def answers() -> int:
            return 404

        async def silent() -> int:
            raise httpx.ConnectTimeout("timed out")

        reached = await reachable_check("google", answers, "https://g.example/token")
        assert (reached.status, reached.output) == ("pass", "HTTP 404 from https://g.example/token")
        unreached = await reachable_check("google", silent, "https://g.example/token")
        assert unreached.status == "warn"
        assert unreached.output == f"no answer: {describe_failure(httpx.ConnectTimeout('x'))}"
