"""The Konnect stand-in: payment API v2 under /api/v2, the pay page, and a control API.

It behaves like the real Konnect of /work/shared/reference/providers.md (x-api-key auth, the
init and read shapes, `{"errors": [...]}` errors, unsigned GET webhooks with `payment_ref`), so
a client tested against it works against the real thing. On top, for tests and demos:

- `/pay/{ref}`: the page a payer opens at payUrl, with Pay and Fail buttons;
- `/_sandbox/...` (with the control token, booking.sandbox.control): complete (fully or
  partly), fail or expire a payment with the webhook once, twice, late or never; forge a webhook
  (to a payment's webhook URL or an allowed host only); queue faults (500, 503, 429, timeout)
  for the next calls; list payments and webhook deliveries; reset.

All state lives in memory, one set per app: tests create as many sandboxes as they like.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from fastapi import FastAPI

from booking.runtime.health import Health
from booking.runtime.problems import install_problem_handlers
from booking.sandbox.control import ControlGuard
from booking.sandbox.konnect.api import api_router
from booking.sandbox.konnect.control import control_router
from booking.sandbox.konnect.faults import Faults
from booking.sandbox.konnect.pay_page import pay_page_router
from booking.sandbox.konnect.payments import Payments
from booking.sandbox.konnect.webhooks import Webhooks
from booking.sandbox.settings import SandboxSettings

SERVICE = "sandbox-konnect"

__all__ = ["SERVICE", "create_app"]


def utc_now() -> datetime:
    return datetime.now(UTC)


def create_app(settings: SandboxSettings | None = None) -> FastAPI:
    settings = settings or SandboxSettings()
    payments = Payments()
    faults = Faults()
    webhooks = Webhooks(timeout_seconds=settings.konnect_webhook_timeout_seconds, clock=utc_now)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        # Late webhooks not sent yet die with the sandbox, as they would with Konnect's outage.
        await webhooks.aclose()

    app = FastAPI(title="Konnect sandbox", openapi_url=None, lifespan=lifespan)
    # problem+json for the sandbox's own routes (/_sandbox, /health); /api/v2 answers in
    # Konnect's errors form on its own, unknown paths included.
    install_problem_handlers(app)
    # /_sandbox needs the control token; everything else is the provider's, open as it is.
    app.add_middleware(ControlGuard, token=settings.control_api_token())
    # No dependencies: /health/live, /health/ready and /health all simply pass.
    app.include_router(Health(service=SERVICE).router())
    app.include_router(api_router(settings, payments, faults, utc_now))
    app.include_router(pay_page_router(payments, webhooks, utc_now))
    app.include_router(control_router(settings, payments, faults, webhooks, utc_now))
    return app
