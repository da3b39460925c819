"""All of the notifications service's SQL: store an alert (deduplicated), list, read, delete,
count; queue, claim and record the deliveries to people; and the mapping of the table's rows to
domain.Notification.

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
    and_,
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
    UNSENT,
    Alert,
    Channel,
    Cursor,
    DeliveryStatus,
    Dispatch,
    DueDelivery,
    FeedPage,
    Filters,
    NewDelivery,
    Notification,
    NotificationType,
    Severity,
    Stored,
)
from booking.notifications.tables import admin_notifications as table
from booking.notifications.tables import alert_deliveries as deliveries

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


async def lock_writes(session: AsyncSession) -> None:
    """The writers' lock, for a use case that reads the feed before it stores (it is taken again
    by `store_alert`, which is allowed: a transaction's advisory lock is its own)."""
    await session.execute(_lock)


async def is_open(session: AsyncSession, fingerprint: str) -> bool:
    """Whether a notification of `fingerprint` is open (its incident not yet ended)."""
    found = await session.scalar(
        select(table.c.id).where(table.c.fingerprint == fingerprint, table.c.is_open)
    )
    return found is not None


# --- deliveries to people ---------------------------------------------------------------------

_UNSENT = [status.value for status in UNSENT]
_QUEUED = [*_UNSENT, DeliveryStatus.sent.value]
MAX_ERROR = 2_000
"""The longest `last_error` kept."""


async def last_sent(
    session: AsyncSession, notification_id: int, channels: list[Channel]
) -> dict[Channel, datetime]:
    """When each of `channels` last sent `notification_id` (a channel that never did is absent)."""
    rows = await session.execute(
        select(deliveries.c.channel, func.max(deliveries.c.sent_at))
        .where(
            deliveries.c.notification_id == notification_id,
            deliveries.c.channel.in_([channel.value for channel in channels]),
            deliveries.c.sent_at.is_not(None),
        )
        .group_by(deliveries.c.channel)
    )
    return {Channel(channel): sent_at for channel, sent_at in rows}


async def queue_deliveries(session: AsyncSession, new: list[NewDelivery]) -> int:
    """Queue `new` deliveries; one already queued for its (notification, occurrence, channel) is
    left as it is. How many were queued."""
    if not new:
        return 0
    statement = (
        insert(deliveries)
        .values(
            [
                {
                    "notification_id": d.notification_id,
                    "occurrence": d.occurrence,
                    "channel": d.channel.value,
                    "idempotency_key": d.key,
                    "status": DeliveryStatus.pending.value,
                    "attempts": 0,
                    "next_attempt_at": d.due_at,
                    "payload": d.payload,
                    "created_at": d.queued_at,
                }
                for d in new
            ]
        )
        .on_conflict_do_nothing()
    )
    return _rowcount(await session.execute(statement))


async def due_deliveries(
    session: AsyncSession, now: datetime, channels: list[Channel], limit: int
) -> list[DueDelivery]:
    """Up to `limit` unsent deliveries on `channels` due at `now`, oldest due first, locked until
    the transaction ends (`SKIP LOCKED`: replicas share them); each with what is known of the
    other deliveries of its notification on its channel."""
    if not channels:
        return []
    locked = (
        await session.execute(
            select(
                deliveries.c.id,
                deliveries.c.notification_id,
                deliveries.c.occurrence,
                deliveries.c.channel,
            )
            .where(
                deliveries.c.status.in_(_UNSENT),
                deliveries.c.next_attempt_at <= now,
                deliveries.c.channel.in_([channel.value for channel in channels]),
            )
            .order_by(deliveries.c.next_attempt_at, deliveries.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    ).all()
    if not locked:
        return []
    siblings = await session.execute(
        select(
            deliveries.c.notification_id,
            deliveries.c.channel,
            func.max(deliveries.c.occurrence)
            .filter(deliveries.c.status.in_(_QUEUED))
            .label("newest"),
            func.max(deliveries.c.sent_at).label("last_sent_at"),
            # A due row's own lease has ended: only another one's can be in the future.
            func.max(deliveries.c.next_attempt_at)
            .filter(
                and_(
                    deliveries.c.status == DeliveryStatus.sending.value,
                    deliveries.c.next_attempt_at > now,
                )
            )
            .label("in_flight_until"),
        )
        .where(deliveries.c.notification_id.in_({row.notification_id for row in locked}))
        .group_by(deliveries.c.notification_id, deliveries.c.channel)
    )
    known = {(row.notification_id, row.channel): row for row in siblings}
    found = []
    for row in locked:
        sibling = known[(row.notification_id, row.channel)]
        found.append(
            DueDelivery(
                id=row.id,
                notification_id=row.notification_id,
                occurrence=row.occurrence,
                channel=Channel(row.channel),
                newest_occurrence=sibling.newest or row.occurrence,
                last_sent_at=sibling.last_sent_at,
                in_flight_until=sibling.in_flight_until,
            )
        )
    return found


async def claim_for_sending(
    session: AsyncSession, ids: list[int], now: datetime, lease_until: datetime
) -> list[Dispatch]:
    """Mark these deliveries (locked by `due_deliveries`) as being sent until `lease_until`, an
    attempt counted; what to send."""
    if not ids:
        return []
    rows = await session.execute(
        update(deliveries)
        .where(deliveries.c.id.in_(ids))
        .values(
            status=DeliveryStatus.sending.value,
            attempts=deliveries.c.attempts + 1,
            next_attempt_at=lease_until,
            last_attempt_at=now,
        )
        .returning(*deliveries.c)
    )
    return sorted(
        (
            Dispatch(
                id=row.id,
                notification_id=row.notification_id,
                occurrence=row.occurrence,
                channel=Channel(row.channel),
                key=row.idempotency_key,
                attempts=row.attempts,
                queued_at=row.created_at,
                payload=row.payload,
            )
            for row in rows
        ),
        key=lambda dispatch: ids.index(dispatch.id),
    )


async def postpone(session: AsyncSession, delivery_id: int, until: datetime) -> None:
    await session.execute(
        update(deliveries).where(deliveries.c.id == delivery_id).values(next_attempt_at=until)
    )


async def supersede(session: AsyncSession, ids: list[int]) -> None:
    """These deliveries will not be sent: a later occurrence goes on their channel instead."""
    if ids:
        await session.execute(
            update(deliveries)
            .where(deliveries.c.id.in_(ids))
            .values(status=DeliveryStatus.superseded.value)
        )


def _still_claimed(dispatch: Dispatch) -> ColumnElement[bool]:
    """The claim `dispatch` came from still holds: no other dispatcher took the row again after
    its lease ended (then that one records its own attempt)."""
    return and_(
        deliveries.c.id == dispatch.id,
        deliveries.c.status == DeliveryStatus.sending.value,
        deliveries.c.attempts == dispatch.attempts,
    )


async def record_sent(session: AsyncSession, dispatch: Dispatch, now: datetime) -> bool:
    """The channel took the delivery; False when the claim no longer held."""
    result = await session.execute(
        update(deliveries)
        .where(_still_claimed(dispatch))
        .values(status=DeliveryStatus.sent.value, sent_at=now)
    )
    return _rowcount(result) == 1


async def record_failure(
    session: AsyncSession, dispatch: Dispatch, error: str, next_attempt_at: datetime | None
) -> bool:
    """The attempt failed: due again at `next_attempt_at`, or given up (None). False when the
    claim no longer held."""
    status = DeliveryStatus.failed if next_attempt_at is None else DeliveryStatus.pending
    values: dict[str, Any] = {"status": status.value, "last_error": error[:MAX_ERROR]}
    if next_attempt_at is not None:
        values["next_attempt_at"] = next_attempt_at
    result = await session.execute(
        update(deliveries).where(_still_claimed(dispatch)).values(values)
    )
    return _rowcount(result) == 1


async def delivery_backlog(
    session: AsyncSession, now: datetime, channels: list[Channel]
) -> tuple[int, datetime | None]:
    """How many deliveries on `channels` are still to send, and when the oldest was queued. One
    held back by the quiet period and never tried yet is not backlog."""
    row = (
        await session.execute(
            select(func.count(), func.min(deliveries.c.created_at)).where(
                deliveries.c.status.in_(_UNSENT),
                deliveries.c.channel.in_([channel.value for channel in channels]),
                (deliveries.c.attempts > 0) | (deliveries.c.next_attempt_at <= now),
            )
        )
    ).one()
    return row[0], row[1]
