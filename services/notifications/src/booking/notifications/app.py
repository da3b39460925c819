"""Composition root of the notifications service: settings, runtime, service, subscribers and
routes, each built from what comes before it."""

from datetime import timedelta

from fastapi import FastAPI

from booking.notifications.api import notifications_router
from booking.notifications.handlers import subscribers
from booking.notifications.service import NotificationsService
from booking.notifications.settings import NotificationsSettings
from booking.notifications.tables import messaging
from booking.runtime.host import ServiceRuntime, create_service_app


def create_app(settings: NotificationsSettings | None = None) -> FastAPI:
    settings = settings or NotificationsSettings()
    runtime = ServiceRuntime(name="notifications", settings=settings, tables=messaging)
    assert runtime.db is not None and runtime.outbox is not None  # a runtime with tables has both
    service = NotificationsService(
        db=runtime.db,
        outbox=runtime.outbox,
        window=timedelta(seconds=settings.notification_dedup_window_seconds),
        alerts_exchange=settings.admin_alerts_exchange,
    )
    runtime.subscribe(subscribers(service))
    app = create_service_app(runtime, routers=[notifications_router(service)])
    app.state.notifications = service
    return app
