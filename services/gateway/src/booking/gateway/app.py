"""Composition root of the gateway: settings, runtime, limits, upstream clients, routes, the
system health monitor, the admins' live alert websocket and the order streams. No database."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware import Middleware

from booking.gateway import dashboard, return_page
from booking.gateway.alerts import AdminAlerts
from booking.gateway.api import routers
from booking.gateway.limits import BodyLimitMiddleware, rate_limiters
from booking.gateway.monitor import HealthMonitor, SystemHealth
from booking.gateway.order_stream import OrderStreams
from booking.gateway.settings import GatewaySettings
from booking.gateway.upstreams import Upstreams, service_urls
from booking.runtime.auth import check_order_link_settings
from booking.runtime.host import ServiceRuntime, create_service_app


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    runtime = ServiceRuntime(name="gateway", settings=settings)
    system = SystemHealth(
        runtime.health,
        service_urls(settings),
        timeout=settings.health_upstream_timeout_seconds,
        public_max_age=settings.health_public_max_age_seconds,
    )
    monitor = HealthMonitor(
        system,
        runtime.broker,
        exchange=settings.events_exchange,
        interval=settings.health_monitor_interval_seconds,
        failures_to_alert=settings.health_monitor_failures_to_alert,
    )
    alerts = AdminAlerts(settings, runtime.broker, runtime.verifier)
    alerts.add_checks(runtime.health)
    # The order streams take order links: no start with a key anyone could derive.
    check_order_link_settings(settings)
    order_streams = OrderStreams(settings, runtime.broker, runtime.verifier)
    order_streams.add_checks(runtime.health)

    @asynccontextmanager
    async def open_gateway(app: FastAPI) -> AsyncIterator[None]:
        async with Upstreams.open(settings) as upstreams, alerts.running():
            app.state.upstreams = upstreams
            await system.start()
            monitor.start()
            try:
                yield
            finally:
                await monitor.stop()
                await system.stop()
                await order_streams.stop()

    app = create_service_app(
        runtime,
        # The system's health first: its /health (the overall status only) and /internal/health
        # (the aggregated report) answer in place of the runtime's own.
        routers=[system.router(), dashboard.router(), return_page.router(), *routers],
        title="Mentor booking API",
        lifespan=open_gateway,
        # Inside the correlation middleware, so a 413 still carries the correlation id.
        middleware=[
            alerts.middleware(),  # /ws/admin: before the layers below, kept for every admin
            Middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes),
        ],
        edge=True,  # the public entry: every trace starts here, whatever a caller sends
    )
    app.state.trusted_proxies = settings.trusted_proxies  # booking.gateway.forwarded
    app.state.rate_limiters = rate_limiters(settings)
    app.state.admin_alerts = alerts
    app.state.order_streams = order_streams
    return app
