"""The payments service's HTTP routes: Konnect's webhook, and an admin's view and settlement of
an order's escrow."""

from __future__ import annotations

import math
import re
import uuid
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.exceptions import RequestValidationError

from booking.contracts import http
from booking.contracts.http import WebhookResult
from booking.payments.domain import EscrowHold
from booking.payments.service import (
    KonnectCannotBeAsked,
    LookupsSpent,
    NoEscrow,
    PaymentService,
    UnknownPaymentRef,
)
from booking.runtime.auth import Identity, Role, require_roles
from booking.runtime.domain import IllegalTransition

# Konnect's payment refs are 24 hexadecimal characters (Mongo object ids).
PAYMENT_REF = re.compile(r"[0-9a-fA-F]{24}")

# Retry-After of a webhook refused a lookup: the budget's own wait, within these bounds.
_RETRY_AFTER_SECONDS = (1, 60)

_PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}


def webhook_router(payments: PaymentService) -> APIRouter:
    router = APIRouter(tags=["payments"])

    @router.get(
        "/api/payments/webhook",
        response_model=WebhookResult,
        responses={
            400: {"description": "payment_ref missing or malformed", **_PROBLEM},
            404: {"description": "no payment has this ref (the admins are told)", **_PROBLEM},
            503: {
                "description": "Konnect could not be asked (out of reach, or webhooks used their "
                "share of the lookups Konnect allows); reconciled later",
                **_PROBLEM,
            },
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
        except LookupsSpent as spent:
            low, high = _RETRY_AFTER_SECONDS
            wait = high if math.isinf(spent.retry_after) else math.ceil(spent.retry_after)
            raise HTTPException(
                503,
                "Konnect cannot be asked about this payment now: webhooks have used their share "
                "of the lookups Konnect allows. It will be reconciled, and a later notification "
                "is welcome",
                headers={"Retry-After": str(min(max(wait, low), high))},
            ) from None
        return WebhookResult(payment_ref=answer.payment_ref, status=answer.status)

    return router


def escrow_view(hold: EscrowHold) -> http.Escrow:
    """The hold as an admin sees it (http.Escrow)."""
    refund = hold.refund_amount
    return http.Escrow(
        order_id=hold.order_id,
        status=hold.status.value,
        escrow_amount=http.Money(amount=hold.amount, currency=hold.currency),
        refund_amount=None if refund is None else http.Money(amount=refund, currency=hold.currency),
        reason=hold.reason,
        reference=hold.refund_reference,
        release_due_at=hold.release_due_at,
        updated_at=hold.updated_at,
    )


def escrow_router(payments: PaymentService) -> APIRouter:
    """An order's escrow for the admins (docs/recovery.md sections 4 and 7)."""
    router = APIRouter(prefix="/api/admin/orders/{order_id}/escrow", tags=["escrow"])
    admin = require_roles(Role.ADMIN)
    errors: dict[int | str, dict[str, Any]] = {
        404: {"description": "the order has no escrow: nothing is held or owed for it", **_PROBLEM},
    }

    def no_escrow(order_id: uuid.UUID) -> HTTPException:
        return HTTPException(
            404,
            f"order {order_id} has no escrow: nothing is held or owed for it (no payment in "
            "full, and no money owed back)",
        )

    @router.get(
        "", response_model=http.Escrow, responses=errors, summary="An order's escrow, as held"
    )
    async def get_escrow(order_id: uuid.UUID, _: Identity = Depends(admin)) -> http.Escrow:
        try:
            return escrow_view(await payments.escrow_of(order_id))
        except NoEscrow:
            raise no_escrow(order_id) from None

    @router.post(
        "",
        response_model=http.Escrow,
        responses={
            **errors,
            409: {"description": "the escrow's state does not allow this move", **_PROBLEM},
            422: {"description": "a bad body; `refunded` without its reference", **_PROBLEM},
        },
        summary="Settle an order's escrow: release it, refund it, or record the refund made",
    )
    async def settle_escrow(
        order_id: uuid.UUID, body: http.EscrowSettlement, identity: Identity = Depends(admin)
    ) -> http.Escrow:
        if body.action == "refunded" and body.reference is None:
            raise RequestValidationError(
                [
                    {
                        "loc": ("body", "reference"),
                        "msg": "the refund's payment reference is required to record it",
                        "type": "missing",
                    }
                ]
            )
        if body.action != "refunded" and body.reference is not None:
            raise RequestValidationError(
                [
                    {
                        "loc": ("body", "reference"),
                        "msg": f"a reference records a refund made; {body.action} takes none",
                        "type": "extra_forbidden",
                    }
                ]
            )
        try:
            hold = await payments.settle_escrow(
                order_id,
                body.action,
                reason=body.reason,
                by=identity.sub,
                reference=body.reference,
            )
        except NoEscrow:
            raise no_escrow(order_id) from None
        except IllegalTransition as refused:
            raise HTTPException(
                409,
                f"the escrow of order {order_id} is {refused.from_state.value}: "
                f"{body.action} is not allowed from there ({refused})",
            ) from None
        return escrow_view(hold)

    return router
