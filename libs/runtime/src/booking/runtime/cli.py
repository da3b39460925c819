"""`python -m booking.<service> serve|migrate`: the same two commands for every service, and
any a service adds of its own (calendar's `rotate-token-key`)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI

from booking.runtime.logs import configure_logging
from booking.runtime.settings import RefusedSettings, RuntimeSettings
from booking.runtime.tracing import configure_tracing


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


# Objects allocated between two collections of the youngest generation (CPython's default is
# 700): a request or a message allocates hundreds, so the default collected several times per
# unit of work, for objects that almost all die young anyway.
_YOUNG_GENERATION_THRESHOLD = 20_000


def settle_the_heap() -> None:
    """Before serving: everything imported and built so far lives as long as the process, so it
    is moved out of the collector's sight (`gc.freeze`); the full collections that would walk it
    again and again under load walk only what serving allocates."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(_YOUNG_GENERATION_THRESHOLD, older, oldest)


@dataclass(frozen=True)
class Command:
    """A service's own command: `run` gets the settings (logging configured) and returns the
    process's exit status."""

    help: str
    run: Callable[[Any], int]


def main(
    *,
    name: str,
    settings_type: type[RuntimeSettings],
    create_app: Callable[[Any], FastAPI],
    schema: str | None = None,
    argv: list[str] | None = None,
    commands: Mapping[str, Command] | None = None,
) -> None:
    own = dict(commands or {})
    parser = argparse.ArgumentParser(prog=f"python -m booking.{name}")
    subcommands = parser.add_subparsers(dest="command", required=True)
    subcommands.add_parser("serve", help="serve HTTP, consume events and relay the outbox")
    if schema is not None:
        subcommands.add_parser(
            "migrate",
            help=f"migrate the {schema} schema to the latest version, and declare this service's "
            "queues and bindings in RabbitMQ (the step before any service publishes)",
        )
    for command_name, command in own.items():
        subcommands.add_parser(command_name, help=command.help)
    args = parser.parse_args(argv)

    settings = settings_type()
    configure_logging(name, settings.log_level)
    if args.command == "serve":
        # Before the app is built: its middleware follows. Only a service with a schema has a
        # database to trace.
        configure_tracing(name, database=schema is not None)
    try:
        # Before anything is done, a migration included: settings no deployment may run with
        # (a JWT secret anyone knows) stop the process with the reason, not a trace.
        app = create_app(settings)
    except RefusedSettings as refused:
        parser.exit(2, f"booking.{name} will not start: {refused}\n")
    if args.command in own:
        sys.exit(own[args.command].run(settings))
    if args.command == "migrate":
        assert schema is not None
        from booking.runtime.migrations import upgrade  # Alembic only where there is a schema

        upgrade(settings, f"booking.{name}", schema)
        declare_topology(app)
        return
    settle_the_heap()
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
