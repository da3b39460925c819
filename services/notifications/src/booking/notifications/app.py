"""Composition root of the notifications service: settings, runtime, service, subscribers,
routes, and the alert dispatcher with its channels, each built from what comes before it.

Nothing is created at import time; `create_app` builds it all (refusing bad alert routing
settings first), and the lifespan opens the channels and starts the dispatcher (one per
replica), after the runtime has started.
"""

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

from fastapi import FastAPI

from booking.notifications.api import notifications_router
from booking.notifications.dispatcher import Dispatcher, Sender
from booking.notifications.domain import dashboard_url
from booking.notifications.handlers import subscribers
from booking.notifications.mailer import AlertMailer
from booking.notifications.service import NotificationsService
from booking.notifications.settings import NotificationsSettings, alert_routing
from booking.notifications.tables import messaging
from booking.notifications.webhook import AlertWebhook
from booking.runtime.clock import utcnow
from booking.runtime.health import Observation
from booking.runtime.host import ServiceRuntime, create_service_app


def create_app(
    settings: NotificationsSettings | None = None, *, clock: Callable[[], datetime] = utcnow
) -> FastAPI:
    """The app; `clock` dates the deliveries and drives the dispatcher (tests pass their own)."""
    settings = settings or NotificationsSettings()
    routing = alert_routing(settings)  # RefusedSettings before anything is built
    senders = alert_senders(settings)
    runtime = ServiceRuntime(name="notifications", settings=settings, tables=messaging)
    assert runtime.db is not None and runtime.outbox is not None  # a runtime with tables has both
    service = NotificationsService(
        db=runtime.db,
        outbox=runtime.outbox,
        window=timedelta(seconds=settings.notification_dedup_window_seconds),
        alerts_exchange=settings.admin_alerts_exchange,
        routing=routing,
        clock=clock,
    )
    runtime.subscribe(subscribers(service))
    dispatcher = Dispatcher(
        service,
        senders,
        interval=settings.alert_dispatch_interval_seconds,
        send_timeout=settings.alert_send_timeout_seconds,
        failing_after=settings.alert_channel_failing_after_attempts,
        clock=clock,
    )

    async def check_backlog() -> Observation:
        backlog = await service.delivery_backlog(clock())
        late = backlog.oldest_age > settings.alert_backlog_warn_seconds
        return Observation(
            "alertDeliveries",
            "backlog",
            "warn" if late else "pass",
            "component",
            round(backlog.oldest_age, 3),
            "s",
            output=f"age of the oldest of {backlog.pending} alert deliveries still to send"
            if routing.routes
            else "no alert channel configured",
        )

    runtime.health.add("alertDeliveries", "backlog", check_backlog, ready=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for sender in senders:
            await sender.open()
        dispatcher.start()
        try:
            yield
        finally:
            await dispatcher.stop()
            for sender in senders:
                await sender.aclose()

    app = create_service_app(runtime, routers=[notifications_router(service)], lifespan=lifespan)
    app.state.notifications = service
    app.state.dispatcher = dispatcher
    return app


def alert_senders(settings: NotificationsSettings) -> list[Sender]:
    """The channels configured (alert_routing has checked their settings)."""
    dashboard = dashboard_url(settings.public_base_url)
    senders: list[Sender] = []
    if settings.alert_webhook_url is not None:
        senders.append(
            AlertWebhook(
                settings.alert_webhook_url.get_secret_value().strip(),
                timeout=settings.alert_send_timeout_seconds,
                dashboard=dashboard,
            )
        )
    if settings.alert_smtp_host is not None and settings.alert_smtp_from is not None:
        password = settings.alert_smtp_password
        senders.append(
            AlertMailer(
                host=settings.alert_smtp_host,
                port=settings.alert_smtp_port,
                username=settings.alert_smtp_username,
                password=None if password is None else password.get_secret_value(),
                starttls=settings.alert_smtp_starttls,
                sender=settings.alert_smtp_from,
                recipients=settings.alert_smtp_to,
                timeout=settings.alert_send_timeout_seconds,
                dashboard=dashboard,
            )
        )
    return senders
