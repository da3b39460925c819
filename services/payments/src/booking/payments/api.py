"""The payments service's HTTP routes: Konnect's webhook."""

from __future__ import annotations

import re

from fastapi import APIRouter, HTTPException, Query

from booking.contracts.http import WebhookResult
from booking.payments.service import KonnectCannotBeAsked, PaymentService, UnknownPaymentRef

# Konnect's payment refs are 24 hexadecimal characters (Mongo object ids).
PAYMENT_REF = re.compile(r"[0-9a-fA-F]{24}")

_PROBLEM = {"content": {"application/problem+json": {}}}


def webhook_router(payments: PaymentService) -> APIRouter:
    router = APIRouter(tags=["payments"])

    @router.get(
        "/api/payments/webhook",
        response_model=WebhookResult,
        responses={
            400: {"description": "payment_ref missing or malformed", **_PROBLEM},
            404: {"description": "no payment has this ref (an anomaly is raised)", **_PROBLEM},
            503: {"description": "Konnect could not be asked; reconciled later", **_PROBLEM},
        },
        summary="Konnect's payment notification (unsigned: we ask Konnect ourselves)",
    )
    async def receive_konnect_webhook(
        payment_ref: str | None = Query(None, description="the Konnect payment reference"),
    ) -> WebhookResult:
        if not payment_ref:
            raise HTTPException(400, "payment_ref is required: the Konnect payment reference")
        if not PAYMENT_REF.fullmatch(payment_ref):
            raise HTTPException(
                400, "payment_ref is not a Konnect payment reference (24 hexadecimal characters)"
            )
        try:
            answer = await payments.notify(payment_ref)
        except UnknownPaymentRef:
            raise HTTPException(404, f"no payment has the ref {payment_ref}") from None
        except KonnectCannotBeAsked:
            raise HTTPException(
                503,
                "Konnect could not be asked about this payment now; it will be reconciled, "
                "and a later notification is welcome",
                headers={"Retry-After": "30"},
            ) from None
        return WebhookResult(payment_ref=answer.payment_ref, status=answer.status)

    return router
