"""The gateway and the services agree on the public API (the gateway's OpenAPI).

The gateway forwards a request to the owning service at the same path and passes the answer
back without re-validating it, so a service that drifts from the contract would break it
silently. Both sides build their bodies from `booking.contracts.http`; this checks that each
route the gateway declares is served by its service with the same method, success status and
response schema.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from booking.calendar.app import create_app as create_calendar
from booking.gateway import api as gateway_api
from booking.notifications.app import create_app as create_notifications
from booking.orders.app import create_app as create_orders
from booking.payments.app import create_app as create_payments

OWNERS = {
    "orders": (gateway_api.orders, create_orders),
    "payments": (gateway_api.payments, create_payments),
    "calendar": (gateway_api.calendar, create_calendar),
    "notifications": (gateway_api.notifications, create_notifications),
}


def success(operation: dict[str, Any]) -> tuple[str, Any]:
    """The operation's success status (2xx, or 3xx for a redirect) and its JSON body's schema."""
    for status, response in operation["responses"].items():
        if status.startswith(("2", "3")):
            content = response.get("content", {}).get("application/json", {})
            return status, content.get("schema")
    raise AssertionError(f"no success response in {operation.get('operationId')}")


def resolve(schema: Any, spec: dict[str, Any]) -> Any:
    """The schema with every $ref replaced by what it names, so two documents can be compared."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[1]
            return resolve(spec["components"]["schemas"][name], spec)
        return {k: resolve(v, spec) for k, v in schema.items() if k not in ("title", "description")}
    if isinstance(schema, list):
        return [resolve(item, spec) for item in schema]
    return schema


@pytest.mark.parametrize("service", sorted(OWNERS))
def test_each_gateway_route_is_served_by_its_service_with_the_same_answer(service):
    router, create_app = OWNERS[service]
    app: FastAPI = create_app()  # builds, connects nothing
    gateway_spec = FastAPI(routes=router.routes).openapi()
    service_spec = app.openapi()

    routes = [r for r in router.routes if isinstance(r, APIRoute)]
    assert routes
    for route in routes:
        for method in route.methods:
            where = f"{method} {route.path}"
            served = service_spec["paths"].get(route.path, {}).get(method.lower())
            assert served is not None, f"{service} does not serve {where}"
            declared = gateway_spec["paths"][route.path][method.lower()]
            want_status, want_schema = success(declared)
            got_status, got_schema = success(served)
            assert got_status == want_status, where
            assert resolve(got_schema, service_spec) == resolve(want_schema, gateway_spec), where
