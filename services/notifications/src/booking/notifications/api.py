"""The admins' notification feed over HTTP (docs/alerts.md): list, read, delete, count.

Admin only: the gateway forwards the caller's token and every route verifies it again (401
without one, 403 for another role). Bodies are the public contract's (`booking.contracts.http`);
errors are problem+json, a filter value the feed does not understand included (422).

Besides the public filters, the list takes `afterId=K`: the notifications with an id above K,
oldest first, paged the same way. That is how the gateway's websocket replays what an admin
missed; ids commit in order (repository.py), so such a replay has no gap.
"""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from fastapi.responses import Response

from booking.contracts import http
from booking.notifications.domain import Cursor, Filters, InvalidFilter, Notification
from booking.notifications.service import NotificationsService
from booking.runtime.auth import Role, require_roles


async def filters(given: Annotated[http.FeedFilter, Query()]) -> Filters:
    try:
        return Filters.parse(**given.model_dump())
    except InvalidFilter as exc:
        raise HTTPException(422, str(exc)) from None


NotificationId = Annotated[int, Path(ge=1, le=2**63 - 1)]


def shown(notification: Notification) -> http.Notification:
    return http.Notification(**notification.public_fields())


def notifications_router(notifications: NotificationsService) -> APIRouter:
    router = APIRouter(
        prefix="/api/admin/notifications",
        tags=["admin notifications"],
        dependencies=[Depends(require_roles(Role.ADMIN))],
    )

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
    ) -> http.NotificationPage:
        """Newest first (by id), or oldest first after `afterId`; `next_cursor` continues."""
        try:
            position = None if cursor is None else Cursor.decode(cursor)
        except InvalidFilter as exc:
            raise HTTPException(422, str(exc)) from None
        page = await notifications.page(chosen, limit=limit, cursor=position, after_id=after_id)
        return http.NotificationPage(
            items=[shown(n) for n in page.items],
            next_cursor=None if page.next_cursor is None else page.next_cursor.encode(),
        )

    @router.post("/read-all", response_model=http.MarkedRead)
    async def mark_all_read(chosen: Filters = Depends(filters)) -> http.MarkedRead:
        """Mark every unread notification matching the filters read (all of them without any)."""
        return http.MarkedRead(updated=await notifications.mark_all_read(chosen))

    @router.get("/summary", response_model=http.NotificationSummary)
    async def summarize_notifications(
        days: int = Query(7, ge=1, le=366),
    ) -> http.NotificationSummary:
        """Notifications raised per UTC day and severity, over the last `days` days (today too)."""
        counts = await notifications.summarize(days)
        return http.NotificationSummary(
            days=days,
            counts=[
                http.DayCount(
                    day=c.day, severity=cast(http.Severity, c.severity.name), count=c.count
                )
                for c in counts
            ],
        )

    @router.post("/{notification_id}/read", response_model=http.Notification)
    async def mark_read(notification_id: NotificationId) -> http.Notification:
        notification = await notifications.mark_read(notification_id)
        if notification is None:
            raise HTTPException(404, f"there is no notification {notification_id}")
        return shown(notification)

    @router.delete("/{notification_id}", status_code=204, response_class=Response)
    async def delete_notification(notification_id: NotificationId) -> Response:
        if not await notifications.delete(notification_id):
            raise HTTPException(404, f"there is no notification {notification_id}")
        return Response(status_code=204)

    return router
