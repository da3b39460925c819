"""The control API under /_sandbox, for tests and demos (the token is checked before any route,
by booking.sandbox.control): pay, fail, expire, forge webhooks, switch faults on, look at what
happened. Not Konnect's: its errors are problem+json.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from booking.sandbox.konnect.faults import FaultEndpoint, FaultKind, Faults
from booking.sandbox.konnect.payments import Payment, PaymentClosed, Payments
from booking.sandbox.konnect.webhooks import (
    WebhookMode,
    Webhooks,
    forged_webhook_target,
    may_forge_to,
)
from booking.sandbox.settings import SandboxSettings


class FailRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    webhook: WebhookMode = "once"
    delay_seconds: float = Field(default=2.0, ge=0)


class CompleteRequest(FailRequest):
    # Default: all that is still due; less makes a partial payment.
    amount: StrictInt | None = Field(default=None, gt=0)


class FaultRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: FaultKind
    count: int = Field(default=1, ge=1)
    endpoint: FaultEndpoint = "any"


class ForgedWebhook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^https?://")
    payment_ref: str


def control_router(
    settings: SandboxSettings,
    payments: Payments,
    faults: Faults,
    webhooks: Webhooks,
    clock: Callable[[], datetime],
) -> APIRouter:
    router = APIRouter(prefix="/_sandbox", include_in_schema=False)

    def find(ref: str) -> Payment:
        payment = payments.get(ref)
        if payment is None:
            raise HTTPException(404, f"the sandbox has no payment {ref}")
        return payment

    async def attempted(
        payment: Payment, attempt: Callable[[], object], body: FailRequest
    ) -> dict[str, Any]:
        try:
            attempt()
        except PaymentClosed as exc:
            raise HTTPException(409, f"payment {payment.ref}: {exc}") from None
        deliveries = await webhooks.notify(
            payment.request.webhook, payment.ref, body.webhook, body.delay_seconds, "control"
        )
        return {
            "payment": payment.as_json(clock()),
            "webhooks": [d.as_json() for d in deliveries],
        }

    @router.post("/payments/{ref}/complete")
    async def complete_payment(ref: str, body: CompleteRequest | None = None) -> dict[str, Any]:
        body = body or CompleteRequest()
        payment = find(ref)
        return await attempted(payment, lambda: payment.pay(body.amount, clock()), body)

    @router.post("/payments/{ref}/fail")
    async def fail_payment(ref: str, body: FailRequest | None = None) -> dict[str, Any]:
        body = body or FailRequest()
        payment = find(ref)
        return await attempted(payment, lambda: payment.fail(clock()), body)

    @router.post("/payments/{ref}/expire")
    async def expire_payment(ref: str) -> dict[str, Any]:
        payment = find(ref)
        now = clock()
        payment.expire(now)
        return {"payment": payment.as_json(now)}

    @router.get("/payments")
    async def list_payments(order_id: str | None = None) -> dict[str, Any]:
        now = clock()
        return {"payments": [p.as_json(now) for p in payments.all(order_id)]}

    @router.post("/webhooks/send")
    async def send_webhook(body: ForgedWebhook) -> dict[str, Any]:
        try:
            host = forged_webhook_target(body.url, body.payment_ref)
        except httpx.InvalidURL as exc:
            raise HTTPException(422, f"url: not a URL the sandbox can call ({exc})") from None
        ours = {p.request.webhook for p in payments.all() if p.request.webhook}
        allowed = settings.konnect_forged_webhook_hosts
        if not may_forge_to(body.url, host, ours, allowed, loopback=settings.development_mode):
            raise HTTPException(
                403,
                "the sandbox forges webhooks only to one of its payments' webhook URLs or to a "
                "host in SANDBOX_KONNECT_FORGED_WEBHOOK_HOSTS (loopback too in development "
                f"mode); {host} is neither",
            )
        delivery = await webhooks.deliver(body.url, body.payment_ref, "forged")
        return delivery.as_json()

    @router.get("/webhooks")
    async def list_deliveries() -> dict[str, Any]:
        return {"deliveries": [d.as_json() for d in webhooks.deliveries]}

    @router.post("/faults")
    async def add_fault(body: FaultRequest) -> dict[str, Any]:
        faults.add(body.kind, body.count, body.endpoint)
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
        payments.clear()
        faults.clear()
        await webhooks.reset()
        return {"reset": True}

    return router
