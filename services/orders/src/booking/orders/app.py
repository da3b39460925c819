"""Composition root of the orders service: settings, runtime, handlers and routes."""

from fastapi import FastAPI

from booking.orders.api import router
from booking.orders.handlers import HANDLERS
from booking.orders.settings import OrdersSettings
from booking.orders.tables import messaging
from booking.runtime.service import ServiceRuntime, create_service_app


def create_app(settings: OrdersSettings | None = None) -> FastAPI:
    settings = settings or OrdersSettings()
    runtime = ServiceRuntime(name="orders", settings=settings, tables=messaging, handlers=HANDLERS)
    return create_service_app(runtime, routers=[router])
