"""Konnect API v2 under /api/v2: init-payment and the payment read, as the real one answers.

Every call needs `x-api-key`. Errors are Konnect's `{"errors": [{code, target, message}]}`,
never problem+json. A queued fault switch answers before anything else (auth included), as a
failing load balancer or rate limiter in front of the API would.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from booking.sandbox.konnect.faults import CallKind, FaultKind, Faults
from booking.sandbox.konnect.payments import InitPayment, Payments, validation_errors
from booking.sandbox.settings import SandboxSettings


def konnect_error(
    status: int, code: str, target: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return konnect_errors(status, [{"code": code, "target": target, "message": message}], headers)


def konnect_errors(
    status: int, errors: list[dict[str, str]], headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"errors": errors}, status_code=status, headers=headers)


async def fault_response(kind: FaultKind, hang_seconds: float) -> JSONResponse:
    if kind == "http_500":
        return konnect_error(500, "internal_error", "server", "an internal error occurred")
    if kind == "http_503":
        return konnect_error(503, "service_unavailable", "server", "the service is unavailable")
    if kind == "http_429":
        return konnect_error(
            429, "too_many_requests", "x-api-key", "rate limit exceeded", {"Retry-After": "1"}
        )
    await asyncio.sleep(hang_seconds)
    return konnect_error(504, "gateway_timeout", "server", "the upstream did not answer in time")


def api_router(
    settings: SandboxSettings,
    payments: Payments,
    faults: Faults,
    clock: Callable[[], datetime],
) -> APIRouter:
    router = APIRouter(prefix="/api/v2", include_in_schema=False)
    api_key = settings.konnect_api_key.get_secret_value().encode()

    async def refused(request: Request, call: CallKind | None) -> JSONResponse | None:
        """The fault or auth answer that replaces this call's own, if any."""
        if call and (kind := faults.take(call)):
            return await fault_response(kind, settings.konnect_timeout_fault_seconds)
        given = request.headers.get("x-api-key", "").encode()
        if not hmac.compare_digest(given, api_key):
            return konnect_error(
                401, "unauthorized", "x-api-key", "a valid API key is required in x-api-key"
            )
        return None

    @router.post("/payments/init-payment")
    async def init_payment(request: Request) -> Any:
        if answer := await refused(request, "init"):
            return answer
        try:
            body = json.loads(await request.body())
        except ValueError:
            return konnect_error(400, "invalid_json", "body", "the body is not valid JSON")
        try:
            init = InitPayment.model_validate(body)
        except ValidationError as exc:
            return konnect_errors(422, validation_errors(exc))
        payment = payments.open(init, settings.konnect_public_url, clock())
        return {"payUrl": payment.link, "paymentRef": payment.ref}

    @router.get("/payments/{payment_ref}")
    async def get_payment(payment_ref: str, request: Request) -> Any:
        if answer := await refused(request, "get"):
            return answer
        payment = payments.get(payment_ref)
        if payment is None:
            return konnect_error(
                404, "not_found", "paymentRef", f"no payment with the reference {payment_ref}"
            )
        return {"payment": payment.as_json(clock())}

    @router.api_route(
        "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    )
    async def unknown(path: str, request: Request) -> Any:
        if answer := await refused(request, None):
            return answer
        return konnect_error(
            404, "not_found", "path", f"{request.method} /api/v2/{path} does not exist"
        )

    return router
