"""Fixtures for whole-system tests: a fresh database, a fresh vhost, free ports.

Every e2e run gets its own Postgres database and (where `rabbitmqctl` is at hand) its own RabbitMQ
virtual host, and listens on ports picked free, so it never meets a developer's running system.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

from booking.runtime.auth import issue_token
from booking.runtime.settings import DEFAULT_DATABASE_URL, DEFAULT_RABBITMQ_URL, RuntimeSettings
from booking.runtime.testing import eventually, with_database

ROOT = Path(__file__).resolve().parents[2]
# Four migrations and seven processes starting at once, on a slow machine.
SYSTEM_READY_SECONDS = 180

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


@contextlib.asynccontextmanager
async def new_database() -> AsyncIterator[str]:
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


@pytest.fixture
async def fresh_database() -> AsyncIterator[str]:
    async with new_database() as url:
        yield url


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


@contextlib.asynccontextmanager
async def new_rabbitmq() -> AsyncIterator[dict[str, str]]:
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


@pytest.fixture
async def fresh_rabbitmq() -> AsyncIterator[dict[str, str]]:
    async with new_rabbitmq() as settings:
        yield settings


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


def system_environment(database_url: str, rabbitmq: dict[str, str]) -> dict[str, str]:
    """The environment for `make run`: ours, pointed at the given database, vhost and free ports."""
    env = {k: v for k, v in os.environ.items() if k not in DERIVED_VARIABLES}
    env.update(rabbitmq)
    env["DATABASE_URL"] = database_url
    env["BIND_HOST"] = "127.0.0.1"
    env["NO_COLOR"] = "1"
    env.update(zip(PORT_VARIABLES, map(str, pick_free_ports(len(PORT_VARIABLES))), strict=True))
    return env


@pytest.fixture
def system_env(fresh_database: str, fresh_rabbitmq: dict[str, str]) -> dict[str, str]:
    return system_environment(fresh_database, fresh_rabbitmq)


@dataclass
class RunningSystem:
    """The whole system as `make run` starts it (its supervisor, devrun), for one test module."""

    env: dict[str, str]
    log: Path
    process: subprocess.Popen | None = None

    def url(self, port_variable: str) -> str:
        return f"http://127.0.0.1:{self.env[port_variable]}"

    @property
    def gateway(self) -> str:
        return self.url("GATEWAY_PORT")

    @property
    def konnect(self) -> str:
        """The sandbox Konnect: its API under /api/v2, its control API under /_sandbox."""
        return self.url("SANDBOX_KONNECT_PORT")

    @property
    def rabbitmq_url(self) -> str:
        return self.env["RABBITMQ_URL"]

    @property
    def events_exchange(self) -> str:
        return self.env.get("EVENTS_EXCHANGE", "booking.events")

    def token(self, role: str, sub: str | None = None) -> dict[str, str]:
        """An Authorization header for `role`, signed with the system's secret."""
        secret = self.env.get("AUTH_JWT_SECRET") or RuntimeSettings().auth_jwt_secret
        if not isinstance(secret, str):
            secret = secret.get_secret_value()
        token = issue_token(secret, sub or f"{role}-{uuid.uuid4().hex[:8]}", role)
        return {"Authorization": f"Bearer {token}"}

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "booking.runtime.devrun"],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def wait_ready(self) -> None:
        async def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"the system exited ({self.process.returncode}):\n{self.tail()}")
            return bool(re.search(r"all \d+ processes are ready", self.log.read_text()))

        await eventually(ready, timeout=SYSTEM_READY_SECONDS, interval=0.2, what="make run ready")

    async def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C, as a developer stops it
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait, 10)


@pytest.fixture(scope="module")
def system_overrides() -> dict[str, str]:
    """Settings a test module wants for its running system; override the fixture to set some."""
    return {}


@pytest.fixture(scope="module")
async def running_system(
    system_overrides: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningSystem]:
    """Every service and sandbox running against a fresh database and vhost, for one module."""
    async with new_database() as database_url, new_rabbitmq() as rabbitmq:
        env = system_environment(database_url, rabbitmq)
        env.update(system_overrides)
        system = RunningSystem(env, tmp_path_factory.mktemp("system") / "make-run.log")
        system.start()
        try:
            await system.wait_ready()
            yield system
        finally:
            await system.stop()
