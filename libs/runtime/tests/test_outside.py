"""The pieces every outside-system client shares: Retry-After, the retry policy, failure names,
the checks, the HTTP client's lifecycle."""

import logging
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from booking.runtime.outside import (
    ClientClosed,
    OutsideClient,
    RetriesExhausted,
    RetryPolicy,
    TransientAnswer,
    configured_check,
    describe_failure,
    reachable_check,
    retry_after,
)
from booking.runtime.transport import CancelSafeTransport


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


class ClientError(Exception):
    """A client's own error, as Konnect's and Google's are: fields of its own."""

    def __init__(self, status: int, *, what: str) -> None:
        self.status = status
        self.what = what
        super().__init__(f"Example {what} answered {status}")


class Busy(TransientAnswer, ClientError):
    """A client's transient answer: the policy's marker mixed into the client's error."""


def policy(**overrides: Any) -> RetryPolicy:
    values: dict[str, Any] = {
        "system": "Example",
        "max_attempts": 3,
        "base": 0.0,
        "retry_after_max": 1.0,
    }
    return RetryPolicy(**(values | overrides))


def failing(*failures: BaseException, answer: str = "done"):
    """A call that raises the failures in turn, then answers; it notes the attempt numbers."""
    attempts: list[int] = []

    async def once(attempt: int) -> str:
        attempts.append(attempt)
        if len(attempts) <= len(failures):
            raise failures[len(attempts) - 1]
        return answer

    return once, attempts


class TestTransientAnswer:
    def test_keeps_the_client_error_fields_and_its_retry_after(self):
        busy = Busy(503, what="init", retry_after=2.5)
        assert isinstance(busy, ClientError)
        assert (busy.status, busy.what, busy.retry_after) == (503, "init", 2.5)
        assert str(busy) == describe_failure(busy) == "Example init answered 503"
        assert Busy(429, what="init").retry_after is None


class TestRetryPolicy:
    def test_each_wait_is_full_jitter_up_to_base_times_two_to_the_failed_attempt(self):
        jittered = policy(base=0.5)
        for attempt, bound in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0)]:
            waits = [jittered.wait(attempt, httpx.ConnectTimeout("x")) for _ in range(300)]
            assert all(0 <= wait <= bound for wait in waits)
            # Spread over the whole range, not stuck at a fixed step (chance of a false
            # failure: 2^-300 each way).
            assert min(waits) < bound / 2 < max(waits)

    def test_a_retry_after_is_the_least_it_waits(self):
        jittered = policy(base=0.5, retry_after_max=10.0)
        waits = [jittered.wait(1, Busy(429, what="x", retry_after=3.0)) for _ in range(100)]
        assert min(waits) == 3.0  # above the jitter's bound: exactly what was asked
        assert jittered.wait(1, Busy(503, what="x")) <= 0.5  # no Retry-After: jitter alone

    async def test_a_retry_after_is_waited_before_the_next_attempt(self):
        once, attempts = failing(Busy(429, what="x", retry_after=0.2))
        start = time.monotonic()
        assert await policy().call("x", once) == "done"
        assert time.monotonic() - start >= 0.2
        assert attempts == [1, 2]

    async def test_a_retry_after_longer_than_the_max_ends_the_retries_at_once(self):
        too_long = Busy(429, what="x", retry_after=30.0)
        once, attempts = failing(too_long)
        start = time.monotonic()
        with pytest.raises(RetriesExhausted) as gave_up:
            await policy(retry_after_max=1.0).call("x", once)
        assert time.monotonic() - start < 1.0  # it did not wait the 30s out
        assert attempts == [1]
        assert (gave_up.value.attempts, gave_up.value.last) == (1, too_long)

    async def test_transient_answers_timeouts_and_transport_errors_are_retried(self):
        once, attempts = failing(
            Busy(503, what="x"), httpx.ReadTimeout("slow"), httpx.ConnectError("refused")
        )
        assert await policy(max_attempts=4).call("x", once) == "done"
        assert attempts == [1, 2, 3, 4]

    @pytest.mark.parametrize(
        "answer",
        [ClientError(400, what="x"), httpx.DecodingError("garbled"), ValueError("a bug")],
        ids=["refused", "undecodable", "bug"],
    )
    async def test_anything_else_goes_straight_back_to_the_caller(self, answer):
        once, attempts = failing(answer)
        with pytest.raises(type(answer)) as raised:
            await policy().call("x", once)
        assert raised.value is answer
        assert attempts == [1]

    async def test_the_attempts_are_bounded_and_the_last_failure_is_kept(self):
        timeouts = [httpx.ConnectTimeout(f"attempt {n}") for n in range(1, 6)]
        once, attempts = failing(*timeouts)
        with pytest.raises(RetriesExhausted) as gave_up:
            await policy(max_attempts=3).call("init", once)
        assert attempts == [1, 2, 3]
        assert gave_up.value.attempts == 3
        assert gave_up.value.last is timeouts[2]
        assert gave_up.value.__cause__ is timeouts[2]
        assert str(gave_up.value) == "init failed after 3 attempt(s): timed out (ConnectTimeout)"

    async def test_each_retry_is_logged_on_the_client_logger(self, caplog):
        client_log = logging.getLogger("booking.example.client")
        caplog.set_level(logging.WARNING, logger=client_log.name)
        once, _ = failing(Busy(503, what="init"), httpx.ConnectTimeout("x"))
        await policy(log=client_log).call("init", once)
        retries = [r for r in caplog.records if r.name == client_log.name]
        assert [r.getMessage() for r in retries] == [
            "Example init attempt 1 failed (Example init answered 503); retrying in 0.00s",
            "Example init attempt 2 failed (timed out (ConnectTimeout)); retrying in 0.00s",
        ]
        assert {r.levelno for r in retries} == {logging.WARNING}


class ExampleClosed(ClientClosed):
    pass


class ExampleClient(OutsideClient):
    system = "Example"
    closed_error = ExampleClosed

    def __init__(self, transport: httpx.AsyncBaseTransport, **options) -> None:
        self.timeout = 1.5
        self.transport = transport
        self.event_hooks = None
        self.options = options

    def _http_options(self):
        return self.options


def echo(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"url": str(request.url), "accept": request.headers["accept"]})


class TestOutsideClient:
    async def test_not_open_it_refuses_with_its_own_error_naming_the_system(self):
        client = ExampleClient(httpx.MockTransport(echo))

        with pytest.raises(ExampleClosed, match="the Example client is not open"):
            _ = client.http

    async def test_open_it_asks_for_json_through_the_cancel_safe_transport(self):
        client = ExampleClient(httpx.MockTransport(echo), base_url="http://example.test/api")
        async with client:
            http = client.http
            answer = (await http.get("/things")).json()

            assert answer == {"url": "http://example.test/api/things", "accept": "application/json"}
            assert isinstance(http._transport, CancelSafeTransport)
            assert http.timeout == httpx.Timeout(1.5) and not http.trust_env
            await client.open()  # opening again keeps the one client
            assert client.http is http

        assert http.is_closed
        with pytest.raises(ClientClosed):
            _ = client.http

    async def test_closing_a_client_never_opened_is_no_error(self):
        await ExampleClient(httpx.MockTransport(echo)).aclose()
