"""Composition root of the notifications service: settings, runtime, handlers and routes."""

from datetime import timedelta

from fastapi import FastAPI

from booking.notifications.api import router
from booking.notifications.handlers import SERVICE, handlers
from booking.notifications.settings import NotificationsSettings
from booking.notifications.tables import messaging
from booking.runtime.service import ServiceRuntime, create_service_app


def create_app(settings: NotificationsSettings | None = None) -> FastAPI:
    settings = settings or NotificationsSettings()
    runtime = ServiceRuntime(
        name=SERVICE,
        settings=settings,
        tables=messaging,
        handlers=handlers(
            window=timedelta(seconds=settings.notification_dedup_window_seconds),
            alerts_exchange=settings.admin_alerts_exchange,
        ),
    )
    return create_service_app(runtime, routers=[router])
