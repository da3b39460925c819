"""The control API under /_sandbox, for tests and demos (the token is checked before any route,
by booking.sandbox.control): consent without a browser, look at events and tokens, revoke an
account's access, expire access tokens, switch faults on, reset. Not Google's: its errors are
problem+json.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from booking.sandbox.google.browser import decide
from booking.sandbox.google.calendars import Calendars, Event
from booking.sandbox.google.faults import FaultEndpoint, FaultKind, Faults
from booking.sandbox.google.oauth import ConsentRefused, ConsentRequest, OAuth, normal_account
from booking.sandbox.settings import SandboxSettings


class ApproveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The full consent URL the service sent the browser to.
    auth_url: str
    # Who consents; default: the URL's login_hint, else the default account.
    account: str | None = None
    deny: bool = False


class RevokeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account: str = Field(min_length=1)


class ExpireRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Default: every account's.
    account: str | None = None


class FaultRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: FaultKind
    count: int = Field(default=1, ge=1)
    endpoint: FaultEndpoint = "any"
    # For "slow": how long each matching call stalls before it answers normally.
    seconds: float = Field(default=5.0, ge=0)


def control_router(
    settings: SandboxSettings,
    oauth: OAuth,
    calendars: Calendars,
    faults: Faults,
    clock: Callable[[], datetime],
) -> APIRouter:
    router = APIRouter(prefix="/_sandbox", include_in_schema=False)

    def listed(event: Event) -> dict[str, Any]:
        # Reading the list is not a client's read: the Meet data does not move on.
        return {
            **event.as_json(settings.google_public_url),
            "sandbox": {
                "account": event.account,
                "calendar": "primary",
                "send_updates": event.send_updates,
                "deleted_send_updates": event.deleted_send_updates,
                "meet_pending_reads": event.conference.pending_reads if event.conference else None,
            },
        }

    @router.post("/oauth/approve")
    async def approve(body: ApproveRequest) -> dict[str, Any]:
        params = dict(parse_qsl(urlsplit(body.auth_url).query, keep_blank_values=True))
        try:
            consent = ConsentRequest.parse(params, settings.google_client_id)
        except ConsentRefused as exc:
            # Google would show its error page; the test gets the same verdict.
            raise HTTPException(400, f"Google refuses this consent: {exc}") from None
        location = decide(oauth, consent, not body.deny, body.account, clock())
        return {"location": location}

    @router.get("/events")
    async def list_events(
        account: str | None = None, calendar: str | None = None
    ) -> dict[str, Any]:
        owner = normal_account(account) if account else None
        return {"events": [listed(e) for e in calendars.all(owner, calendar)]}

    @router.get("/tokens")
    async def list_tokens(account: str | None = None) -> dict[str, Any]:
        return oauth.as_json(normal_account(account) if account else None, clock())

    @router.post("/revoke")
    async def revoke(body: RevokeRequest) -> dict[str, Any]:
        account = normal_account(body.account)
        return {"account": account, "revoked": oauth.revoke(account, clock())}

    @router.post("/expire-access-tokens")
    async def expire_access_tokens(body: ExpireRequest | None = None) -> dict[str, Any]:
        account = normal_account(body.account) if body and body.account else None
        return {"expired": oauth.expire_access_tokens(account, clock())}

    @router.post("/faults")
    async def add_fault(body: FaultRequest) -> dict[str, Any]:
        faults.add(body.kind, body.count, body.endpoint, body.seconds)
        return {"faults": faults.as_json()}

    @router.get("/faults")
    async def list_faults() -> dict[str, Any]:
        return {"faults": faults.as_json()}

    @router.delete("/faults")
    async def clear_faults() -> dict[str, Any]:
        faults.clear()
        return {"faults": []}

    @router.post("/reset")
    async def reset() -> dict[str, Any]:
        oauth.clear()
        calendars.clear()
        faults.clear()
        return {"reset": True}

    return router
