"""All of the notifications service's SQL: store an alert (deduplicated), list, read, delete,
count; and the mapping of the table's rows to domain.Notification.

Used by the service's use cases and the listing benchmark, always inside a transaction their
caller opened (a request's, or the consumer's for a message): nothing here commits.

Two locks keep the feed straight:
- the partial unique index on `fingerprint WHERE is_open` makes a repeat conflict with its open
  notification and count up on it: two consumers storing the same alert at once make one row,
  with no check before the insert to race;
- a transaction-level advisory lock taken before storing makes notifications commit in id
  order, so a reader that sees id N will never later see a smaller id appear: "after id K" (the
  websocket's replay) misses nothing. Alerts are few; serialising their writes costs little.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Row,
    Select,
    case,
    delete,
    func,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from booking.notifications.domain import (
    Alert,
    Cursor,
    FeedPage,
    Filters,
    Notification,
    NotificationType,
    Severity,
    Stored,
)
from booking.notifications.tables import admin_notifications as table

# pg_advisory_xact_lock key of "writing notifications" ('notif' in ASCII).
WRITE_LOCK = 0x6E6F74696600

_lock = text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=WRITE_LOCK)


async def store_alert(session: AsyncSession, alert: Alert, window: timedelta) -> Stored:
    """Store `alert`, or count it up on its fingerprint's open notification within `window`.

    A repeat that comes `window` or more after the open notification's first occurrence closes
    it and opens a new one. A repeat that happened before the latest occurrence (it arrived
    late) counts, but leaves the latest message and metadata as they are; one that happened
    before the first becomes the first. A tally's report counts all its occurrences, and its
    sample of refs merges into the open notification's (read under the writers' lock, so no
    other report merges in between).
    """
    await session.execute(_lock)
    if alert.tallied:
        open_ = (
            await session.execute(
                select(
                    table.c.metadata,
                    table.c.occurrences,
                    table.c.created_at,
                    table.c.last_occurred_at,
                ).where(
                    table.c.fingerprint == alert.fingerprint,
                    table.c.is_open,
                    # The upsert's own test below: within the window of its first occurrence.
                    table.c.created_at > alert.occurred_at - window,
                )
            )
        ).one_or_none()
        if open_ is not None:
            alert = alert.counted_onto(
                open_.metadata, open_.occurrences, open_.created_at, open_.last_occurred_at
            )
    values = {
        "type": int(alert.type),
        "severity": int(alert.severity),
        "title": alert.title,
        "message": alert.message,
        "metadata": alert.metadata,
        "created_at": alert.occurred_at,
        "last_occurred_at": alert.occurred_at,
        "fingerprint": alert.fingerprint,
        "occurrences": alert.occurrences,
    }
    statement = insert(table).values(values)
    new = statement.excluded
    # A tally's message and metadata were merged with the open one's: they are the latest.
    is_latest = literal(alert.tallied) | (new.last_occurred_at >= table.c.last_occurred_at)
    upsert = statement.on_conflict_do_update(
        index_elements=[table.c.fingerprint],
        index_where=table.c.is_open,
        set_={
            "occurrences": table.c.occurrences + new.occurrences,
            # Repeats can be handled out of order: the first occurrence is the earliest.
            "created_at": func.least(table.c.created_at, new.created_at),
            "last_occurred_at": func.greatest(table.c.last_occurred_at, new.last_occurred_at),
            "message": case((is_latest, new.message), else_=table.c.message),
            "metadata": case((is_latest, new.metadata), else_=table.c.metadata),
            # A repeat is news: the notification is unread again.
            "is_read": False,
            "read_at": None,
        },
        where=new.created_at < table.c.created_at + literal(window),
    ).returning(*table.c)
    for _ in range(3):
        row = (await session.execute(upsert)).one_or_none()
        if row is not None:
            return Stored(_notification(row), created=row.occurrences == alert.occurrences)
        # The open one is past its window (and locked by the conflict): close it, open anew.
        await session.execute(
            update(table)
            .where(table.c.fingerprint == alert.fingerprint, table.c.is_open)
            .values(is_open=False)
        )
    raise RuntimeError(f"could not store the alert {alert.fingerprint}")  # pragma: no cover


async def close(session: AsyncSession, fingerprints: list[str]) -> int:
    """Close the open notifications of these fingerprints: their next repeat opens a new one."""
    result = await session.execute(
        update(table)
        .where(table.c.fingerprint.in_(fingerprints), table.c.is_open)
        .values(is_open=False)
    )
    return _rowcount(result)


def _notification(row: Row[Any]) -> Notification:
    """A row of the table as the domain's notification (type and severity as their enums)."""
    return Notification(
        id=row.id,
        type=NotificationType(row.type),
        severity=Severity(row.severity),
        title=row.title,
        message=row.message,
        metadata=row.metadata,
        is_read=row.is_read,
        read_at=row.read_at,
        created_at=row.created_at,
        fingerprint=row.fingerprint,
        occurrences=row.occurrences,
        last_occurred_at=row.last_occurred_at,
    )


def _rowcount(result: object) -> int:
    """How many rows an UPDATE or DELETE (without RETURNING) changed."""
    return cast(CursorResult[Any], result).rowcount


# --- reading ----------------------------------------------------------------------------------


def _where(filters: Filters) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = []
    if filters.unread_only:
        clauses.append(~table.c.is_read)  # NOT is_read: the partial index's own predicate
    if filters.severity is not None:
        clauses.append(table.c.severity == int(filters.severity))
    if filters.min_severity is not None:
        clauses.append(table.c.severity >= int(filters.min_severity))
    if filters.type is not None:
        clauses.append(table.c.type == int(filters.type))
    if filters.since is not None:
        clauses.append(table.c.last_occurred_at >= filters.since)
    return clauses


def page_query(
    filters: Filters,
    *,
    limit: int,
    cursor: Cursor | None = None,
    after_id: int | None = None,
) -> Select[Any]:
    """The feed's query: newest first by id; ascending from `after_id` (or an ascending cursor).

    One more row than `limit` is asked for: its presence says there is a next page.
    """
    clauses = _where(filters)
    ascending = cursor.ascending if cursor is not None else after_id is not None
    if cursor is not None:
        clauses.append(table.c.id > cursor.last_id if ascending else table.c.id < cursor.last_id)
    elif after_id is not None:
        clauses.append(table.c.id > after_id)
    order = table.c.id.asc() if ascending else table.c.id.desc()
    return select(*table.c).where(*clauses).order_by(order).limit(limit + 1)


async def page(
    session: AsyncSession,
    filters: Filters,
    *,
    limit: int,
    cursor: Cursor | None = None,
    after_id: int | None = None,
) -> FeedPage:
    """A page of the feed (see `page_query`), and the cursor of the next one if there is one."""
    query = page_query(filters, limit=limit, cursor=cursor, after_id=after_id)
    rows = (await session.execute(query)).all()
    ascending = cursor.ascending if cursor is not None else after_id is not None
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = Cursor(rows[-1].id, ascending=ascending)
    return FeedPage(items=[_notification(r) for r in rows], next_cursor=next_cursor)


async def raised_per_day(
    session: AsyncSession, span: list[date]
) -> dict[tuple[date, Severity], int]:
    """How many notifications were raised per UTC day and severity over `span` (oldest first);
    a day and severity without any is absent.

    A notification counts once, on the day of its first occurrence (`created_at`).
    """
    start = datetime.combine(span[0], time.min, UTC)
    end = datetime.combine(span[-1] + timedelta(days=1), time.min, UTC)
    day = func.date(func.timezone("UTC", table.c.created_at)).label("day")
    rows = await session.execute(
        select(day, table.c.severity, func.count())
        .where(table.c.created_at >= start, table.c.created_at < end)
        .group_by(day, table.c.severity)
    )
    return {(d, Severity(s)): n for d, s, n in rows}


# --- changing -----------------------------------------------------------------------------------


async def mark_read(
    session: AsyncSession, notification_id: int, now: datetime
) -> Notification | None:
    """Mark one read (its first read_at stays); None when there is no such notification."""
    result = await session.execute(
        update(table)
        .where(table.c.id == notification_id)
        .values(is_read=True, read_at=func.coalesce(table.c.read_at, now))
        .returning(*table.c)
    )
    row = result.one_or_none()
    return None if row is None else _notification(row)


async def mark_all_read(session: AsyncSession, filters: Filters, now: datetime) -> int:
    """Mark every unread notification matching `filters` read; how many were."""
    # The writers' lock first, as they take it: a handler counting up a notification and
    # this statement never wait on each other's rows in opposite orders (no deadlock).
    await session.execute(_lock)
    result = await session.execute(
        update(table).where(~table.c.is_read, *_where(filters)).values(is_read=True, read_at=now)
    )
    return _rowcount(result)


async def remove(session: AsyncSession, notification_id: int) -> bool:
    """Delete one; False when there is no such notification."""
    result = await session.execute(
        delete(table).where(table.c.id == notification_id).returning(table.c.id)
    )
    return result.one_or_none() is not None
