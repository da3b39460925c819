"""Composition root of the gateway: settings, runtime and routes, wired once. No database."""

from fastapi import FastAPI

from booking.gateway.settings import GatewaySettings
from booking.runtime.service import ServiceRuntime, create_service_app


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    runtime = ServiceRuntime(name="gateway", settings=settings)
    return create_service_app(runtime, title="Mentor booking API")
