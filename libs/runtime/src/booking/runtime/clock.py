"""The one clock every service reads: aware datetimes in UTC, never naive local time."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)
