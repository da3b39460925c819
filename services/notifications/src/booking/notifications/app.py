"""Composition root of the notifications service: settings, runtime, handlers and routes."""

from fastapi import FastAPI

from booking.notifications.settings import NotificationsSettings
from booking.notifications.tables import messaging
from booking.runtime.service import ServiceRuntime, create_service_app


def create_app(settings: NotificationsSettings | None = None) -> FastAPI:
    settings = settings or NotificationsSettings()
    runtime = ServiceRuntime(name="notifications", settings=settings, tables=messaging)
    return create_service_app(runtime)
