"""Composition root of the payments service: settings, runtime, Konnect, handlers, routes, sweeper.

Nothing is created at import time; `create_app` builds it all and the lifespan opens the Konnect
client and starts the sweeper (one per replica), after the runtime has started.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from booking.payments.api import escrow_router, webhook_router
from booking.payments.handlers import subscribers
from booking.payments.konnect import KonnectClient
from booking.payments.service import PaymentService
from booking.payments.settings import PaymentsSettings
from booking.payments.sweeper import Sweeper
from booking.payments.tables import messaging
from booking.runtime.auth import check_order_link_settings
from booking.runtime.host import ServiceRuntime, create_service_app
from booking.runtime.outside import configured_check, reachable_check


def create_app(settings: PaymentsSettings | None = None) -> FastAPI:
    settings = settings or PaymentsSettings()
    check_order_link_settings(settings)  # payments signs the order links of the return URLs
    konnect = KonnectClient.from_settings(settings)
    runtime = ServiceRuntime(name="payments", settings=settings, tables=messaging)
    assert runtime.db is not None and runtime.outbox is not None
    service = PaymentService(
        db=runtime.db, outbox=runtime.outbox, konnect=konnect, settings=settings
    )
    runtime.subscribe(subscribers(service))
    sweeper = Sweeper(service, settings)

    runtime.health.add(
        "konnect",
        "configured",
        lambda: configured_check("konnect", konnect.configured, konnect.api_url),
        ready=False,
        component_type="system",
    )
    runtime.health.add(
        "konnect",
        "reachable",
        lambda: reachable_check("konnect", konnect.ping, konnect.api_url),
        ready=False,  # an outage at Konnect must not take our pods out
        component_type="system",
        failure_status="warn",
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await konnect.open()
        sweeper.start()
        try:
            yield
        finally:
            await sweeper.stop()
            await konnect.aclose()

    app = create_service_app(
        runtime, [webhook_router(service), escrow_router(service)], lifespan=lifespan
    )
    app.state.payments = service
    app.state.sweeper = sweeper
    app.state.konnect = konnect
    return app
