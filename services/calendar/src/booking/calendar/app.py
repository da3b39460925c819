"""Composition root of the calendar service: settings, runtime, handlers and routes."""

from fastapi import FastAPI

from booking.calendar.settings import CalendarSettings
from booking.calendar.tables import messaging
from booking.runtime.service import ServiceRuntime, create_service_app


def create_app(settings: CalendarSettings | None = None) -> FastAPI:
    settings = settings or CalendarSettings()
    runtime = ServiceRuntime(name="calendar", settings=settings, tables=messaging)
    return create_service_app(runtime)
