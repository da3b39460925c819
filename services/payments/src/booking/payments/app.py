"""Composition root of the payments service: settings, runtime, handlers and routes."""

from fastapi import FastAPI

from booking.payments.settings import PaymentsSettings
from booking.payments.tables import messaging
from booking.runtime.service import ServiceRuntime, create_service_app


def create_app(settings: PaymentsSettings | None = None) -> FastAPI:
    settings = settings or PaymentsSettings()
    runtime = ServiceRuntime(name="payments", settings=settings, tables=messaging)
    return create_service_app(runtime)
