"""`make run`: the whole system on this machine, as child processes of one supervisor.

`python -m booking.devtools.devrun` reads an .env file beside the Makefile if there is one (the
environment wins), settles where Postgres and RabbitMQ are (`booking.devtools.infra`: starting
its own where a URL is unset and none answers; an explicit URL that does not answer is an
error), migrates every schema, starts the sandbox providers and the five services
with this same Python and the environment passed through, prefixes each child's output with its
name, waits until every one is ready, and prints where each listens. Ctrl-C or SIGTERM stops them
all (gateway first, sandboxes last) and exits 0; a child that dies on its own stops the rest and
exits 1, naming it.

Children run in their own process groups: a Ctrl-C in the terminal reaches only the supervisor,
which stops them in order. On Linux each child also gets SIGTERM if the supervisor itself dies.

Environment, besides every service's own settings (all passed through): `DevRunSettings`,
`InfraSettings`, and `NO_COLOR` (no colours even on a terminal).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import httpx
from dotenv import dotenv_values
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from booking.devtools import infra
from booking.devtools.infra import redacted
from booking.runtime.settings import DEFAULT_DATABASE_URL, DEFAULT_RABBITMQ_URL

MIGRATED = ("orders", "payments", "calendar", "notifications")
CONNECT_TIMEOUT = 3.0
POLL_INTERVAL = 0.25


class DevRunSettings(BaseSettings):
    """`make run`'s own patience."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    # Seconds to wait for every process to be ready, and between SIGTERM and SIGKILL at a stop.
    devrun_ready_timeout: float = Field(default=60.0, gt=0)
    devrun_stop_grace: float = Field(default=15.0, gt=0)


class DevRunError(Exception):
    """A failure to report in one clear message, without a stack trace."""


# --- what runs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Child:
    name: str
    module: str
    args: tuple[str, ...]
    port_env: str
    default_port: int
    ready_path: str = "/health/ready"
    stop_tier: int = 1  # lower stops first

    def port(self, env: dict[str, str]) -> int:
        raw = env.get(self.port_env) or str(self.default_port)
        try:
            return int(raw)
        except ValueError:
            raise DevRunError(f"{self.port_env}={raw!r} is not a port number") from None

    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args]


CHILDREN: tuple[Child, ...] = (
    # Start order; they stop gateway first, then the services, then the sandboxes.
    Child(
        "sandbox-konnect",
        "booking.sandbox",
        ("konnect", "serve"),
        "SANDBOX_KONNECT_PORT",
        8010,
        ready_path="/health/live",
        stop_tier=2,
    ),
    Child(
        "sandbox-google",
        "booking.sandbox",
        ("google", "serve"),
        "SANDBOX_GOOGLE_PORT",
        8011,
        ready_path="/health/live",
        stop_tier=2,
    ),
    Child("orders", "booking.orders", ("serve",), "ORDERS_PORT", 8001),
    Child("payments", "booking.payments", ("serve",), "PAYMENTS_PORT", 8002),
    Child("calendar", "booking.calendar", ("serve",), "CALENDAR_PORT", 8003),
    Child("notifications", "booking.notifications", ("serve",), "NOTIFICATIONS_PORT", 8004),
    Child("gateway", "booking.gateway", ("serve",), "GATEWAY_PORT", 8000, stop_tier=0),
)


def child_environment(base: dict[str, str]) -> dict[str, str]:
    """The environment every child gets: ours, plus the addresses that follow from the ports."""
    env = dict(base)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # A local run: the built-in secret and loopback's exemptions are allowed (never deployed).
    env.setdefault("DEVELOPMENT_MODE", "true")
    host = probe_host(env.get("BIND_HOST", "127.0.0.1"))
    ports = {c.name: c.port(env) for c in CHILDREN}
    # Where the gateway finds each service, and where Konnect and browsers find the gateway:
    # only when not set, so `ORDERS_URL=... make run` still wins.
    env.setdefault("PUBLIC_BASE_URL", f"http://{host}:{ports['gateway']}")
    for name in MIGRATED:
        env.setdefault(f"{name.upper()}_URL", f"http://{host}:{ports[name]}")
    # The outside systems: the sandboxes this run starts, unless pointed elsewhere.
    konnect = f"http://{host}:{ports['sandbox-konnect']}"
    google = f"http://{host}:{ports['sandbox-google']}"
    env.setdefault("KONNECT_API_URL", f"{konnect}/api/v2")
    env.setdefault("SANDBOX_KONNECT_PUBLIC_URL", konnect)
    env.setdefault("GOOGLE_AUTH_URL", f"{google}/o/oauth2/v2/auth")
    env.setdefault("GOOGLE_TOKEN_URL", f"{google}/token")
    env.setdefault("GOOGLE_CALENDAR_API_URL", f"{google}/calendar/v3")
    return env


def probe_host(bind_host: str) -> str:
    """Where to reach a server bound to `bind_host` from this machine."""
    if bind_host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bind_host == "::":
        return "[::1]"
    return f"[{bind_host}]" if ":" in bind_host else bind_host


# --- output -----------------------------------------------------------------------------------

_COLOURS = ("36", "32", "33", "34", "35", "96", "92", "93", "94", "95")


class Output:
    """Every line we or a child print, with a padded (and on a terminal, coloured) prefix."""

    def __init__(self, names: Iterable[str], *, colour: bool) -> None:
        names = list(names)
        self.width = max(len(n) for n in names)
        self.colour = colour
        self._colours = {n: _COLOURS[i % len(_COLOURS)] for i, n in enumerate(names)}

    def prefix(self, name: str) -> bytes:
        label = f"{name:<{self.width}} |"
        if self.colour and name in self._colours:
            label = f"\033[{self._colours[name]}m{label}\033[0m"
        return (label + " ").encode()

    def line(self, name: str, data: bytes) -> None:
        out = sys.stdout.buffer
        out.write(self.prefix(name) + data.rstrip(b"\r\n") + b"\n")
        out.flush()

    def say(self, text: str) -> None:
        """A message of the supervisor's own."""
        for row in text.splitlines() or [""]:
            self.line("devrun", row.encode())


async def pump(stream: asyncio.StreamReader, name: str, output: Output) -> None:
    """Copy a child's output line by line, however long a line is, until it closes."""
    pending = b""
    while chunk := await stream.read(65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            output.line(name, line)
    if pending:
        output.line(name, pending)


# --- checks before anything starts -------------------------------------------------------------


class Unreachable(DevRunError):
    """Nothing answers at the address: the server is not running (or the address is wrong)."""


class Refused(DevRunError):
    """The server answers but will not let us in: user, password, database or vhost."""


async def tcp_reachable(url: str, default_port: int) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        raise Unreachable(f"nothing answered on {host}:{port} in {CONNECT_TIMEOUT:g}s") from None
    except ConnectionRefusedError:
        raise Unreachable(f"nothing listens on {host}:{port} (connection refused)") from None
    except OSError as exc:
        raise Unreachable(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def check_postgres(url: str) -> None:
    if not url.startswith(("postgresql://", "postgres://")):
        raise Refused("DATABASE_URL must be a plain postgresql:// URL")
    await tcp_reachable(url, 5432)
    try:
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT * 2)
        try:
            await conn.execute("SELECT 1")
        finally:
            await conn.close()
    except Exception as exc:  # any failure is the message
        raise Refused(str(exc) or type(exc).__name__) from None


async def check_rabbitmq(url: str) -> None:
    await tcp_reachable(url, 5671 if url.startswith("amqps") else 5672)
    try:
        connection = await aio_pika.connect(url, timeout=CONNECT_TIMEOUT * 2)
    except Exception as exc:  # any failure is the message
        raise Refused(str(exc) or type(exc).__name__) from None
    await connection.close()


async def check_infrastructure(env: dict[str, str], output: Output) -> None:
    """Both servers answer and let us in; otherwise one message naming each that does not."""
    database_url = env.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    rabbitmq_url = env.get("RABBITMQ_URL") or DEFAULT_RABBITMQ_URL
    checks = {
        "Postgres": (
            check_postgres(database_url),
            database_url,
            "DATABASE_URL",
            "user, password and database",
        ),
        "RabbitMQ": (
            check_rabbitmq(rabbitmq_url),
            rabbitmq_url,
            "RABBITMQ_URL",
            "user, password and virtual host",
        ),
    }
    results = await asyncio.gather(*(c[0] for c in checks.values()), return_exceptions=True)
    problems = []
    for (name, (_, url, variable, parts)), result in zip(checks.items(), results, strict=True):
        if result is None:
            output.say(f"{name} is up at {redacted(url)}")
        elif isinstance(result, Unreachable):
            problems.append(
                f"{name} is not reachable at {redacted(url)}: {result}\n"
                f"  start it there, or point {variable} at a running {name}, or unset"
                f" {variable}: make run then brings its own when none answers."
            )
        elif isinstance(result, Refused):
            problems.append(
                f"{name} at {redacted(url)} answers but refused us: {result}\n"
                f"  check the {parts} in {variable}."
            )
        else:
            raise result
    if problems:
        raise DevRunError("\n".join(problems))


def check_ports(env: dict[str, str]) -> None:
    """Every port is distinct and free, so a clash is named now rather than as a crash later."""
    bind_host = env.get("BIND_HOST", "127.0.0.1")
    seen: dict[int, str] = {}
    problems = []
    for child in CHILDREN:
        port = child.port(env)
        if port in seen:
            problems.append(f"{child.port_env} and {seen[port]} are both {port}")
            continue
        seen[port] = child.port_env
        family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((bind_host, port))
            except OSError as exc:
                problems.append(
                    f"port {port} ({child.port_env}, for {child.name}) on {bind_host} is not free:"
                    f" {exc.strerror or exc}; stop what uses it or set {child.port_env}"
                )
    if problems:
        raise DevRunError("\n".join(problems))


# --- children ---------------------------------------------------------------------------------


@functools.cache
def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when the supervisor dies, if it can."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)

    return preexec


@dataclass
class Running:
    child: Child
    process: asyncio.subprocess.Process
    output_done: asyncio.Task[None]
    url: str
    status: str = "starting"

    @property
    def exited(self) -> bool:
        return self.process.returncode is not None


@dataclass
class Supervisor:
    env: dict[str, str]
    output: Output
    ready_timeout: float
    stop_grace: float
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    running: list[Running] = field(default_factory=list)
    stopping: bool = False

    async def spawn(
        self, name: str, argv: list[str]
    ) -> tuple[asyncio.subprocess.Process, asyncio.Task[None]]:
        process = await asyncio.create_subprocess_exec(
            *argv,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group: a terminal's Ctrl-C reaches only us
            preexec_fn=_die_with_parent(),
        )
        assert process.stdout is not None
        return process, asyncio.create_task(pump(process.stdout, name, self.output))

    async def until_stop_or(self, awaitable: asyncio.Future[Any]) -> bool:
        """Wait for `awaitable`; False if a stop was requested first."""
        stop = asyncio.ensure_future(self.stop_requested.wait())
        try:
            await asyncio.wait({stop, awaitable}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        return awaitable.done()

    # migrations

    async def migrate(self) -> bool:
        for service in MIGRATED:
            self.output.say(f"migrating {service} ...")
            process, output_done = await self.spawn(
                service, [sys.executable, "-m", f"booking.{service}", "migrate"]
            )
            waited = asyncio.ensure_future(process.wait())
            if not await self.until_stop_or(waited):
                await terminate_group(process, self.stop_grace)
                await output_done
                return False
            await output_done
            if process.returncode != 0:
                raise DevRunError(
                    f"migrating {service} failed ({describe_exit(process.returncode)}); its output"
                    f" is above. Nothing was started. Fix it, then `make run` again."
                )
        return True

    # the system

    async def start_all(self) -> None:
        host = probe_host(self.env.get("BIND_HOST", "127.0.0.1"))
        for child in CHILDREN:
            process, output_done = await self.spawn(child.name, child.argv())
            url = f"http://{host}:{child.port(self.env)}"
            self.running.append(Running(child, process, output_done, url))
            self.output.say(f"started {child.name} (pid {process.pid}) on {url}")

    async def first_death(self) -> Running:
        waits = {asyncio.ensure_future(r.process.wait()): r for r in self.running}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        return waits[next(iter(done))]

    async def wait_ready(self) -> bool:
        deadline = time.monotonic() + self.ready_timeout
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as http:

            async def poll(running: Running) -> None:
                url = running.url + running.child.ready_path
                while True:
                    try:
                        response = await http.get(url)
                        body = response.json()
                        state = body.get("status", "?") if isinstance(body, dict) else "?"
                        running.status = f"{response.status_code} {state}"
                        if response.status_code == 200:
                            running.status = f"ready ({state})"
                            return
                    except (httpx.HTTPError, ValueError) as exc:
                        running.status = f"not answering ({type(exc).__name__})"
                    if time.monotonic() >= deadline:
                        return
                    await asyncio.sleep(POLL_INTERVAL)

            polls = asyncio.ensure_future(asyncio.gather(*(poll(r) for r in self.running)))
            try:
                return await self.until_stop_or(polls)
            finally:
                polls.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await polls

    def print_table(self) -> None:
        rows = [("service", "url", "status")] + [
            (r.child.name, r.url, r.status) for r in self.running
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        self.output.say("\n".join(lines))

    async def stop_all(self) -> None:
        """Stop the children tier by tier: SIGTERM, then SIGKILL after the grace period."""
        self.stopping = True
        for tier in sorted({r.child.stop_tier for r in self.running}):
            group = [r for r in self.running if r.child.stop_tier == tier and not r.exited]
            if group:
                self.output.say("stopping " + ", ".join(r.child.name for r in group))
            await asyncio.gather(*(terminate_group(r.process, self.stop_grace) for r in group))
        # Whatever the children still printed, before our last word.
        await asyncio.gather(*(r.output_done for r in self.running), return_exceptions=True)

    async def run(self) -> int:
        if self.stop_requested.is_set() or not await self.migrate():
            self.output.say("interrupted; nothing was started")
            return 0
        await self.start_all()
        death = asyncio.ensure_future(self.first_death())
        ready = asyncio.ensure_future(self.wait_ready())
        await asyncio.wait({death, ready}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done() and ready.result():
            self.print_table()
            not_ready = [r.child.name for r in self.running if not r.status.startswith("ready")]
            if not_ready:
                self.output.say(
                    f"not ready after {self.ready_timeout:g}s: {', '.join(not_ready)}; they keep"
                    " running (see their output above). Ctrl-C stops everything."
                )
            else:
                self.output.say(
                    f"all {len(self.running)} processes are ready. Ctrl-C stops everything."
                )
        else:
            ready.cancel()
        if not death.done():
            await self.until_stop_or(death)
        if death.done() and not self.stop_requested.is_set():
            dead = death.result()
            await dead.output_done
            self.output.say(
                f"{dead.child.name} exited unexpectedly ({describe_exit(dead.process.returncode)});"
                " stopping the others"
            )
            await self.stop_all()
            self.output.say("stopped")
            return 1
        death.cancel()
        self.output.say("stopping every process ...")
        await self.stop_all()
        self.output.say("stopped")
        return 0


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


async def terminate_group(process: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the child's process group; SIGKILL it if it has not exited after `grace`."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        async with asyncio.timeout(grace):
            await process.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


def environment() -> dict[str, str]:
    """Ours, over the lines of an .env file beside the Makefile, if there is one."""
    env_file = infra.PROJECT_ROOT / ".env"
    from_file = dotenv_values(env_file) if env_file.exists() else {}
    return {**{k: v for k, v in from_file.items() if v is not None}, **os.environ}


def devrun_settings(env: dict[str, str]) -> DevRunSettings:
    given = {n: env[n.upper()] for n in DevRunSettings.model_fields if n.upper() in env}
    try:
        return DevRunSettings.model_validate(given)
    except ValidationError as exc:
        problems = "; ".join(f"{e['loc'][0]}".upper() + f": {e['msg']}" for e in exc.errors())
        raise DevRunError(problems) from None


async def main() -> int:
    names = ["devrun", *(c.name for c in CHILDREN)]
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    output = Output(names, colour=colour)
    loop = asyncio.get_running_loop()
    supervisor: Supervisor | None = None
    provided: infra.Provided | None = None
    try:
        env = child_environment(environment())
        settings = devrun_settings(env)
        supervisor = Supervisor(
            env,
            output,
            ready_timeout=settings.devrun_ready_timeout,
            stop_grace=settings.devrun_stop_grace,
        )
        requested = supervisor.stop_requested

        def on_signal(signum: int) -> None:
            if requested.is_set():
                # Asked twice: no more patience.
                output.say(f"{signal.Signals(signum).name} again: killing every process")
                for r in supervisor.running:
                    if not r.exited:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(r.process.pid, signal.SIGKILL)
                return
            requested.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        check_ports(env)
        # Postgres and RabbitMQ: ours, where their URL is unset and none answers.
        provided = await infra.start(env, output.say)
        env.update(provided.urls)
        await check_infrastructure(env, output)
        return await supervisor.run()
    except (DevRunError, infra.InfraError) as exc:
        output.say(str(exc))
        if supervisor is not None and supervisor.running and not supervisor.stopping:
            await supervisor.stop_all()
        return 1
    except BaseException:
        # A bug in this script must not leave the system running behind it.
        if supervisor is not None and not supervisor.stopping:
            await asyncio.shield(supervisor.stop_all())
        raise
    finally:
        if provided is not None:
            await asyncio.shield(infra.stop(provided, output.say))


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:  # before the signal handlers were in place
        sys.exit(0)
