"""The alert webhook: a POST of Slack's incoming-webhook JSON (`text`, and the notification's
fields beside it) to ALERT_WEBHOOK_URL, with the delivery's `Idempotency-Key`.

Any 2xx is taken; anything else, no answer or a timeout is a failed attempt, tried again on
the dispatcher's schedule (never here: one attempt per claim). The URL is a secret (a Slack
webhook's path is its credential): only its scheme and host are ever shown.
"""

from __future__ import annotations

from typing import ClassVar
from urllib.parse import urlsplit

import httpx

from booking.notifications.dispatcher import DeliveryFailed
from booking.notifications.domain import Channel, Dispatch, webhook_body
from booking.runtime.outside import OutsideClient, describe_failure

MAX_ANSWER = 200
"""The most of a refusal's body kept in the delivery's error (Slack says why in a word)."""


class AlertWebhook(OutsideClient):
    system: ClassVar[str] = "alert webhook"
    channel = Channel.webhook

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        dashboard: str,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.dashboard = dashboard
        self.transport = transport
        self.event_hooks = None

    @property
    def target(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"

    async def send(self, dispatch: Dispatch) -> None:
        try:
            answer = await self.http.post(
                self.url,
                json=webhook_body(dispatch, self.dashboard),
                headers={"Idempotency-Key": dispatch.key},
            )
        except httpx.HTTPError as error:
            raise DeliveryFailed(describe_failure(error)) from None
        if not answer.is_success:
            said = " ".join(answer.text.split())[:MAX_ANSWER]
            raise DeliveryFailed(f"HTTP {answer.status_code}" + (f": {said}" if said else ""))
