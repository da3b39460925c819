"""Errors as RFC 9457 problem+json: what went wrong, where, and what to do. No stack traces.

A request that meets a dependency that cannot be reached (the database away) is answered 503
with `Retry-After`, and the logs say so once in a while rather than once per request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from booking.runtime.outages import OutageLog, is_unreachable

PROBLEM_MEDIA_TYPE = "application/problem+json"
RETRY_AFTER_SECONDS = 5
log = logging.getLogger(__name__)


def problem(status: int, detail: str, *, title: str | None = None, **extra: Any) -> JSONResponse:
    body = {
        "type": "about:blank",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE)


def install_problem_handlers(
    app: FastAPI, dependency_errors: Iterable[type[Exception]] = ()
) -> None:
    """problem+json for every error. `dependency_errors`: the error classes of the service's
    drivers (SQLAlchemy's), answered 503 when they say the server is unreachable."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = problem(exc.status_code, str(exc.detail), instance=request.url.path)
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "field": ".".join(str(p) for p in err["loc"] if p != "body") or "body",
                "message": err["msg"],
            }
            for err in exc.errors()
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        return problem(
            422, f"the request is not valid: {detail}", instance=request.url.path, errors=errors
        )

    outage = OutageLog(log, "a dependency of the HTTP routes")

    async def unavailable_or_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Registered per class (not for Exception): Starlette re-raises what reaches its last
        # handler, and the server would log the whole trace again.
        if not is_unreachable(exc):
            return await unexpected(request, exc)
        outage.failed(exc, f"answering {request.method} {request.url.path}")
        response = problem(
            503,
            "a service this request needs cannot be reached for the moment; try again in "
            f"{RETRY_AFTER_SECONDS} seconds",
            instance=request.url.path,
        )
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response

    error_classes: tuple[type[Exception], ...] = (OSError, *dependency_errors)
    for error_class in error_classes:
        app.add_exception_handler(error_class, unavailable_or_unexpected)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "an unexpected error occurred; it has been logged")
