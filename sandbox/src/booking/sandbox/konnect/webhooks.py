"""Webhook calls as Konnect makes them, and the log of every one made.

Konnect calls `GET <webhook URL>` with `payment_ref=<ref>` appended to the URL's query, with no
body and no signature. It may call twice, late, or never; the modes below stage each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx

from booking.runtime.outside import is_loopback_host
from booking.runtime.transport import CancelSafeTransport
from booking.sandbox.konnect.payments import iso

log = logging.getLogger(__name__)

# once/twice: called before the control call answers (twice: two calls at the same time);
# late: called in the background after a delay; none: never called (a lost webhook).
WebhookMode = Literal["once", "twice", "none", "late"]


def with_payment_ref(url: str, ref: str) -> str:
    """`url` with `payment_ref=<ref>` added to whatever query it already has."""
    parts = urlsplit(url)
    extra = urlencode({"payment_ref": ref})
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit(parts._replace(query=query))


def forged_webhook_target(url: str, ref: str) -> str:
    """The host a forged webhook to `url` would reach, as the client that sends it reads the URL
    (not as another parser might: they disagree on odd URLs)."""
    return httpx.URL(with_payment_ref(url, ref)).host.lower()


def may_forge_to(
    url: str, host: str, webhooks: Collection[str], hosts: Collection[str], loopback: bool
) -> bool:
    """Whether a forged webhook may go to `url` (whose host is `host`): the webhook URL of a
    payment the sandbox holds, an allowed host, or with `loopback` any loopback address.
    Anything else would make the sandbox a relay to every address it can reach."""
    if url in webhooks or host in hosts:
        return True
    return loopback and is_loopback_host(host)


@dataclass
class Delivery:
    url: str
    payment_ref: str
    trigger: str
    at: str
    status_code: int | None = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Webhooks:
    timeout_seconds: float
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    deliveries: list[Delivery] = field(default_factory=list)
    _pending: set[asyncio.Task] = field(default_factory=set)
    _http: httpx.AsyncClient | None = None

    @property
    def http(self) -> httpx.AsyncClient:
        # One client for every call: a client per webhook cost more CPU than the webhook itself.
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=self.timeout_seconds,
                # A proxy from the environment must not swallow loopback calls.
                trust_env=False,
                follow_redirects=False,
                transport=CancelSafeTransport(),
            )
        return self._http

    async def deliver(self, url: str, ref: str, trigger: str) -> Delivery:
        """One GET to the merchant; its outcome (status or error) goes to the log either way."""
        delivery = Delivery(with_payment_ref(url, ref), ref, trigger, iso(self.clock()))
        self.deliveries.append(delivery)
        try:
            response = await self.http.get(delivery.url)
            delivery.status_code = response.status_code
        except httpx.HTTPError as exc:
            delivery.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        log.info(
            "webhook delivered",
            extra={
                "url": delivery.url,
                "payment_ref": ref,
                "trigger": trigger,
                "status_code": delivery.status_code,
                "error": delivery.error,
            },
        )
        return delivery

    async def notify(
        self, url: str | None, ref: str, mode: WebhookMode, delay: float, trigger: str
    ) -> list[Delivery]:
        """Call the payment's webhook as `mode` says; the calls made before returning."""
        if url is None or mode == "none":
            return []
        if mode == "late":
            self._later(url, ref, delay, trigger)
            return []
        times = 2 if mode == "twice" else 1
        return list(await asyncio.gather(*(self.deliver(url, ref, trigger) for _ in range(times))))

    def _later(self, url: str, ref: str, delay: float, trigger: str) -> None:
        async def deliver_late() -> None:
            await asyncio.sleep(delay)
            await self.deliver(url, ref, trigger)

        task = asyncio.create_task(deliver_late())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def cancel_pending(self) -> None:
        """Drop the late calls not made yet (on reset and on shutdown)."""
        tasks = list(self._pending)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def aclose(self) -> None:
        await self.cancel_pending()
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()

    async def reset(self) -> None:
        await self.cancel_pending()
        self.deliveries.clear()
