"""The notifications service, as the websocket asks it: the newest id (for `hello`) and the pages
of notifications after an id (for `resume`). Over HTTP, with the admin's own token, so the
service authorises the admin as it does for every other call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from booking.gateway.alerts.frames import Alert
from booking.runtime.context import current_correlation_id
from booking.runtime.transport import CancelSafeTransport

PATH = "/api/admin/notifications"


class NotificationsUnavailable(Exception):
    """The notifications service could not be asked, or gave no usable answer."""


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next_cursor: str | None


class Notifications:
    """One pooled client for every admin connection of this replica. `open()` before use."""

    def __init__(self, base_url: str, *, timeout: float, page_size: int) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.page_size = page_size
        self._client: httpx.AsyncClient | None = None

    async def open(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=httpx.Timeout(self.timeout),
                transport=CancelSafeTransport(50, 20),
                trust_env=False,  # as the forwarding clients: never through an HTTP_PROXY
            )

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def newest_id(self, token: str) -> int:
        """The id of the newest notification; 0 when there is none."""
        page = await self._page(token, {"limit": "1"})
        if not page.items:
            return 0
        return Alert.from_item(page.items[0]).id

    async def after(self, token: str, after_id: int) -> AsyncIterator[list[Alert]]:
        """Every notification with an id above `after_id`, oldest first, a page at a time."""
        params = {"afterId": str(after_id), "limit": str(self.page_size)}
        cursor: str | None = None
        while True:
            query = params if cursor is None else {**params, "cursor": cursor}
            page = await self._page(token, query)
            try:
                alerts = [Alert.from_item(item) for item in page.items]
            except ValueError as exc:
                raise NotificationsUnavailable(f"the notifications service listed {exc}") from None
            yield alerts
            if page.next_cursor is None or not alerts:
                return
            if page.next_cursor == cursor:
                raise NotificationsUnavailable("the notifications service repeated its cursor")
            cursor = page.next_cursor

    async def _page(self, token: str, params: dict[str, str]) -> Page:
        client = self._client
        if client is None:
            raise NotificationsUnavailable("the notifications client is not open")
        headers = {
            "authorization": f"Bearer {token}",
            "accept": "application/json",
            "x-correlation-id": current_correlation_id(),
        }
        try:
            # httpx times each phase on its own: this bounds the whole call.
            async with asyncio.timeout(self.timeout):
                response = await client.get(PATH, params=params, headers=headers)
        except (TimeoutError, httpx.TimeoutException):
            raise NotificationsUnavailable(
                f"the notifications service did not answer within {self.timeout:g}s"
            ) from None
        except httpx.HTTPError as exc:
            raise NotificationsUnavailable(
                f"the notifications service cannot be reached: {type(exc).__name__}"
            ) from None
        if response.status_code != 200:
            raise NotificationsUnavailable(
                f"the notifications service answered HTTP {response.status_code}"
            )
        try:
            body = response.json()
            items, next_cursor = body["items"], body.get("next_cursor")
        except (ValueError, KeyError, TypeError):
            raise NotificationsUnavailable(
                "the notifications service answered without items"
            ) from None
        if not isinstance(items, list) or not (next_cursor is None or isinstance(next_cursor, str)):
            raise NotificationsUnavailable("the notifications service answered an odd page")
        return Page(items, next_cursor)
