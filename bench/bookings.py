"""Bookings benchmark: the whole system, booking -> paid -> confirmed, through the gateway.

It starts the system as `make run` does (its own database, its own RabbitMQ vhost, free ports,
the supervisor `booking.devtools.devrun`), or drives a running one (`--url`). Mentors are
registered and connected to the sandbox Google; then each booking goes as a mentee and a payer
make it go, through the public API only: `POST /api/bookings` at the gateway, then the mentee
follows the order on `GET /api/orders/{id}/events` (Server-Sent Events) as a browser would. When
the order shows its payment link the payer pays through the sandbox Konnect's control API, which
calls the webhook back through the gateway; the booking is done when the stream shows the order
`confirmed`, the contract's word for done. The benchmark binds no queue of its own (that would
add deliveries to what it measures) and polls nothing. Reported:

- bookings confirmed per second, sustained, at full speed (a fixed number in flight);
- the CPU of one `GET /api/orders/{id}` through the gateway, in every process, on a quiet
  system (2,000 reads one at a time, less what the idle system spends meanwhile);
- p50/p95/p99 from the POST to the stream showing the order confirmed, at a steady 50 bookings
  per second, and where the time goes (each status as the stream shows it);
- webhook -> alert: a forged webhook (a ref Konnect never issued) until its PaymentAnomaly
  Warning frame arrives on an admin's `/ws/admin`;
- the duplicate-webhook storm: 1,000 concurrent webhooks for one paid payment; requests per
  second, their answers, and the effects (exactly one PaymentCompleted, one OrderPaid, one
  calendar event: counted in the services' outboxes and at the sandbox Google);
- CPU per booking per process (utime + stime from /proc before and after), the machine's load,
  and a py-spy profile of the hottest service during a second full-speed burst.

Targets (issue 17, a 2-core machine with everything on it): >= 60 bookings confirmed per second
sustained (aim 75); system CPU per confirmed booking <= 20 ms (aim 15); p99 booking -> confirmed
<= 1 s at 50/s; one GET of an order <= 1 ms of CPU in all processes; p99 webhook -> alert
<= 100 ms (issue 8).
The system it starts gets high webhook and callback rate limits (one client IP sends all the
traffic). Results also go to bench/results/bookings-<time>.json.
Run: `python -m bench.bookings` (see --help).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import uvloop
from websockets.asyncio.client import ClientConnection, connect

from bench import results_file
from booking.devtools.devrun import CHILDREN, probe_host
from booking.devtools.fixtures import pick_free_ports, private_database, private_vhost
from booking.runtime.auth import issue_token
from booking.runtime.settings import DEFAULT_DATABASE_URL, DEFAULT_RABBITMQ_URL, RuntimeSettings
from booking.runtime.transport import KEEPALIVE_EXPIRY_SECONDS
from booking.sandbox.control import ControlAuth

ROOT = Path(__file__).resolve().parents[1]
RUN_PREFIX = "bench_bookings"  # of its database and vhost
TARGET_PER_SECOND, AIM_PER_SECOND = 60.0, 75.0
TARGET_SYSTEM_CPU_MS, AIM_SYSTEM_CPU_MS = 20.0, 15.0
TARGET_CONFIRMED_P99_MS = 1000.0
TARGET_ALERT_P99_MS = 100.0
SERVICES = ("gateway", "orders", "payments", "calendar", "notifications")
SANDBOXES = ("sandbox-konnect", "sandbox-google")
TARGET_GET_CPU_MS = 1.0  # one GET /api/orders/{id}, in every process
IDLE_WINDOW_SECONDS = 3.0  # what the idle system spends, taken out of a quiet measurement
SYSTEM_READY_SECONDS = 180
# One client IP sends every booking, webhook and OAuth callback: the per-IP limits, meant for
# the internet, would measure the limiter instead of the system.
BENCH_ENVIRONMENT = {
    "WEBHOOK_RATE_LIMIT_PER_MINUTE": "100000000",
    "RATE_LIMIT_PER_MINUTE": "100000000",
    # The sandbox Konnect has no rate limit to keep under: the budget would measure itself.
    "KONNECT_LOOKUPS_PER_MINUTE": "100000000",
    # Every forged webhook reported by itself, at once: the webhook -> alert latency is the
    # alert path's, not the wait of a tally meant for floods.
    "UNKNOWN_REF_REPORT_INTERVAL_SECONDS": "0.001",
    "NO_COLOR": "1",
}
FLOW_EVENTS = (
    "BookingRequested",
    "PaymentInitiated",
    "PaymentCompleted",
    "OrderPaid",
    "CalendarBookingConfirmed",
)
# The order's statuses a booking goes through, as its stream shows them, and those that end it.
FLOW_STATUSES = ("awaiting_payment", "paid", "confirmed")
ENDED = frozenset({"confirmed", "payment_failed", "cancelled"})


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


# --- the system under test ------------------------------------------------------------------------


@dataclass
class System:
    gateway: str
    konnect: str
    google: str
    secret: str
    rabbitmq_url: str
    events_exchange: str
    database_url: str | None
    pids: dict[str, int] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)

    def token(self, role: str, sub: str) -> dict[str, str]:
        token = issue_token(self.secret, sub, role, ttl_seconds=6 * 3600)
        return {"Authorization": f"Bearer {token}"}


@contextlib.asynccontextmanager
async def started_system(overrides: dict[str, str]) -> AsyncIterator[System]:
    """The whole system as `make run` starts it, on its own database, vhost and free ports."""
    async with private_database(RUN_PREFIX) as database_url, private_vhost(RUN_PREFIX) as rabbitmq:
        env = {k: v for k, v in os.environ.items() if not k.endswith("_URL") or k in rabbitmq}
        env.update(rabbitmq)
        env.update(BENCH_ENVIRONMENT)
        env.update(overrides)
        env["DATABASE_URL"] = database_url
        env["BIND_HOST"] = "127.0.0.1"
        ports = pick_free_ports(len(CHILDREN))
        env.update({child.port_env: str(port) for child, port in zip(CHILDREN, ports, strict=True)})
        log = Path(tempfile.mkdtemp(prefix="bench-bookings-")) / "make-run.log"
        process = spawn_devrun(env, log)
        try:
            deadline = time.monotonic() + SYSTEM_READY_SECONDS
            while not re.search(r"all \d+ processes are ready", log.read_text(errors="replace")):
                if process.poll() is not None:
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                    raise BenchError(f"the system exited ({process.returncode}):\n{tail}")
                if time.monotonic() > deadline:
                    raise BenchError(f"the system was not ready in {SYSTEM_READY_SECONDS}s: {log}")
                await asyncio.sleep(0.25)
            text = log.read_text(errors="replace")
            pids = {m[1]: int(m[2]) for m in re.finditer(r"started (\S+) \(pid (\d+)\)", text)}
            pids["devrun"] = process.pid
            port = {child.name: env[child.port_env] for child in CHILDREN}
            yield System(
                gateway=f"http://127.0.0.1:{port['gateway']}",
                konnect=f"http://127.0.0.1:{port['sandbox-konnect']}",
                google=f"http://127.0.0.1:{port['sandbox-google']}",
                secret=RuntimeSettings(**_auth_override(env)).auth_jwt_secret.get_secret_value(),
                rabbitmq_url=env["RABBITMQ_URL"],
                events_exchange=env.get("EVENTS_EXCHANGE", "booking.events"),
                database_url=database_url,
                pids=pids,
                environment={**BENCH_ENVIRONMENT, **overrides},
            )
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C stops `make run`
            try:
                await asyncio.to_thread(process.wait, 40)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await asyncio.to_thread(process.wait, 10)


def spawn_devrun(env: dict[str, str], log: Path) -> subprocess.Popen:
    """`make run`'s supervisor in its own process group, its output to `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "booking.devtools.devrun"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _auth_override(env: dict[str, str]) -> dict[str, Any]:
    secret = env.get("AUTH_JWT_SECRET")
    return {"auth_jwt_secret": secret} if secret else {}


def listening_pid(port: int) -> int | None:
    """The process listening on TCP `port` on this machine, if we may see it (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(proc.name)
    return None


def running_system(url: str) -> System:
    """A system someone started (`make run`), found with the same environment as it."""
    env = dict(os.environ)
    host = probe_host(env.get("BIND_HOST", "127.0.0.1"))
    ports = {child.name: child.port(env) for child in CHILDREN}
    pids = {}
    for child in CHILDREN:
        pid = listening_pid(ports[child.name])
        if pid is not None:
            pids[child.name] = pid
    return System(
        gateway=url.rstrip("/"),
        konnect=f"http://{host}:{ports['sandbox-konnect']}",
        google=f"http://{host}:{ports['sandbox-google']}",
        secret=RuntimeSettings().auth_jwt_secret.get_secret_value(),
        rabbitmq_url=env.get("RABBITMQ_URL") or DEFAULT_RABBITMQ_URL,
        events_exchange=env.get("EVENTS_EXCHANGE", "booking.events"),
        database_url=env.get("DATABASE_URL") or DEFAULT_DATABASE_URL,
        pids=pids,
    )


# --- CPU accounting -------------------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time process `pid` has used so far (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_cpu() -> tuple[float, float, float]:
    """(busy, total, interrupts) CPU seconds of the whole machine so far, every core together;
    interrupts (irq + softirq: much of loopback networking) belong to no process."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / TICK, sum(values) / TICK, (values[5] + values[6]) / TICK


def every_process() -> dict[int, tuple[str, float]]:
    """Every process's short command and CPU so far."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            words = [w.decode(errors="replace") for w in argv if w][:4]
            command = " ".join(Path(w).name if w.startswith("/") else w for w in words)
            cpu = cpu_seconds(int(proc.name))
            if cpu is not None and command:
                found[int(proc.name)] = (command[:60], cpu)
    return found


def pids_named(name: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if (proc / "comm").read_text().strip() == name:
                    found.append(int(proc.name))
    return found


@dataclass
class CpuSnapshot:
    at: float
    processes: dict[str, float]
    postgres: dict[int, float]
    database: dict[str, int]
    machine: tuple[float, float, float]
    generator: float
    everyone: dict[int, tuple[str, float]]


class CpuMeter:
    """CPU used by each process of the system between two snapshots."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.named = dict(system.pids)
        # rabbitmqctl runs on an Erlang VM too: the server is the one that has worked most.
        beam = [(cpu_seconds(pid) or 0.0, pid) for pid in pids_named("beam.smp")]
        if beam:
            self.named["rabbitmq (whole broker)"] = max(beam)[1]
        self.database = urlsplit(system.database_url or "").path.lstrip("/") or None

    async def _postgres(self) -> tuple[dict[int, float], dict[str, int]]:
        """Our database's backends (pg_stat_activity), each one's CPU so far; and its counters
        (pg_stat_database: commits, rows read and written)."""
        if not self.system.database_url:
            return {}, {}
        try:
            conn = await asyncpg.connect(self.system.database_url, timeout=5)
        except (OSError, asyncpg.PostgresError):
            return {}, {}
        try:
            pids = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()"
            )
            # Backends publish their counters about once a second: a snapshot lags that much.
            counters = await conn.fetchrow(
                "SELECT xact_commit AS commits, xact_rollback AS rollbacks,"
                " tup_fetched AS rows_fetched, tup_inserted AS rows_inserted,"
                " tup_updated AS rows_updated, tup_deleted AS rows_deleted,"
                " sessions AS new_connections"
                " FROM pg_stat_database WHERE datname = current_database()"
            )
            tables = await conn.fetch(
                "SELECT schemaname || '.' || relname AS name,"
                " coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) AS read,"
                " n_tup_ins AS inserted"
                " FROM pg_stat_user_tables"
            )
        finally:
            await conn.close()
        cpu = {r["pid"]: cpu for r in pids if (cpu := cpu_seconds(r["pid"])) is not None}
        found = dict(counters) if counters else {}
        found.update({f"rows read from {r['name']}": r["read"] for r in tables})
        # Every event goes out through an outbox: its rows are the events published.
        found["events_published"] = sum(
            r["inserted"] for r in tables if r["name"].endswith(".outbox")
        )
        return cpu, found

    async def snapshot(self) -> CpuSnapshot:
        postgres, database = await self._postgres()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return CpuSnapshot(
            at=time.monotonic(),
            processes={n: cpu_seconds(p) or 0.0 for n, p in self.named.items()},
            postgres=postgres,
            database=database,
            machine=machine_cpu(),
            generator=usage.ru_utime + usage.ru_stime,
            everyone=every_process(),
        )

    def used(self, before: CpuSnapshot, after: CpuSnapshot, bookings: int) -> dict[str, Any]:
        """CPU ms per booking of each process, and how busy the machine was."""
        per: dict[str, float] = {}
        for name, seconds in after.processes.items():
            per[name] = seconds - before.processes.get(name, 0.0)
        # A backend that appeared meanwhile started from nothing.
        per["postgres (our database's backends)"] = sum(
            cpu - before.postgres.get(pid, 0.0) for pid, cpu in after.postgres.items()
        )
        per["load generator (this process)"] = after.generator - before.generator
        wall = after.at - before.at
        busy = after.machine[0] - before.machine[0]
        total = after.machine[1] - before.machine[1]
        per["kernel interrupts (irq, softirq)"] = after.machine[2] - before.machine[2]
        accounted = sum(per.values())
        per["everything else on the machine"] = max(busy - accounted, 0.0)
        # Who "everything else" is: every other process's CPU meanwhile, by command (processes
        # that ended meanwhile, short-lived database connections among them, are not seen).
        counted = {*self.named.values(), *after.postgres, os.getpid()}
        # CPU seconds by command: Counter for most_common, though its values are floats here.
        others: Counter[str] = Counter()
        for pid, (command, cpu) in after.everyone.items():
            if pid not in counted:
                used = cpu - before.everyone.get(pid, (command, 0.0))[1]
                others[command] += used  # type: ignore[assignment]
        n = max(bookings, 1)
        system = [*SERVICES, "postgres (our database's backends)", "rabbitmq (whole broker)"]
        system_ms = sum(per.get(k, 0.0) for k in system) * 1000 / n
        cores = os.cpu_count() or 1
        return {
            "wall_seconds": round(wall, 2),
            "bookings": bookings,
            "machine_busy_percent": round(100 * busy / total, 1) if total else None,
            "cores_busy": round(busy / wall, 2) if wall else None,
            "cpu_ms_per_booking": {k: round(v * 1000 / n, 2) for k, v in per.items()},
            "cpu_seconds": {k: round(v, 2) for k, v in per.items()},
            # The services, their database and broker only: without the stand-ins, the load
            # generator and the machine's other tenants, this is what one booking costs.
            "system_cpu_ms_per_booking": round(system_ms, 2),
            "other_processes_cpu_seconds": {
                k: round(v, 2) for k, v in others.most_common(6) if v >= 0.05
            },
            "per_booking": {
                **{
                    (k if k == "events_published" else f"database_{k}"): round(
                        (after.database[k] - before.database.get(k, 0)) / n, 1
                    )
                    for k in after.database
                    if not k.startswith("rows read from")
                },
            },
            # Where the rows fetched come from: the tables read most, per booking.
            "rows_read_per_booking_by_table": dict(
                Counter(
                    {
                        k.removeprefix("rows read from "): round(
                            (v - before.database.get(k, 0)) / n, 1
                        )
                        for k, v in after.database.items()
                        if k.startswith("rows read from")
                    }
                ).most_common(5)
            ),
            "bookings_per_second_if_alone_on_the_cores": (
                round(cores * 1000 / system_ms, 1) if system_ms else None
            ),
        }


# --- following an order, as a browser does -------------------------------------------------


@dataclass
class OrderFrame:
    """One `event: order` of the stream: its id (the order's version) and the order."""

    version: int
    order: dict[str, Any]


async def order_frames(response: httpx.Response) -> AsyncIterator[OrderFrame]:
    """The `order` events of a Server-Sent Events response (comments and other events skipped)."""
    event, version = "message", ""
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data and event == "order":
                yield OrderFrame(int(version or 0), json.loads("\n".join(data)))
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue  # a keep-alive comment
        field_, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field_ == "event":
            event = value
        elif field_ == "data":
            data.append(value)
        elif field_ == "id":
            version = value


# --- driving the system ---------------------------------------------------------------------------


@dataclass
class Booking:
    posted_at: float
    order_id: str | None = None
    accepted_at: float | None = None
    paid_at: float | None = None  # the pay call (and its webhook) answered
    confirmed_at: float | None = None  # the stream showed the order confirmed
    # When the stream first showed each status (and the payment link, with awaiting_payment).
    seen: dict[str, float] = field(default_factory=dict)
    frames: int = 0
    payment_ref: str | None = None
    outcome: str = "pending"  # confirmed, or what went wrong
    # What the webhook got when it was not a 200 (the pay call's report, e.g. "[504]"): the
    # booking is still followed, since the payment may go through all the same.
    webhook_trouble: str | None = None

    @property
    def latency_ms(self) -> float | None:
        if self.confirmed_at is None:
            return None
        return (self.confirmed_at - self.posted_at) * 1000


@dataclass
class Mentor:
    id: str
    email: str
    offering_id: str
    slots: int = 0


class Driver:
    def __init__(self, system: System, concurrency: int, timeout: float):
        self.system = system
        self.timeout = timeout
        self.run_id = uuid.uuid4().hex[:6]
        self.admin = system.token("admin", f"bench-admin-{self.run_id}")
        self.mentee = system.token("mentee", f"bench-mentee-{self.run_id}")
        # Idle connections let go before the servers' 5 s keep-alive timeout, as the services'
        # own clients do (booking.runtime.transport): else a request may race the server's close.
        limits = httpx.Limits(
            max_connections=concurrency + 50,
            max_keepalive_connections=200,
            keepalive_expiry=KEEPALIVE_EXPIRY_SECONDS,
        )
        self.api = httpx.AsyncClient(
            base_url=system.gateway, timeout=60, trust_env=False, limits=limits
        )
        # One open stream per booking under way, however many that is: a stream waiting for a
        # connection of a bounded pool would add its wait to the latency measured.
        self.streams = httpx.AsyncClient(
            base_url=system.gateway,
            timeout=httpx.Timeout(60, read=None),
            trust_env=False,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
        )
        # The sandboxes' control calls (pay, consent) carry the control token.
        self.konnect = httpx.AsyncClient(
            base_url=system.konnect, timeout=60, trust_env=False, limits=limits, auth=ControlAuth()
        )
        self.google = httpx.AsyncClient(
            base_url=system.google, timeout=60, trust_env=False, auth=ControlAuth()
        )
        self.mentors: list[Mentor] = []
        self._next = 0
        # Sessions a month ahead, one hour apart per mentor: no two ever overlap.
        self.first_slot = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        self.first_slot += timedelta(days=30)

    async def close(self) -> None:
        for client in (self.api, self.streams, self.konnect, self.google):
            await client.aclose()

    async def _expect(self, response: Awaitable[httpx.Response], status: int, what: str):
        answer = await response
        if answer.status_code != status:
            raise BenchError(f"{what}: {answer.status_code} {answer.text[:300]}")
        return answer

    async def add_mentor(self, connected: bool = True) -> Mentor:
        n = len(self.mentors)
        email = f"bench-{self.run_id}-{n}-{uuid.uuid4().hex[:4]}@example.com"
        mentor = (
            await self._expect(
                self.api.post(
                    "/api/mentors",
                    json={"name": f"Mentor {n}", "email": email, "timezone": "Africa/Tunis"},
                    headers=self.admin,
                ),
                201,
                "registering a mentor",
            )
        ).json()
        offering = (
            await self._expect(
                self.api.post(
                    f"/api/mentors/{mentor['id']}/offerings",
                    json={
                        "title": "Benchmark session",
                        "duration_minutes": 60,
                        "price": {"amount": 50_000, "currency": "TND"},
                    },
                    headers=self.admin,
                ),
                201,
                "adding an offering",
            )
        ).json()
        result = Mentor(mentor["id"], email, offering["id"])
        if connected:
            await self.connect_google(result)
        return result

    async def connect_google(self, mentor: Mentor) -> None:
        # The calendar service learns of the mentor from MentorRegistered: 404 until then.
        deadline = time.monotonic() + self.timeout
        while True:
            start = await self.api.get(
                f"/api/mentors/{mentor.id}/calendar/connect", headers=self.admin
            )
            if start.status_code == 302:
                break
            if start.status_code != 404 or time.monotonic() > deadline:
                raise BenchError(f"connecting Google: {start.status_code} {start.text[:300]}")
            await asyncio.sleep(0.1)
        approved = await self._expect(
            self.google.post(
                "/_sandbox/oauth/approve", json={"auth_url": start.headers["location"]}
            ),
            200,
            "approving the consent",
        )
        finished = await self._expect(
            self.api.get(approved.json()["location"]), 200, "the OAuth callback"
        )
        if not finished.json().get("connected"):
            raise BenchError(f"the OAuth callback did not connect: {finished.text[:300]}")

    async def add_mentors(self, count: int) -> None:
        gate = asyncio.Semaphore(8)

        async def one() -> Mentor:
            async with gate:
                return await self.add_mentor()

        self.mentors.extend(await asyncio.gather(*(one() for _ in range(count))))

    def next_slot(self) -> tuple[Mentor, datetime]:
        mentor = self.mentors[self._next % len(self.mentors)]
        self._next += 1
        mentor.slots += 1
        return mentor, self.first_slot + timedelta(hours=mentor.slots)

    async def book(self, mentor: Mentor | None = None, *, pay: bool = True) -> Booking:
        """One booking, from the POST to the stream showing it confirmed (or what stopped it).

        `pay=False` stops once the order shows its payment link."""
        if mentor is None:
            mentor, start_at = self.next_slot()
        else:
            mentor.slots += 1
            start_at = self.first_slot + timedelta(hours=mentor.slots)
        booking = Booking(posted_at=time.perf_counter())
        try:
            async with asyncio.timeout(self.timeout):
                await self._book(booking, mentor, start_at, pay)
        except TimeoutError:
            last = max(booking.seen, key=booking.seen.__getitem__, default="nothing")
            booking.outcome = f"not confirmed in time (last seen: {last})"
        except httpx.HTTPError as exc:
            booking.outcome = f"http error: {type(exc).__name__}"
        return booking

    async def _book(self, booking: Booking, mentor: Mentor, start_at: datetime, pay: bool) -> None:
        accepted = await self.api.post(
            "/api/bookings",
            json={
                "offering_id": mentor.offering_id,
                "start_at": start_at.isoformat(),
                "mentee": {"first_name": "Bench", "last_name": "Mark", "email": mentor.email},
            },
            headers=self.mentee,
        )
        if accepted.status_code != 202:
            booking.outcome = f"booking answered {accepted.status_code}"
            return
        booking.accepted_at = time.perf_counter()
        booking.order_id = accepted.json()["order_id"]
        await self.follow(booking, pay)

    async def follow(self, booking: Booking, pay: bool = True) -> None:
        """Follow the order's stream until it ends; pay once it shows its payment link (if
        `pay`: else stop there, unless that link was seen already)."""
        paying: asyncio.Task[None] | None = None
        try:
            async with self.streams.stream(
                "GET", f"/api/orders/{booking.order_id}/events", headers=self.mentee
            ) as response:
                if response.status_code != 200:
                    booking.outcome = f"the order's stream answered {response.status_code}"
                    return
                async for frame in order_frames(response):
                    booking.frames += 1
                    now = time.perf_counter()
                    order = frame.order
                    status = order["status"]
                    booking.seen.setdefault(status, now)
                    ref = (order.get("payment") or {}).get("ref")
                    if ref and booking.payment_ref is None:
                        booking.payment_ref = ref
                        booking.seen["payment link"] = now
                        if not pay:
                            booking.outcome = "payment link shown"
                            return
                        paying = asyncio.create_task(self._pay(booking, ref))
                    if status == "confirmed":
                        booking.confirmed_at = now
                        booking.outcome = "confirmed"
                        return
                    if status in ENDED:
                        booking.outcome = f"order {status}"
                        return
            booking.outcome = f"the stream ended at {booking.frames} frames, unconfirmed"
        finally:
            if paying is not None:
                await paying

    async def _pay(self, booking: Booking, ref: str) -> None:
        """The payer pays at Konnect, whose webhook goes through the gateway before it answers."""
        paid = await self.konnect.post(f"/_sandbox/payments/{ref}/complete", json={})
        booking.paid_at = time.perf_counter()
        if paid.status_code != 200:
            booking.webhook_trouble = f"paying answered {paid.status_code}"
            return
        webhooks = [d.get("status_code") for d in paid.json().get("webhooks", [])]
        if webhooks != [200]:
            # Overloaded, the gateway may give up (504) or the sandbox stop waiting (None)
            # while payments still applies the payment; if it did not, reconciliation will.
            booking.webhook_trouble = f"webhook answered {webhooks}"


# --- progress -------------------------------------------------------------------------------------


class Progress:
    """A plain progress bar on stderr (a line every few seconds when stderr is no terminal)."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.started = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.shown = 0.0

    def update(self, done: int, note: str = "", *, final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now - self.shown < (0.2 if self.tty else 5.0):
            return
        self.shown = now
        width = 30
        filled = int(width * done / max(self.total, 1))
        line = (
            f"  {self.label:<11} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}"
            f"  {now - self.started:5.1f}s  {note}"
        )
        if self.tty:
            print(f"\r{line:<100}", end="\n" if final else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


# --- the phases -----------------------------------------------------------------------------------


def quantiles_ms(values: list[float]) -> dict[str, float | None]:
    if len(values) < 2:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "p50_ms": round(q[49], 1),
        "p95_ms": round(q[94], 1),
        "p99_ms": round(q[98], 1),
        "max_ms": round(max(values), 1),
    }


def outcomes(bookings: list[Booking]) -> dict[str, int]:
    return dict(Counter(b.outcome for b in bookings).most_common())


def webhook_trouble(bookings: list[Booking]) -> dict[str, dict[str, int]]:
    """The webhooks not answered 200, and how those bookings ended."""
    troubled: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for b in bookings:
        if b.webhook_trouble:
            troubled[b.webhook_trouble][b.outcome] += 1
    return {trouble: dict(ends) for trouble, ends in troubled.items()}


def where_time_goes(bookings: list[Booking]) -> dict[str, dict[str, Any]]:
    """p50/p99 of each stage: the POST, then each status as the order's stream first showed it;
    and, beside them, the payer's call (the sandbox calls the webhook, through the gateway,
    before it answers), which overlaps "payment link -> paid"."""
    stages: dict[str, list[float]] = defaultdict(list)
    for b in bookings:
        if b.confirmed_at is None:
            continue
        marks = [("POST answered", b.accepted_at), ("payment link", b.seen.get("payment link"))]
        marks += [(status, b.seen.get(status)) for status in FLOW_STATUSES[1:]]
        previous, previous_name = b.posted_at, "POST sent"
        for name, at in marks:
            if at is None:
                continue
            stages[f"{previous_name} -> {name}"].append((at - previous) * 1000)
            previous, previous_name = at, name
        if (link := b.seen.get("payment link")) and b.paid_at:
            stages["(payment link -> the pay call answered)"].append((b.paid_at - link) * 1000)
    result = {}
    for name, values in stages.items():
        qs = quantiles_ms(values)
        result[name] = {"p50_ms": qs["p50_ms"], "p99_ms": qs["p99_ms"]}
    return result


async def warm_up(driver: Driver, count: int) -> None:
    gate = asyncio.Semaphore(16)

    async def one() -> Booking:
        async with gate:
            return await driver.book()

    done = await asyncio.gather(*(one() for _ in range(count)))
    bad = [b.outcome for b in done if b.outcome != "confirmed"]
    if bad:
        raise BenchError(f"warm-up: {len(bad)} of {count} bookings failed: {Counter(bad)}")


async def at_rate(driver: Driver, meter: CpuMeter, rate: float, seconds: float) -> dict[str, Any]:
    """Bookings started at a steady `rate` (paced by the clock), each followed to the end."""
    total = int(rate * seconds)
    progress = Progress(f"{rate:g}/s", total)
    tasks: list[asyncio.Task[Booking]] = []
    finished = 0

    def count(_: asyncio.Task) -> None:
        nonlocal finished
        finished += 1

    before = await meter.snapshot()
    start = time.perf_counter()
    for n in range(total):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(driver.book())
        task.add_done_callback(count)
        tasks.append(task)
        progress.update(n + 1, f"started, {finished} done")
    late = time.perf_counter() - (start + (total - 1) / rate)
    while finished < total:
        progress.update(total, f"started, {finished} done")
        await asyncio.sleep(0.1)
    progress.update(total, "done", final=True)
    bookings = [t.result() for t in tasks]
    after = await meter.snapshot()
    latencies = [b.latency_ms for b in bookings if b.latency_ms is not None]
    return {
        "rate_per_second": rate,
        "seconds": seconds,
        "bookings": total,
        "pacing_lag_ms": round(max(late, 0) * 1000, 1),
        "outcomes": outcomes(bookings),
        "webhook_trouble": webhook_trouble(bookings),
        **quantiles_ms(latencies),
        "stream_frames_per_booking": round(sum(b.frames for b in bookings) / max(total, 1), 2),
        "stages": where_time_goes(bookings),
        "cpu": meter.used(before, after, len(latencies)),
    }


async def keep_busy(driver: Driver, in_flight: int, stop: asyncio.Event) -> Counter[str]:
    """Bookings, `in_flight` at a time, until `stop` is set (those under way are abandoned)."""
    seen: Counter[str] = Counter()

    async def worker() -> None:
        while not stop.is_set():
            seen[(await driver.book()).outcome] += 1

    workers = [asyncio.create_task(worker()) for _ in range(in_flight)]
    await stop.wait()
    for task in workers:
        task.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    return seen


async def full_speed(
    driver: Driver, meter: CpuMeter, seconds: float, in_flight: int
) -> dict[str, Any]:
    """Bookings for `seconds`, `in_flight` of them under way at any time, then the drain.

    Sustained: confirmations per second once the pipeline is full (after the first fifth of the
    time) until the last booking is started; the CPU is counted until the drain ends, over every
    booking confirmed.
    """
    progress = Progress("full speed", int(seconds))
    bookings: list[Booking] = []
    confirmed: list[float] = []
    before = await meter.snapshot()
    start = time.perf_counter()
    stop_starting = start + seconds

    async def worker() -> None:
        while time.perf_counter() < stop_starting:
            booking = await driver.book()
            bookings.append(booking)
            if booking.confirmed_at is not None:
                confirmed.append(booking.confirmed_at)
            elapsed = time.perf_counter() - start
            progress.update(
                min(int(elapsed), int(seconds)), f"{len(confirmed) / elapsed:6.1f} confirmed/s"
            )

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - start
    progress.update(int(seconds), f"{len(confirmed) / elapsed:6.1f} confirmed/s", final=True)
    after = await meter.snapshot()
    ramp = start + max(seconds / 5, 2.0)
    window = [t for t in confirmed if ramp <= t <= stop_starting]
    sustained = round(len(window) / (stop_starting - ramp), 1) if stop_starting > ramp else None
    latencies = [b.latency_ms for b in bookings if b.latency_ms is not None]
    return {
        "seconds_starting_bookings": seconds,
        "seconds_with_the_drain": round(elapsed, 2),
        "in_flight": in_flight,
        "bookings": len(bookings),
        "outcomes": outcomes(bookings),
        "webhook_trouble": webhook_trouble(bookings),
        "confirmed_per_second_sustained": sustained,
        "confirmed_per_second_overall": round(len(confirmed) / elapsed, 1),
        "latency_under_load": quantiles_ms(latencies),
        "stream_frames_per_booking": round(
            sum(b.frames for b in bookings) / max(len(bookings), 1), 2
        ),
        "cpu": meter.used(before, after, len(confirmed)),
    }


async def reading_an_order(driver: Driver, meter: CpuMeter, gets: int) -> dict[str, Any]:
    """`gets` reads of one confirmed order through the gateway, one at a time, on a quiet
    system: the CPU of one `GET /api/orders/{id}` in every process of the system (the gateway,
    orders, Postgres...), less what the idle system spends meanwhile (an idle window before)."""
    booking = await driver.book()
    if booking.order_id is None:
        raise BenchError(f"no order to read: the booking ended {booking.outcome}")
    path = f"/api/orders/{booking.order_id}"

    async def read() -> None:
        await driver._expect(driver.api.get(path, headers=driver.mentee), 200, "GET order")

    for _ in range(50):  # the connection opened and the token verified, once
        await read()
    idle_before = await meter.snapshot()
    await asyncio.sleep(IDLE_WINDOW_SECONDS)
    idle_after = await meter.snapshot()
    before = await meter.snapshot()
    for _ in range(gets):
        await read()
    after = await meter.snapshot()
    idle = meter.used(idle_before, idle_after, 1)["cpu_seconds"]
    busy = meter.used(before, after, gets)["cpu_seconds"]
    scale = (after.at - before.at) / (idle_after.at - idle_before.at)
    system = [*SERVICES, "postgres (our database's backends)", "rabbitmq (whole broker)"]
    per_get = {
        name: round(max(busy.get(name, 0.0) - idle.get(name, 0.0) * scale, 0.0) * 1000 / gets, 3)
        for name in system
    }
    return {
        "gets": gets,
        "gets_per_second": round(gets / (after.at - before.at), 1),
        "cpu_ms_per_get": per_get,
        "system_cpu_ms_per_get": round(sum(per_get.values()), 3),
    }


async def admin_socket(system: System, headers: dict[str, str]) -> ClientConnection:
    url = system.gateway.replace("http://", "ws://", 1) + "/ws/admin"
    socket_ = await connect(url, additional_headers=headers, open_timeout=30, proxy=None)
    async with asyncio.timeout(30):
        hello = json.loads(await socket_.recv())
    if hello.get("type") != "hello":
        raise BenchError(f"the admin websocket said {hello} instead of hello")
    return socket_


async def webhook_to_alert(driver: Driver, samples: int) -> dict[str, Any]:
    """A forged webhook each time (a ref Konnect never issued): send -> its Warning frame."""
    socket_ = await admin_socket(driver.system, driver.admin)
    arrivals: dict[str, tuple[float, dict[str, Any]]] = {}
    arrived = asyncio.Event()

    async def read() -> None:
        async for raw in socket_:
            now = time.perf_counter()
            frame = json.loads(raw)
            if frame.get("type") == "ping":
                await socket_.send('{"type": "pong"}')
            elif frame.get("type") == "notification":
                ref = (frame["data"].get("metadata") or {}).get("payment_ref")
                if ref:
                    arrivals.setdefault(ref, (now, frame["data"]))
                    arrived.set()

    reader = asyncio.create_task(read())
    latencies: list[float] = []
    answers: Counter[int] = Counter()
    severities: Counter[str] = Counter()
    missed = 0
    progress = Progress("ws alerts", samples)
    try:
        for n in range(samples):
            ref = uuid.uuid4().hex[:24]  # Konnect's refs are 24 hex digits
            sent = time.perf_counter()
            response = await driver.api.get("/api/payments/webhook", params={"payment_ref": ref})
            answers[response.status_code] += 1
            deadline = sent + 5
            while ref not in arrivals and time.perf_counter() < deadline:
                arrived.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(deadline - time.perf_counter()):
                        await arrived.wait()
            if ref in arrivals:
                at, data = arrivals[ref]
                latencies.append((at - sent) * 1000)
                severities[f"{data['type']}/{data['severity']}"] += 1
                missed = 0
            else:
                missed += 1
                if missed == 5:
                    print("\n  five alerts in a row did not come: giving up", file=sys.stderr)
                    break
            progress.update(n + 1)
            await asyncio.sleep(0.02)  # one at a time: the latency of one, not of a queue
        progress.update(samples, final=True)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        await socket_.close()
    return {
        "samples": samples,
        "alerts_received": len(latencies),
        "webhook_answers": dict(answers),
        "alerts": dict(severities),
        **quantiles_ms(latencies),
    }


async def duplicate_storm(driver: Driver, duplicates: int) -> dict[str, Any]:
    """One payment paid at Konnect, then `duplicates` webhooks for it at once through the gateway.

    The payer pays without the webhook (Konnect's control API, `webhook: none`), so every one of
    the storm's calls races to be the one that applies it.
    """
    mentor = await driver.add_mentor()
    booking = await driver.book(mentor, pay=False)
    order_id, ref = booking.order_id, booking.payment_ref
    if order_id is None or ref is None:
        raise BenchError(f"the storm's booking showed no payment link: {booking.outcome}")
    await driver._expect(
        driver.konnect.post(f"/_sandbox/payments/{ref}/complete", json={"webhook": "none"}),
        200,
        "paying the storm's payment without its webhook",
    )
    limits = httpx.Limits(
        max_connections=duplicates,
        max_keepalive_connections=duplicates,
        keepalive_expiry=KEEPALIVE_EXPIRY_SECONDS,
    )
    async with httpx.AsyncClient(
        base_url=driver.system.gateway, timeout=60, trust_env=False, limits=limits
    ) as storm:
        # Connections first, so the storm measures requests, not TCP handshakes.
        await asyncio.gather(*(storm.get("/health/live") for _ in range(min(duplicates, 200))))
        statuses: Counter[str] = Counter()
        gate = asyncio.Event()

        async def one() -> None:
            await gate.wait()
            try:
                response = await storm.get("/api/payments/webhook", params={"payment_ref": ref})
                statuses[str(response.status_code)] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1

        tasks = [asyncio.create_task(one()) for _ in range(duplicates)]
        await asyncio.sleep(0)
        started = time.perf_counter()
        gate.set()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    # Effects: the order goes on to confirmed, once; then let any straggler arrive.
    async with asyncio.timeout(driver.timeout):
        await driver.follow(booking)
    await asyncio.sleep(3)
    counts = await events_recorded(driver.system, order_id)
    events = await driver.google.get("/_sandbox/events", params={"account": mentor.email})
    counts["Google calendar events"] = len(events.json().get("events", []))
    exactly_once = all(counts.get(t) == 1 for t in FLOW_EVENTS) and not counts.get(
        "SessionIssueDetected"
    )
    return {
        "duplicates": duplicates,
        "seconds": round(elapsed, 3),
        "requests_per_second": round(duplicates / elapsed, 1),
        "answers": dict(statuses),
        "order": booking.outcome,
        "effects": counts,
        "exactly_once": exactly_once and counts["Google calendar events"] == 1,
    }


async def events_recorded(system: System, order_id: str) -> dict[str, int]:
    """How many of each event the services recorded about the order, read from their outboxes
    (every event goes out through one; nothing here listens on the exchange)."""
    counts = dict.fromkeys((*FLOW_EVENTS, "SessionIssueDetected"), 0)
    if not system.database_url:
        return counts
    conn = await asyncpg.connect(system.database_url, timeout=5)
    try:
        for schema in ("orders", "payments", "calendar"):
            rows = await conn.fetch(
                f"SELECT event_type, count(*) AS n FROM {schema}.outbox"
                " WHERE body::jsonb #>> '{payload,order_id}' = $1 GROUP BY event_type",
                order_id,
            )
            for row in rows:
                if row["event_type"] in counts:
                    counts[row["event_type"]] += row["n"]
    finally:
        await conn.close()
    return counts


# --- profiling ------------------------------------------------------------------------------------


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


# Where a sample's stack passes, by the code it passes through (a sample can be in several).
PROFILE_AREAS = {
    "HTTP requests (uvicorn, starlette, fastapi)": ("httptools_impl.py",),
    "sync dependencies sent to the thread pool": ("run_in_threadpool",),
    "event handling (runtime consumer)": ("runtime/consumer.py",),
    "outbox relay": ("runtime/outbox.py",),
    "SQLAlchemy": ("sqlalchemy/",),
    "asyncpg": ("asyncpg/",),
    "pydantic": ("pydantic/", "pydantic_core/"),
    "logging": ("logging/", "runtime/logs.py"),
    "httpx (calls out)": ("httpx/", "httpcore/"),
    "aio-pika, aiormq (broker)": ("aio_pika/", "aiormq/", "pamqp/"),
    "JWT checks": ("jwt/",),
    "metrics": ("prometheus_client/", "runtime/metrics.py"),
}


def summarise_profile(raw: Path, top: int = 15) -> dict[str, Any]:
    """From py-spy's collapsed stacks: the share of samples in each area of the code, and the
    frames with the most samples of their own."""
    own: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        own[stack.rsplit(";", 1)[-1]] += n
        for area, needles in PROFILE_AREAS.items():
            if any(needle in stack for needle in needles):
                areas[area] += n
    if not total:
        return {"samples": 0}

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(100 * c / total, 1)) for f, c in counter.most_common(top)]

    return {"samples": total, "areas": share(areas), "self": share(own)}


async def profile_hottest(
    driver: Driver,
    cpu: dict[str, Any],
    seconds: float,
    in_flight: int,
    stamp: str,
    chosen: str | None = None,
) -> dict[str, Any] | None:
    """py-spy on the service that used the most CPU per booking (or `chosen`), under load."""
    spy = py_spy()
    per = cpu["cpu_ms_per_booking"]
    candidates = [s for s in SERVICES if s in driver.system.pids and s in per]
    if spy is None or not candidates:
        return None
    hottest = chosen if chosen in candidates else max(candidates, key=per.__getitem__)
    pid = driver.system.pids[hottest]
    results_file.RESULTS.mkdir(exist_ok=True)
    raw = results_file.RESULTS / f"bookings-{stamp}-profile-{hottest}.txt"
    recorder = await asyncio.create_subprocess_exec(
        spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        "100",
        "--format",
        "raw",
        "--nonblocking",
        "--gil",  # only samples holding the GIL: where the CPU goes, not where it waits
        "--output",
        str(raw),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    stop = asyncio.Event()
    load = asyncio.create_task(keep_busy(driver, in_flight, stop))
    _, errors = await recorder.communicate()
    stop.set()
    driven = await load
    if recorder.returncode != 0 or not raw.exists():
        return {"service": hottest, "error": errors.decode(errors="replace").strip()[-300:]}
    return {
        "service": hottest,
        "seconds": seconds,
        "raw_stacks": str(raw.relative_to(ROOT)),
        "bookings_meanwhile": dict(driven),
        **summarise_profile(raw),
    }


# --- the run --------------------------------------------------------------------------------------


async def machine_busy(seconds: float) -> float:
    """How busy the machine is (percent of every core) over the next `seconds`."""
    busy0, total0, _ = machine_cpu()
    await asyncio.sleep(seconds)
    busy1, total1, _ = machine_cpu()
    return round(100 * (busy1 - busy0) / max(total1 - total0, 1e-9), 1)


async def after_the_load(driver: Driver) -> dict[str, Any]:
    """One more booking once the load is over: does the system still confirm one, and how fast?"""
    await asyncio.sleep(5)  # what the load left in the queues has a moment to drain
    booking = await driver.book()
    return {"outcome": booking.outcome, "ms": round(booking.latency_ms or 0, 1) or None}


async def run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """The phases, each result into `result` as soon as it is known (so a stop keeps them).

    The webhook -> alert latency and the storm come first, on a warm and quiet system; then full
    speed (a closed loop: at most `--in-flight` bookings wait); then the steady rate, an open
    loop that overloads a system slower than the rate; last, a booking after all that.
    """
    overrides = dict(kv.split("=", 1) for kv in args.env)
    busy_before = await machine_busy(3.0)
    print(f"  the machine is {busy_before}% busy before the benchmark starts")
    # started() described the machine (its calibration included); what only this one measures:
    result["machine"] = {
        "busy_percent_before_start": busy_before,
        **result["machine"],
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    print(
        f"  its CPU: {result['machine']['cpu_model']}, the calibration loop in"
        f" {result['machine']['python_loop_ms']} ms (compare runs on different hosts by it)"
    )
    result["settings"] = {
        "system": "given: " + args.url if args.url else "started by the benchmark",
        **{k: v for k, v in vars(args).items() if k != "url"},
    }
    if args.url:
        given = running_system(args.url)
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
                (await http.get(f"{given.gateway}/health/live")).raise_for_status()
        except httpx.HTTPError as exc:
            raise BenchError(
                f"the gateway at {given.gateway} does not answer ({type(exc).__name__}):"
                " start the system with `make run`, or leave out --url"
            ) from None
        system_cm: contextlib.AbstractAsyncContextManager[System] = contextlib.nullcontext(given)
    else:
        print("  starting the system (make run: fresh database and vhost, free ports) ...")
        system_cm = started_system(overrides)
    async with system_cm as system:
        result["settings"]["environment"] = system.environment
        in_flight = args.in_flight
        driver = Driver(system, int(max(in_flight, args.rate * 4, 100)), args.timeout)
        meter = CpuMeter(system)
        try:
            print(f"  {args.mentors} mentors, each connected to the sandbox Google ...")
            await driver.add_mentors(args.mentors)
            print(f"  warm-up: {args.warm_up} bookings ...")
            await warm_up(driver, args.warm_up)
            print(f"  reading an order: {args.gets} GETs, one at a time ...")
            result["reading_an_order"] = await reading_an_order(driver, meter, args.gets)
            print(f"  webhook -> alert: {args.alerts} forged webhooks, one at a time ...")
            result["webhook_to_alert"] = await webhook_to_alert(driver, args.alerts)
            print(f"  duplicate-webhook storm: {args.duplicates} at once for one payment ...")
            result["duplicate_storm"] = await duplicate_storm(driver, args.duplicates)
            print(f"  full speed: {args.full_seconds:g}s, {in_flight} bookings in flight ...")
            result["full_speed"] = await full_speed(driver, meter, args.full_seconds, in_flight)
            if args.profile_seconds > 0:
                if py_spy() is None:
                    print("  (no py-spy: `uv pip install py-spy` to profile the hottest service)")
                else:
                    print(f"  profiling the hottest service for {args.profile_seconds:g}s ...")
                    result["profile"] = await profile_hottest(
                        driver,
                        result["full_speed"]["cpu"],
                        args.profile_seconds,
                        in_flight,
                        results_file.stamp(result),
                        args.profile,
                    )
            print(f"  at {args.rate:g}/s for {args.seconds:g}s: booking -> confirmed ...")
            result["at_rate"] = await at_rate(driver, meter, args.rate, args.seconds)
            print("  one more booking, after the load ...")
            result["after_the_load"] = await after_the_load(driver)
        finally:
            await driver.close()


def at_most(value: float | None, target: float) -> bool:
    return value is not None and value <= target


def summary_rows(result: dict[str, Any]) -> list[tuple[str, Any, str, bool | None]]:
    rows: list[tuple[str, Any, str, bool | None]] = []
    if fast := result.get("full_speed"):
        sustained = fast["confirmed_per_second_sustained"] or 0.0
        rows += [
            (
                "confirmed/s, sustained",
                sustained,
                f">= {TARGET_PER_SECOND:g}",
                sustained >= TARGET_PER_SECOND,
            ),
            ("  aim", sustained, f">= {AIM_PER_SECOND:g}", sustained >= AIM_PER_SECOND),
            ("  confirmed/s, overall", fast["confirmed_per_second_overall"], "", None),
            (
                "system CPU/booking (ms)",
                cpu_ms := fast["cpu"]["system_cpu_ms_per_booking"],
                f"<= {TARGET_SYSTEM_CPU_MS:g}",
                at_most(cpu_ms, TARGET_SYSTEM_CPU_MS),
            ),
            ("  aim", cpu_ms, f"<= {AIM_SYSTEM_CPU_MS:g}", at_most(cpu_ms, AIM_SYSTEM_CPU_MS)),
            ("  p99 under load (ms)", fast["latency_under_load"]["p99_ms"], "", None),
        ]
    if steady := result.get("at_rate"):
        rate = steady["rate_per_second"]
        rows += [
            (f"p50 at {rate:g}/s (ms)", steady["p50_ms"], "", None),
            (f"p95 at {rate:g}/s (ms)", steady["p95_ms"], "", None),
            (
                f"p99 at {rate:g}/s (ms)",
                steady["p99_ms"],
                f"<= {TARGET_CONFIRMED_P99_MS:g}",
                at_most(steady["p99_ms"], TARGET_CONFIRMED_P99_MS),
            ),
        ]
    if reading := result.get("reading_an_order"):
        get_ms = reading["system_cpu_ms_per_get"]
        rows.append(
            (
                "GET order: CPU, all (ms)",
                get_ms,
                f"<= {TARGET_GET_CPU_MS:g}",
                at_most(get_ms, TARGET_GET_CPU_MS),
            )
        )
    if alerts := result.get("webhook_to_alert"):
        rows += [
            ("webhook -> alert p50 (ms)", alerts["p50_ms"], "", None),
            (
                "webhook -> alert p99 (ms)",
                alerts["p99_ms"],
                f"<= {TARGET_ALERT_P99_MS:g}",
                at_most(alerts["p99_ms"], TARGET_ALERT_P99_MS),
            ),
        ]
    if storm := result.get("duplicate_storm"):
        rows += [
            ("storm: requests/s", storm["requests_per_second"], "", None),
            (
                "storm: effects once",
                "yes" if storm["exactly_once"] else "NO",
                "exactly 1",
                storm["exactly_once"],
            ),
        ]
    if after := result.get("after_the_load"):
        rows.append(("a booking after the load", after["outcome"], "", None))
    return rows


def print_outcomes(phase: str, measured: dict[str, Any]) -> None:
    print(f"  outcomes at {phase}: {measured['outcomes']}")
    if measured["webhook_trouble"]:
        print(f"    webhooks not answered 200, and how those ended: {measured['webhook_trouble']}")


def report(result: dict[str, Any]) -> Path:
    print()
    print(f"  {'measure':<28}{'value':>10}  {'target':<10}")
    for name, value, target, ok in summary_rows(result):
        mark = "" if ok is None else ("ok" if ok else "MISSED")
        print(f"  {name:<28}{value!s:>10}  {target:<10}{mark}")
    if stopped := result.get("stopped"):
        print(f"\n  stopped early: {stopped}")
    if alerts := result.get("webhook_to_alert"):
        print(
            f"\n  webhook -> alert: {alerts['alerts_received']} of {alerts['samples']} alerts"
            f" arrived; webhook answers {alerts['webhook_answers']}; alerts {alerts['alerts']}"
        )
    if storm := result.get("duplicate_storm"):
        print(f"  storm answers: {storm['answers']}; effects: {storm['effects']}")
    if fast := result.get("full_speed"):
        print_outcomes("full speed", fast)
    if steady := result.get("at_rate"):
        rate = steady["rate_per_second"]
        print_outcomes(f"{rate:g}/s", steady)
        print(f"\n  where the time goes at {rate:g}/s (p50 / p99 ms):")
        for stage, qs in steady["stages"].items():
            print(f"    {stage:<58}{qs['p50_ms']!s:>8} {qs['p99_ms']!s:>8}")
    if reading := result.get("reading_an_order"):
        each = ", ".join(f"{k.split(' ')[0]} {v}" for k, v in reading["cpu_ms_per_get"].items())
        print(f"\n  one GET /api/orders/{{id}}, CPU ms in each process: {each}")
    if fast:
        cpu = fast["cpu"]
        print(
            f"\n  CPU per confirmed booking at full speed (ms; the machine"
            f" {cpu['machine_busy_percent']}% busy, {cpu['cores_busy']} cores):"
        )
        for name, ms in sorted(cpu["cpu_ms_per_booking"].items(), key=lambda kv: -kv[1]):
            print(f"    {name:<40}{ms:>8}")
        print(
            "    the system alone (services, postgres, rabbitmq):"
            f" {cpu['system_cpu_ms_per_booking']} ms, so at most"
            f" {cpu['bookings_per_second_if_alone_on_the_cores']} bookings/s on"
            f" {os.cpu_count()} cores with nothing else on them"
        )
        before = result["machine"]["busy_percent_before_start"]
        print(f"    (the machine was {before}% busy before)")
        if others := cpu["other_processes_cpu_seconds"]:
            listed = "; ".join(f"{k}: {v} s" for k, v in others.items())
            print(f"    everything else, the busiest: {listed}")
        counts = ", ".join(
            f"{k.replace('database_', '')} {v}" for k, v in cpu["per_booking"].items()
        )
        print(f"  per booking: {counts}")
        tables = ", ".join(f"{k} {v}" for k, v in cpu["rows_read_per_booking_by_table"].items())
        print(f"  rows read per booking, by table: {tables}")
    profile = result.get("profile")
    if profile and profile.get("self"):
        print(f"\n  py-spy, {profile['service']} at full speed ({profile['samples']} samples):")
        print("    samples in each area (one sample can be in several):")
        for area, share in profile["areas"]:
            print(f"      {share:5.1f}%  {area}")
        print("    frames with the most samples of their own:")
        for frame, share in profile["self"][:10]:
            print(f"      {share:5.1f}%  {frame[:100]}")
    elif profile:
        print(f"\n  py-spy failed on {profile['service']}: {profile.get('error')}")
    path = results_file.write("bookings", result)
    print(f"\n  results: {path.relative_to(ROOT)}")
    return path


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bookings",
        description="Bookings through the whole system: throughput, latency, alerts, a storm.",
    )
    parser.add_argument(
        "--url",
        help="drive the system running at this gateway URL (`make run`) instead of starting one;"
        " the sandboxes are found from the same port variables",
    )
    parser.add_argument("--mentors", type=int, default=50, help="mentors connected to Google")
    parser.add_argument("--warm-up", type=int, default=100, help="bookings before measuring")
    parser.add_argument("--rate", type=float, default=50, help="bookings per second, steady")
    parser.add_argument("--seconds", type=float, default=30, help="how long at that rate")
    parser.add_argument(
        "--full-seconds", type=float, default=45, help="how long bookings start at full speed"
    )
    parser.add_argument(
        "--in-flight", type=int, default=64, help="bookings under way at once at full speed"
    )
    parser.add_argument(
        "--gets", type=int, default=2000, help="reads of one order, one by one, on a quiet system"
    )
    parser.add_argument("--alerts", type=int, default=200, help="forged webhooks, one at a time")
    parser.add_argument("--duplicates", type=int, default=1000, help="the storm's webhooks")
    parser.add_argument(
        "--profile-seconds", type=float, default=20, help="py-spy on the hottest service (0: no)"
    )
    parser.add_argument(
        "--profile", choices=SERVICES, help="the service to profile (default: the hottest)"
    )
    parser.add_argument(
        "--timeout", type=float, default=120, help="seconds one booking may take before it counts"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the system it starts (repeatable), e.g. --env CONSUMER_CONCURRENCY=16",
    )
    return parser.parse_args()


async def main(args: argparse.Namespace) -> int:
    result = results_file.started("bookings")
    code = 0
    try:
        await run(args, result)
    except BenchError as exc:
        print(f"\nbench stopped: {exc}", file=sys.stderr)
        result["stopped"], code = str(exc), 1
    except (httpx.HTTPError, OSError) as exc:
        where = f"the system at {args.url}" if args.url else "the system it started"
        stopped = f"{where} failed us: {type(exc).__name__}: {exc}"
        print(f"\nbench stopped: {stopped}", file=sys.stderr)
        result["stopped"], code = stopped, 1
    except asyncio.CancelledError:  # Ctrl-C: the system is stopped, what was measured is kept
        print("\nbench interrupted", file=sys.stderr)
        result["stopped"], code = "interrupted", 130
    if any(k in result for k in ("full_speed", "webhook_to_alert", "duplicate_storm")):
        report(result)
    return code


if __name__ == "__main__":
    # The services run under uvicorn, which uses uvloop: drive them from the same loop.
    try:
        sys.exit(uvloop.run(main(arguments())))
    except KeyboardInterrupt:
        sys.exit(130)
