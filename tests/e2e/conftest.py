"""Fixtures for whole-system tests: a fresh database, a fresh vhost, free ports.

Every e2e run gets its own Postgres database and (where `rabbitmqctl` is at hand) its own RabbitMQ
virtual host, and listens on ports picked free, so it never meets a developer's running system.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

from booking.runtime.settings import DEFAULT_DATABASE_URL, DEFAULT_RABBITMQ_URL
from booking.runtime.testing import with_database

PORT_VARIABLES = (
    "GATEWAY_PORT",
    "ORDERS_PORT",
    "PAYMENTS_PORT",
    "CALENDAR_PORT",
    "NOTIFICATIONS_PORT",
    "SANDBOX_KONNECT_PORT",
    "SANDBOX_GOOGLE_PORT",
)
# Addresses that `make run` derives from the ports: a developer's own values must not leak in.
DERIVED_VARIABLES = (
    "PUBLIC_BASE_URL",
    "ORDERS_URL",
    "PAYMENTS_URL",
    "CALENDAR_URL",
    "NOTIFICATIONS_URL",
    "KONNECT_API_URL",
    "SANDBOX_KONNECT_PUBLIC_URL",
    "GOOGLE_AUTH_URL",
    "GOOGLE_TOKEN_URL",
    "GOOGLE_CALENDAR_API_URL",
)


@pytest.fixture
async def fresh_database() -> AsyncIterator[str]:
    """The URL of a new, empty database on the server of DATABASE_URL; dropped afterwards."""
    admin_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    name = f"booking_e2e_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield with_database(admin_url, name)
    finally:
        conn = await asyncpg.connect(admin_url, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def rabbitmqctl(*args: str) -> bool:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "-q",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        return await asyncio.wait_for(process.wait(), 60) == 0
    except TimeoutError:
        process.kill()
        await process.wait()
        return False


@pytest.fixture
async def fresh_rabbitmq() -> AsyncIterator[dict[str, str]]:
    """Settings for a RabbitMQ of our own: a new vhost, deleted afterwards.

    Without `rabbitmqctl` the default vhost is shared, so queue and exchange names get a unique
    prefix instead (those are then left behind in that vhost).
    """
    base_url = os.environ.get("RABBITMQ_URL") or DEFAULT_RABBITMQ_URL
    run_id = f"booking_e2e_{uuid.uuid4().hex[:12]}"
    user = urlsplit(base_url).username or "guest"
    if shutil.which("rabbitmqctl") and await rabbitmqctl("add_vhost", run_id):
        try:
            assert await rabbitmqctl("set_permissions", "-p", run_id, user, ".*", ".*", ".*")
            vhost_url = urlunsplit(urlsplit(base_url)._replace(path="/" + quote(run_id, safe="")))
            yield {"RABBITMQ_URL": vhost_url}
        finally:
            await rabbitmqctl("delete_vhost", run_id)
        return
    yield {
        "RABBITMQ_URL": base_url,
        "QUEUE_PREFIX": f"{run_id}.",
        "EVENTS_EXCHANGE": f"{run_id}.booking.events",
        "ADMIN_ALERTS_EXCHANGE": f"{run_id}.admin.alerts",
    }


def pick_free_ports(count: int) -> list[int]:
    """`count` distinct ports nothing listens on right now."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


@pytest.fixture
def free_ports() -> Callable[[int], list[int]]:
    return pick_free_ports


@pytest.fixture
def system_env(fresh_database: str, fresh_rabbitmq: dict[str, str]) -> dict[str, str]:
    """The environment for `make run`: ours, pointed at the fresh database, vhost and ports."""
    env = {k: v for k, v in os.environ.items() if k not in DERIVED_VARIABLES}
    env.update(fresh_rabbitmq)
    env["DATABASE_URL"] = fresh_database
    env["BIND_HOST"] = "127.0.0.1"
    env["NO_COLOR"] = "1"
    env.update(zip(PORT_VARIABLES, map(str, pick_free_ports(len(PORT_VARIABLES))), strict=True))
    return env
