"""The ops queries of docs/operations.md, read from the document itself, against a migrated
notifications schema holding notifications of every kind, age and state."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from booking.devtools.fixtures import with_database
from booking.notifications.domain import NotificationType as T
from booking.notifications.domain import Severity as S

pytestmark = pytest.mark.timeout(180)


def ops_queries(document: str) -> dict[str, str]:
    """Each ```sql block of the "Ops queries" section, by the comment on its first line."""
    section = document.split("\n## Ops queries\n", 1)[1].split("\n## ", 1)[0]
    queries = {}
    for block in re.findall(r"```sql\n(.*?)```", section, re.S):
        first, _, _ = block.partition("\n")
        assert first.startswith("-- "), f"an ops query must open with `-- <what it is>`: {block}"
        queries[first.removeprefix("-- ").strip()] = block
    return queries


@dataclass(frozen=True)
class Raised:
    type: T
    severity: S
    first: timedelta  # how long ago it first occurred
    last: timedelta  # how long ago it last occurred
    occurrences: int = 1
    read: bool = False
    reason: str | None = None


# Named for what each is in the queries' eyes.
NOTIFICATIONS = {
    "calendar failure, critical, now": Raised(
        T.IntegrationFailure, S.Critical, timedelta(hours=1), timedelta(hours=1),
        reason="integration_revoked",
    ),
    "payment anomaly, critical, read": Raised(
        T.PaymentAnomaly, S.Critical, timedelta(hours=3), timedelta(hours=3), read=True
    ),
    "calendar failure, repeated until 2 hours ago": Raised(
        T.IntegrationFailure, S.Error, timedelta(days=3), timedelta(hours=2), occurrences=4,
        reason="calendar_api_error",
    ),
    "calendar failure, 26 hours ago": Raised(
        T.IntegrationFailure, S.Error, timedelta(hours=30), timedelta(hours=26),
        reason="mentor_not_integrated",
    ),
    "system error, critical, 10 days ago": Raised(
        T.SystemError, S.Critical, timedelta(days=10), timedelta(days=10)
    ),
    "health check, warning, 2 days ago": Raised(
        T.HealthCheckFailure, S.Warning, timedelta(days=2), timedelta(days=2)
    ),
    "session issue, info, now": Raised(
        T.SessionIssue, S.Info, timedelta(minutes=5), timedelta(minutes=5), read=True
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
async def notifications_db(database_url: str, deploy) -> AsyncIterator[tuple[str, dict]]:
    """A database of its own with the notifications schema migrated and NOTIFICATIONS in it;
    yields its URL and each notification's id by name."""
    database = f"booking_ops_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    url = with_database(database_url, database)
    try:
        result = await asyncio.to_thread(deploy.migrate, "notifications", url)
        assert result.returncode == 0, result.stderr
        now = datetime.now(UTC)
        conn = await asyncpg.connect(url)
        try:
            ids = {}
            # Oldest first, as they would have arrived: ids grow with time.
            for name, n in sorted(NOTIFICATIONS.items(), key=lambda item: -item[1].first):
                ids[name] = await conn.fetchval(
                    "INSERT INTO notifications.admin_notifications (type, severity, title,"
                    " message, metadata, is_read, read_at, created_at, fingerprint, occurrences,"
                    " last_occurred_at) VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10,"
                    " $11) RETURNING id",
                    int(n.type),
                    int(n.severity),
                    name,
                    f"{name}: what happened",
                    json.dumps({"reason": n.reason} if n.reason else {}),
                    n.read,
                    now if n.read else None,
                    now - n.first,
                    f"deploy-test:{name}",
                    n.occurrences,
                    now - n.last,
                )
        finally:
            await conn.close()
        yield url, ids
    finally:
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(scope="module")
def queries(deploy) -> dict[str, str]:
    return ops_queries((deploy.root / "docs" / "operations.md").read_text())


async def run(url: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(query)
    finally:
        await conn.close()


def test_the_document_has_the_three_ops_queries(queries):
    assert set(queries) == {
        "unread critical",
        "integration failures in the last 24 hours",
        "7-day summary by severity",
    }


async def test_unread_critical_lists_unread_critical_ones_of_any_age_newest_first(
    notifications_db, queries
):
    url, ids = notifications_db
    rows = await run(url, queries["unread critical"])
    assert [r["id"] for r in rows] == [
        ids["calendar failure, critical, now"],
        ids["system error, critical, 10 days ago"],
    ]


async def test_integration_failures_are_those_that_occurred_in_the_last_24_hours(
    notifications_db, queries
):
    url, ids = notifications_db
    rows = await run(url, queries["integration failures in the last 24 hours"])
    assert [(r["id"], r["reason"]) for r in rows] == [
        (ids["calendar failure, critical, now"], "integration_revoked"),
        (ids["calendar failure, repeated until 2 hours ago"], "calendar_api_error"),
    ]
    assert [r["occurrences"] for r in rows] == [1, 4]


async def test_the_7_day_summary_counts_by_severity_gravest_first(notifications_db, queries):
    url, _ = notifications_db
    rows = await run(url, queries["7-day summary by severity"])
    assert [tuple(r.values()) for r in rows] == [
        # severity, name, notifications, occurrences, unread
        (3, "Critical", 2, 2, 1),
        (2, "Error", 2, 5, 2),
        (1, "Warning", 1, 1, 1),
        (0, "Info", 1, 1, 0),
    ]
