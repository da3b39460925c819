"""What every client of an outside system (Konnect, Google) shares: reading Retry-After, naming
a failed call, and the two health checks of DESIGN section 7 (configured; reachable)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from booking.runtime.health import Observation, timed_ms


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


def describe_failure(error: BaseException) -> str:
    """A failed call in a few words. The text may hold the URL, never a credential: those
    travel in headers and bodies, which httpx's exceptions do not repeat."""
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
    """Any HTTP answer in time is reachable; no answer is warn, never fail (DESIGN 7): an outage
    at a provider must not take our pods out."""
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
