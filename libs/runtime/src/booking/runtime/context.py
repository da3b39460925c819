"""The correlation chain of the work in progress, carried by context variables.

An HTTP request or a consumed message sets them; logs read them, and events recorded while they
are set inherit them, so one booking's trail can be followed across every service.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

correlation_id: ContextVar[str | None] = ContextVar("correlation_id", default=None)
causation_id: ContextVar[str | None] = ContextVar("causation_id", default=None)


def current_correlation_id() -> str:
    """The correlation id in force, or a fresh one (which then stays in force)."""
    value = correlation_id.get()
    if value is None:
        value = str(uuid.uuid4())
        correlation_id.set(value)
    return value


@contextmanager
def correlated(correlation: str | None, causation: str | None = None) -> Iterator[None]:
    c_token = correlation_id.set(correlation or str(uuid.uuid4()))
    k_token = causation_id.set(causation)
    try:
        yield
    finally:
        correlation_id.reset(c_token)
        causation_id.reset(k_token)
