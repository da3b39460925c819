"""The migrated table is what the code's table says: its columns, its numbers, its checks."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from booking.contracts import CalendarBookingFailed, CalendarFailureReason
from booking.notifications.tables import SCHEMA, admin_notifications


def calendar(reason: str) -> CalendarBookingFailed:
    return CalendarBookingFailed(
        session_id=uuid.uuid4(),
        order_id=uuid.uuid4(),
        mentor_id=uuid.uuid4(),
        reason=CalendarFailureReason(reason),
        detail="detail",
        attempts=1,
        # Failures the calendar retries on its schedule are news only once they are final.
        final=reason in ("store_not_found", "calendar_api_error", "unexpected_error"),
    )


async def test_unread_criticals_are_found_with_the_query_ops_would_write(notifications) -> None:
    read = await notifications.raise_(calendar("store_not_found"))
    unread = await notifications.raise_(calendar("unexpected_error"))
    await notifications.raise_(calendar("mentor_not_integrated"))  # an Error
    answer = await notifications.client.post(
        f"/api/admin/notifications/{read['id']}/read", headers=notifications.admin
    )
    assert answer.status_code == 200

    rows = await notifications.conn.fetch(
        "SELECT * FROM notifications.admin_notifications WHERE is_read = false AND severity = 3"
    )
    mine = [r for r in rows if r["id"] > notifications.baseline]
    assert [(r["id"], r["type"], r["severity"]) for r in mine] == [(unread["id"], 0, 3)]
    assert all(r["severity"] == 3 and r["is_read"] is False for r in rows)


async def test_the_migrated_table_is_the_code_s(db: asyncpg.Connection) -> None:
    columns = await db.fetch(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
        "WHERE table_schema = $1 AND table_name = 'admin_notifications' ORDER BY ordinal_position",
        SCHEMA,
    )
    assert [c["column_name"] for c in columns] == [c.name for c in admin_notifications.c]
    nullable = {c["column_name"] for c in columns if c["is_nullable"] == "YES"}
    assert nullable == {c.name for c in admin_notifications.c if c.nullable}
    types = {c["column_name"]: c["data_type"] for c in columns}
    assert (types["id"], types["type"], types["severity"]) == ("bigint", "smallint", "smallint")
    assert types["metadata"] == "jsonb"

    indexes = await db.fetch(
        "SELECT indexname FROM pg_indexes WHERE schemaname = $1 AND tablename = $2",
        SCHEMA,
        "admin_notifications",
    )
    assert {i["indexname"] for i in indexes} == {
        "admin_notifications_pkey",
        *(index.name for index in admin_notifications.indexes),
    }


@pytest.mark.parametrize(
    ("column", "value"), [("type", 5), ("severity", 4), ("severity", -1), ("occurrences", 0)]
)
async def test_the_table_refuses_numbers_outside_the_documented_range(
    db: asyncpg.Connection, column: str, value: int
) -> None:
    row = {"type": 0, "severity": 0, "occurrences": 1, column: value}
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            f"INSERT INTO {SCHEMA}.admin_notifications (type, severity, title, message, "
            "created_at, fingerprint, occurrences, last_occurred_at, is_open) "
            "VALUES ($1, $2, 't', 'm', now(), $3, $4, now(), false)",
            row["type"],
            row["severity"],
            uuid.uuid4().hex,
            row["occurrences"],
        )
