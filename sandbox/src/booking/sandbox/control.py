"""The control API's token: what both sandboxes demand on /_sandbox, and what a client sends.

A control call can complete any payment for free and make the sandbox call out, so every one
needs `Authorization: Bearer <token>`: SANDBOX_CONTROL_TOKEN, or in development mode (`make run`,
the tests) DEVELOPMENT_CONTROL_TOKEN when that is unset. Outside development mode without a
token the control API is off: every call 401. The provider APIs and the browser pages (pay page,
consent page) never ask for it.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Generator

import httpx
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from booking.runtime.problems import problem
from booking.sandbox.settings import DEVELOPMENT_CONTROL_TOKEN

CONTROL_PREFIX = "/_sandbox"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="sandbox-control"'}

__all__ = ["CONTROL_PREFIX", "ControlAuth", "ControlGuard", "is_control_path"]


def is_control_path(path: str) -> bool:
    return path == CONTROL_PREFIX or path.startswith(f"{CONTROL_PREFIX}/")


class ControlGuard:
    """ASGI middleware: a /_sandbox request without the token is answered 401 problem+json.

    A middleware, not a route dependency: it answers before the body is read or the path is
    matched, so a caller without the token learns nothing (no 422, no 404) and changes nothing.
    """

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_control_path(scope["path"]):
            refused = self.refusal(Headers(scope=scope).get("authorization"))
            if refused is not None:
                response = problem(401, refused, instance=scope["path"])
                response.headers.update(CHALLENGE)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, authorization: str | None) -> str | None:
        """Why this Authorization header does not open the control API; None if it does."""
        if self.token is None:
            return (
                "the sandbox's control API is off: SANDBOX_CONTROL_TOKEN is not set (only "
                "development mode has a default token)"
            )
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return "the control API needs `Authorization: Bearer <SANDBOX_CONTROL_TOKEN>`"
        if not hmac.compare_digest(given.strip().encode(), self.token):
            return "the control token is not the sandbox's SANDBOX_CONTROL_TOKEN"
        return None


class ControlAuth(httpx.Auth):
    """For a client of the sandboxes: sends the control token on /_sandbox requests only (a
    client that also calls the provider APIs or the services leaks it nowhere else), unless the
    request has an Authorization header of its own.

    The token: the one given, else SANDBOX_CONTROL_TOKEN from the environment, else the
    development token (what `make run` and the tests' sandboxes take).
    """

    def __init__(self, token: str | None = None) -> None:
        from_environment = os.environ.get("SANDBOX_CONTROL_TOKEN", "").strip()
        self.token = token or from_environment or DEVELOPMENT_CONTROL_TOKEN

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if is_control_path(request.url.path) and "authorization" not in request.headers:
            request.headers["Authorization"] = f"Bearer {self.token}"
        yield request
