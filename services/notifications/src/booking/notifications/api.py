"""The admins' notification feed over HTTP (README: What the admins see): list, read, delete, count.

Admin only: the gateway forwards the caller's token and every route verifies it again (401
without one, 403 for another role). Bodies are the public contract's (`booking.contracts.http`);
errors are problem+json, a filter value the feed does not understand included (422).

Besides the public filters, the list takes `afterId=K`: the notifications with an id above K,
oldest first, paged the same way. That is how the gateway's websocket replays what an admin
missed; ids commit in order (feed.py), so such a replay has no gap.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from fastapi.responses import Response

from booking.contracts import http
from booking.notifications import feed
from booking.notifications.domain import Cursor, Filters, InvalidFilter
from booking.runtime.auth import Role, require_roles
from booking.runtime.db import Database, database

router = APIRouter(
    prefix="/api/admin/notifications",
    tags=["admin notifications"],
    dependencies=[Depends(require_roles(Role.ADMIN))],
)


async def filters(given: Annotated[http.FeedFilter, Query()]) -> Filters:
    try:
        return Filters.parse(**given.model_dump())
    except InvalidFilter as exc:
        raise HTTPException(422, str(exc)) from None


NotificationId = Annotated[int, Path(ge=1, le=2**63 - 1)]


@router.get("", response_model=http.NotificationPage)
async def list_notifications(
    chosen: Filters = Depends(filters),
    limit: int = Query(50, ge=1, le=200),
    cursor: str | None = Query(None, max_length=200),
    after_id: int | None = Query(
        None,
        alias="afterId",
        ge=0,
        le=2**63 - 1,
        description="only ids above this one, oldest first (the websocket's replay)",
    ),
    db: Database = Depends(database),
) -> http.NotificationPage:
    """Newest first (by id), or oldest first after `afterId`; `next_cursor` continues."""
    try:
        position = None if cursor is None else Cursor.decode(cursor)
    except InvalidFilter as exc:
        raise HTTPException(422, str(exc)) from None
    async with db.transaction() as session:
        return await feed.page(session, chosen, limit=limit, cursor=position, after_id=after_id)


@router.post("/read-all", response_model=http.MarkedRead)
async def mark_all_read(
    chosen: Filters = Depends(filters), db: Database = Depends(database)
) -> http.MarkedRead:
    """Mark every unread notification matching the filters read (all of them without any)."""
    async with db.transaction() as session:
        updated = await feed.mark_all_read(session, chosen, datetime.now(UTC))
    return http.MarkedRead(updated=updated)


@router.get("/summary", response_model=http.NotificationSummary)
async def summarize_notifications(
    days: int = Query(7, ge=1, le=366), db: Database = Depends(database)
) -> http.NotificationSummary:
    """Notifications raised per UTC day and severity, over the last `days` days (today too)."""
    async with db.transaction() as session:
        return await feed.summary(session, days, datetime.now(UTC))


@router.post("/{notification_id}/read", response_model=http.Notification)
async def mark_read(
    notification_id: NotificationId, db: Database = Depends(database)
) -> http.Notification:
    async with db.transaction() as session:
        row = await feed.mark_read(session, notification_id, datetime.now(UTC))
    if row is None:
        raise HTTPException(404, f"there is no notification {notification_id}")
    return feed.notification(row)


@router.delete("/{notification_id}", status_code=204, response_class=Response)
async def delete_notification(
    notification_id: NotificationId, db: Database = Depends(database)
) -> Response:
    async with db.transaction() as session:
        removed = await feed.remove(session, notification_id)
    if not removed:
        raise HTTPException(404, f"there is no notification {notification_id}")
    return Response(status_code=204)
