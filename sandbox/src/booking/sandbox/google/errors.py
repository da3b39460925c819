"""Google's error answers, and what a fault switch answers in place of a call.

Calendar API errors are `{"error": {"code", "message", "errors": [{domain, reason, message}],
"status"}}`; the token endpoint's are OAuth's `{"error", "error_description"}`. Never
problem+json: a client tested here must parse what Google sends.
"""

from __future__ import annotations

import asyncio

from fastapi.responses import JSONResponse

from booking.sandbox.google.calendars import CalendarError
from booking.sandbox.google.faults import CallKind, FaultKind, Faults

STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    410: "NOT_FOUND",  # deleted: gone for good
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
# kind -> (status, reason, message, domain) on the Calendar API
CALENDAR_FAULTS: dict[FaultKind, tuple[int, str, str, str]] = {
    "http_500": (500, "backendError", "Backend Error", "global"),
    "http_503": (503, "backendError", "The service is currently unavailable.", "global"),
    "http_429": (429, "rateLimitExceeded", "Rate Limit Exceeded", "usageLimits"),
    "rate_limit_403": (403, "rateLimitExceeded", "Rate Limit Exceeded", "usageLimits"),
    "quota_403": (403, "quotaExceeded", "Calendar usage limits exceeded.", "usageLimits"),
}
# kind -> (status, error, error_description) on the token endpoint
TOKEN_FAULTS: dict[FaultKind, tuple[int, str, str]] = {
    "http_500": (500, "internal_failure", "Backend Error"),
    "http_503": (503, "temporarily_unavailable", "The service is currently unavailable."),
    "http_429": (429, "rate_limit_exceeded", "Rate Limit Exceeded"),
    "rate_limit_403": (403, "rate_limit_exceeded", "Rate Limit Exceeded"),
    "quota_403": (403, "quota_exceeded", "Quota exceeded for this client."),
}
RETRY_LATER = {"Retry-After": "1"}


def calendar_error(
    status: int,
    reason: str,
    message: str,
    domain: str = "global",
    headers: dict[str, str] | None = None,
    **detail: str,
) -> JSONResponse:
    error = {"domain": domain, "reason": reason, "message": message, **detail}
    body = {
        "error": {
            "code": status,
            "message": message,
            "errors": [error],
            "status": STATUS.get(status, "UNKNOWN"),
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def refusal(exc: CalendarError) -> JSONResponse:
    return calendar_error(exc.status, exc.reason, exc.message, exc.domain)


def auth_error() -> JSONResponse:
    """401 for a missing, unknown, expired or revoked access token: refresh, then retry once."""
    return calendar_error(
        401,
        "authError",
        "Invalid Credentials",
        headers={
            "WWW-Authenticate": 'Bearer realm="https://accounts.google.com/", error="invalid_token"'
        },
        location="Authorization",
        locationType="header",
    )


def oauth_error(
    status: int, error: str, description: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": error, "error_description": description},
        status_code=status,
        headers={"Cache-Control": "no-store", "Pragma": "no-cache", **(headers or {})},
    )


async def faulted(faults: Faults, call: CallKind) -> JSONResponse | None:
    """The fault answer that replaces this call's own, if a switch matches it.

    A "slow" switch stalls the call and then lets it answer normally (None).
    """
    fault = faults.take(call)
    if fault is None:
        return None
    if fault.kind == "slow":
        await asyncio.sleep(fault.seconds)
        return None
    headers = RETRY_LATER if fault.kind == "http_429" else None
    if call == "token":
        status, error, description = TOKEN_FAULTS[fault.kind]
        return oauth_error(status, error, description, headers)
    status, reason, message, domain = CALENDAR_FAULTS[fault.kind]
    return calendar_error(status, reason, message, domain, headers)
