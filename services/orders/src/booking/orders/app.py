"""Composition root of the orders service: settings, runtime, use cases, subscribers, routes,
sweeper.

Nothing is created at import time; `create_app` builds it all, each part after what it uses,
and the lifespan starts the sweeper (one per replica) after the runtime has started, and stops it
before.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI

from booking.orders.api import router
from booking.orders.handlers import subscribers
from booking.orders.service import MentorService, OrderService
from booking.orders.settings import OrdersSettings
from booking.orders.sweeper import Sweeper
from booking.orders.tables import messaging
from booking.runtime.auth import check_order_link_settings
from booking.runtime.host import ServiceRuntime, create_service_app


def create_app(settings: OrdersSettings | None = None) -> FastAPI:
    settings = settings or OrdersSettings()
    runtime = ServiceRuntime(name="orders", settings=settings, tables=messaging)
    assert runtime.db is not None and runtime.outbox is not None
    # GET /api/orders/{id} takes order links: no start with a key anyone could derive.
    check_order_link_settings(settings)
    # OrderChanged goes out on it: declared before traffic (migrate) and at every start.
    runtime.broker.declare_fanout(settings.order_changes_exchange)
    orders = OrderService(
        runtime.db,
        runtime.outbox,
        messaging,
        horizon=timedelta(days=settings.booking_horizon_days),
        changes_exchange=settings.order_changes_exchange,
    )
    mentors = MentorService(
        runtime.db,
        runtime.outbox,
        messaging,
        max_price_major_units=settings.offering_max_price_major_units,
    )
    runtime.subscribe(subscribers(orders))
    runtime.on_scrape(orders.observe_oldest_pending)
    sweeper = Sweeper(orders, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sweeper.start()
        try:
            yield
        finally:
            await sweeper.stop()

    app = create_service_app(runtime, routers=[router], lifespan=lifespan)
    app.state.orders = orders
    app.state.mentors = mentors
    app.state.sweeper = sweeper
    return app
