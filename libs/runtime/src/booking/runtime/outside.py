"""What every client of an outside system (Konnect, Google) shares: the lifecycle of its HTTP
client, reading Retry-After, the retry policy, naming a failed call, and the two health checks
of docs/health.md (configured; reachable); and whether a host is this machine."""

from __future__ import annotations

import ipaddress
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Self, TypeVar

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception,
)

from booking.runtime import metrics
from booking.runtime.health import Observation, timed_ms
from booking.runtime.transport import CancelSafeTransport

T = TypeVar("T")

log = logging.getLogger(__name__)


class ClientClosed(RuntimeError):
    """The client is not open: the app is starting or stopping. Not the outside system's answer."""


class OutsideClient:
    """One `httpx.AsyncClient` per process, opened and closed by the app's lifespan (`open`,
    `aclose`, or `async with`), and `http`, which refuses while it is not open.

    A subclass names its `system` and has `timeout`, `transport` (the innermost one, for tests;
    None: the network) and `event_hooks`; `_http_options` adds what its client needs besides
    (a base_url). Every request goes through `CancelSafeTransport` and answers JSON."""

    system: ClassVar[str]  # "Konnect", "Google": for the error
    closed_error: ClassVar[type[ClientClosed]] = ClientClosed  # a subclass may name its own
    timeout: float
    transport: httpx.AsyncBaseTransport | None
    event_hooks: dict[str, list[Callable[..., Any]]] | None
    _http: httpx.AsyncClient | None = None

    def _http_options(self) -> dict[str, Any]:
        return {}

    async def open(self) -> None:
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout),
                headers={"accept": "application/json"},
                transport=CancelSafeTransport(inner=self.transport),
                event_hooks=self.event_hooks,
                trust_env=False,  # reached as configured, never via a proxy from the environment
                **self._http_options(),
            )

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            raise self.closed_error(
                f"the {self.system} client is not open (the app's lifespan opens it)"
            )
        return self._http


def retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (either form of the header), None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class TransientAnswer(Exception):
    """An answer worth another attempt (a 429, a 5xx, a rate limit), and the Retry-After it
    carried. Mixed in ahead of a client's own error, so the error keeps its client's fields:
    `class _Transient(TransientAnswer, KonnectError)`."""

    def __init__(self, *args: Any, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class RetriesExhausted(Exception):
    """Every attempt the policy allows failed, or a Retry-After asked for longer than it waits.
    The client turns it into its own "unavailable" error."""

    def __init__(self, what: str, attempts: int, last: BaseException) -> None:
        self.what = what
        self.attempts = attempts
        self.last = last
        super().__init__(f"{what} failed after {attempts} attempt(s): {describe_failure(last)}")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded retries of one call to an outside system. Timeouts, transport errors and
    `TransientAnswer`s are retried with exponential backoff and full jitter, at most
    `max_attempts` in all; a Retry-After is honoured up to `retry_after_max`, and a longer one
    ends the retries (the caller has better things to do than wait). Anything else is an
    answer and goes straight back to the caller."""

    system: str  # who is called, for the log line: "Konnect", "Google"
    max_attempts: int
    base: float  # seconds; the n-th wait is at most base x 2^(n-1)
    retry_after_max: float
    log: logging.Logger = log  # a client passes its own, so its lines stay under its name

    @staticmethod
    def retryable(error: BaseException) -> bool:
        return isinstance(error, TransientAnswer | httpx.TimeoutException | httpx.TransportError)

    def waits_too_long(self, error: BaseException | None) -> bool:
        """The answer asks us to wait longer than we are willing to."""
        return (
            isinstance(error, TransientAnswer)
            and error.retry_after is not None
            and error.retry_after > self.retry_after_max
        )

    def wait(self, attempt: int, error: BaseException | None) -> float:
        """Seconds to wait after failed attempt number `attempt` (from 1)."""
        # Full jitter: a random wait up to base x 2^(n-1), so replicas do not retry in step.
        backoff = random.uniform(0, self.base * 2 ** (attempt - 1))
        if isinstance(error, TransientAnswer) and error.retry_after is not None:
            return max(backoff, error.retry_after)
        return backoff

    async def call(self, what: str, once: Callable[[int], Awaitable[T]]) -> T:
        """`once(attempt)` (attempt counts from 1) until it returns, raises what is not worth
        another attempt, or the retries end in `RetriesExhausted`. Each call is counted by its
        result, timed (retries and waits included) and its retries counted (metrics.py)."""
        attempts = AsyncRetrying(
            retry=retry_if_exception(self.retryable),
            stop=self._stop,
            wait=self._wait,
            before_sleep=lambda state: self._log_retry(what, state),
        )
        started = time.perf_counter()
        result: str | None = None  # a cancelled call has no result: not counted
        try:
            async for attempt in attempts:
                with attempt:
                    answer = await once(attempt.retry_state.attempt_number)
                    result = "ok"
                    return answer
        except RetryError as exhausted:
            result = "unavailable"
            last = exhausted.last_attempt.exception()
            assert last is not None  # only a failed attempt is retried, so only one ends them
            raise RetriesExhausted(what, exhausted.last_attempt.attempt_number, last) from last
        except Exception:
            result = "refused"
            raise
        finally:
            if result is not None:
                provider = self.system.lower()
                _calls(provider, what, result).inc()
                _latency(provider, what).observe(time.perf_counter() - started)
        raise AssertionError("unreachable")  # pragma: no cover

    def _stop(self, state: RetryCallState) -> bool:
        """After the last attempt, or at an answer that asks for too long a wait."""
        return state.attempt_number >= self.max_attempts or self.waits_too_long(_failure(state))

    def _wait(self, state: RetryCallState) -> float:
        return self.wait(state.attempt_number, _failure(state))

    def _log_retry(self, what: str, state: RetryCallState) -> None:
        _retries(self.system.lower(), what).inc()
        error = _failure(state)
        self.log.warning(
            "%s %s attempt %d failed (%s); retrying in %.2fs",
            self.system,
            what,
            state.attempt_number,
            describe_failure(error) if error else "?",
            state.next_action.sleep if state.next_action else 0.0,
        )


_calls = metrics.Children(metrics.PROVIDER_CALLS)
_latency = metrics.Children(metrics.PROVIDER_LATENCY)
_retries = metrics.Children(metrics.PROVIDER_RETRIES)


def _failure(state: RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome else None


def describe_failure(error: BaseException) -> str:
    """A failed call in a few words. The text may hold the URL, never a credential: those
    travel in headers and bodies, which httpx's exceptions do not repeat."""
    if isinstance(error, TransientAnswer):
        return str(error)  # the client's own words for what the system answered
    if isinstance(error, httpx.TimeoutException):
        return f"timed out ({type(error).__name__})"
    if isinstance(error, httpx.TransportError):
        return f"unreachable ({type(error).__name__}: {error})"
    return f"{type(error).__name__}: {error}"


async def configured_check(component: str, missing: Sequence[str], target: str) -> Observation:
    """Pass when every setting the client needs is set; fail naming the missing ones."""
    if missing:
        return Observation(
            component, "configured", "fail", "system", output=f"not set: {', '.join(missing)}"
        )
    return Observation(component, "configured", "pass", "system", output=target)


async def reachable_check(
    component: str, ping: Callable[[], Awaitable[int]], target: str
) -> Observation:
    """Any HTTP answer in time is reachable; no answer is warn, never fail (docs/health.md): an
    outage at a provider must not take our pods out."""
    start = time.perf_counter()
    try:
        status = await ping()
    except httpx.HTTPError as error:
        return Observation(
            component, "reachable", "warn", "system", output=f"no answer: {describe_failure(error)}"
        )
    return Observation(
        component,
        "reachable",
        "pass",
        "system",
        timed_ms(start),
        "ms",
        output=f"HTTP {status} from {target}",
    )


def is_loopback_host(host: str) -> bool:
    """Whether `host` (a URL's host: a name or an IP address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
