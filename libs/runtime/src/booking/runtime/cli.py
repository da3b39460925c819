"""`python -m booking.<service> serve|migrate`: the same two commands for every service."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI

from booking.runtime.logs import configure_logging
from booking.runtime.settings import RefusedSettings, RuntimeSettings


def declare_topology(app: FastAPI) -> None:
    """The service's exchanges, queues and bindings, declared before it (or anyone) publishes:
    an event for it then waits in its queue even if it starts last."""
    runtime = app.state.runtime

    async def declare() -> None:
        try:
            await runtime.declare_topology()
        finally:
            if runtime.db is not None:
                await runtime.db.engine.dispose()

    asyncio.run(declare())


def main(
    *,
    name: str,
    settings_type: type[RuntimeSettings],
    create_app: Callable[[Any], FastAPI],
    schema: str | None = None,
    argv: list[str] | None = None,
) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m booking.{name}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve HTTP, consume events and relay the outbox")
    if schema is not None:
        commands.add_parser(
            "migrate",
            help=f"migrate the {schema} schema to the latest version, and declare this service's "
            "queues and bindings in RabbitMQ (the step before any service publishes)",
        )
    args = parser.parse_args(argv)

    settings = settings_type()
    configure_logging(name, settings.log_level)
    try:
        # Before anything is done, a migration included: settings no deployment may run with
        # (a JWT secret anyone knows) stop the process with the reason, not a trace.
        app = create_app(settings)
    except RefusedSettings as refused:
        parser.exit(2, f"booking.{name} will not start: {refused}\n")
    if args.command == "migrate":
        assert schema is not None
        from booking.runtime.migrations import upgrade  # Alembic only where there is a schema

        upgrade(settings, f"booking.{name}", schema)
        declare_topology(app)
        return
    uvicorn.run(
        app,
        host=settings.bind_host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        # The peer stays the peer: the gateway reads X-Forwarded-For itself, from its
        # TRUSTED_PROXIES only (booking.gateway.forwarded). uvicorn's own rewriting would trust
        # FORWARDED_ALLOW_IPS instead (loopback by default; with "*", the client's own entry).
        proxy_headers=False,
        # Alerts are small JSON: compressing each for every admin cost more memory (~40 KB a
        # connection) and CPU than it saved bytes.
        ws_per_message_deflate=False,
    )
