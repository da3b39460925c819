"""The Google stand-in: OAuth 2.0 (consent page and token endpoint) and Calendar API v3.

It behaves like the real Google of /work/shared/reference/providers.md (the consent checks,
codes good once for ten minutes, refresh tokens only for offline access, invalid_grant for a
dead one; Bearer auth, client-chosen event ids with 409 duplicate, Meet data that may stay
`pending` for a few reads, deletion as 204 then 410 `deleted`, Google's error shape), so a
client tested against it works against the real thing. On top, for tests and demos,
`/_sandbox/...` (with the control token, booking.sandbox.control): consent without a browser,
list events (with their status) and tokens, revoke an account's access, expire access tokens,
queue faults (500, 503, 429, 403 rate limit or quota, slow) for the next calls, reset.

All state lives in memory, one set per app: tests create as many sandboxes as they like.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from fastapi import FastAPI

from booking.runtime.health import Health
from booking.runtime.problems import install_problem_handlers
from booking.sandbox.control import ControlGuard
from booking.sandbox.google.api import calendar_router
from booking.sandbox.google.browser import browser_router
from booking.sandbox.google.calendars import Calendars
from booking.sandbox.google.clock import utc_now
from booking.sandbox.google.control import control_router
from booking.sandbox.google.faults import Faults
from booking.sandbox.google.oauth import OAuth
from booking.sandbox.google.token import token_router
from booking.sandbox.settings import SandboxSettings

SERVICE = "sandbox-google"

__all__ = ["SERVICE", "create_app"]


def create_app(
    settings: SandboxSettings | None = None, clock: Callable[[], datetime] = utc_now
) -> FastAPI:
    """`clock` lets a test move time on (codes and access tokens expire by it)."""
    settings = settings or SandboxSettings()
    oauth = OAuth()
    calendars = Calendars()
    faults = Faults()

    app = FastAPI(title="Google sandbox", openapi_url=None)
    # problem+json for the sandbox's own routes (/_sandbox, /health); the token endpoint and
    # /calendar/v3 answer in Google's shapes on their own, unknown API paths included.
    install_problem_handlers(app)
    # /_sandbox needs the control token; everything else is the provider's, open as it is.
    app.add_middleware(ControlGuard, token=settings.control_api_token())
    # No dependencies: /health/live, /health/ready and /health all simply pass.
    app.include_router(Health(service=SERVICE).router())
    app.include_router(browser_router(settings, oauth, calendars, clock))
    app.include_router(token_router(settings, oauth, faults, clock))
    app.include_router(calendar_router(settings, oauth, calendars, faults, clock))
    app.include_router(control_router(settings, oauth, calendars, faults, clock))
    return app
