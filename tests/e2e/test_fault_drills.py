"""Fault drills: under a steady load of bookings, parts of the system die and nothing is lost.

The whole system runs as separate processes, with two replicas of payments and of calendar (each
its own port; the gateway's PAYMENTS_URL and CALENDAR_URL point at replica "a", the webhook and
OAuth path, while "b" consumes events and runs its sweepers too), against a PRIVATE Postgres
cluster and a PRIVATE RabbitMQ node this module starts on free ports, so that stopping them never
touches the shared servers other tests and CI use. A background load books and pays about three
sessions a second through the gateway and the sandbox Konnect (each payer spends a second on the
pay page); four mentors are connected to the sandbox Google and a fifth never connects (its
bookings end `scheduling_failed` and raise an alert, which gives notifications steady work).

The drills, one after the other on the same running system, each striking mid-flow (a payer on
the pay page, other bookings between two steps):
(a) kill -9 each process in turn (orders, both replicas of payments and of calendar,
    notifications, gateway) and start it again; killing the gateway or payments "a" loses the
    webhooks of payments made meanwhile, which reconciliation must find;
(b) stop RabbitMQ for a minute (`rabbitmqctl stop_app`, then `start_app`) under the load, after
    which every event published before the stop is delivered once more, as at-least-once
    delivery allows;
(c) stop Postgres for a minute (`pg_ctl stop`, then `start`) under the load, the drill's events
    being delivered once more while it is down: consumers pause instead of spending their
    retries, requests are answered 503 with Retry-After, and the logs stay small;
(d) the sandbox providers fail: first a few calls each, which the retries must absorb; then
    Google and Konnect for longer than the retries: Google's outage is outlasted by the
    scheduling retry schedule, Konnect's ends bookings in a defined failure;
(e) the calendar service starts only after events for it were published (its bindings gone, as
    on a first deployment that skipped the topology step): the events wait in the outbox, the
    admins hear of it once, and they are delivered once calendar is up.

After each, within a bound: every order in the database is in a terminal state (confirmed; paid
and waiting for its mentor to connect Google; cancelled or payment_failed); each booking the drill
made has exactly the effects of its outcome: one completed Konnect payment (any other Konnect
payment of its order is an orphan of an interrupted initiation, never paid, never shown), one
escrow hold, one Google event, one CalendarBookingConfirmed for a confirmed one, one admin
notification counted once for a failed one; every event in any outbox is sent and in the inbox of
every service that subscribes to it; every queue is drained, every dead-letter queue empty and no
dead letter kept; every process answers 200 on /health/ready.

The drills run with the default attempt counts (consumers, Konnect, Google, the scheduling retry
schedule): DRILL_SETTINGS below only shortens delays and intervals, keeping their shape, and lifts
payments' budget of Konnect lookups, which the load's rate is above.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import re
import reprlib
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sized
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from aio_pika.abc import AbstractIncomingMessage

from booking.calendar.settings import CalendarSettings
from booking.contracts import MentorRegistered, OrderCancelled, OrderPaid
from booking.devtools.devrun import child_environment
from booking.devtools.fixtures import eventually, pick_free_ports
from booking.devtools.infra import (
    InfraError,
    PrivatePostgres,
    PrivateRabbitMQ,
    as_postgres,
    postgres_bindir,
    rabbitmq_scripts,
    run_command,
)
from booking.payments.settings import PaymentsSettings
from booking.runtime.auth import issue_token
from booking.runtime.settings import RuntimeSettings
from booking.runtime.transport import KEEPALIVE_EXPIRY_SECONDS
from booking.sandbox.control import ControlAuth

pytestmark = pytest.mark.e2e

# --- bounds -----------------------------------------------------------------------------------

RATE_PER_SECOND = 3.0  # bookings started per second by the load
BOOKINGS_BEFORE_FAULT = 8  # the load runs this many bookings before each fault ...
BOOKINGS_DURING_FAULT = 6  # ... this many while the part is down ...
BOOKINGS_AFTER_RECOVERY = 8  # ... and this many once everything is ready again
BOOKING_DEADLINE_SECONDS = 150  # one booking's client steps: accepted, pay link, paid
SETTLE_SECONDS = 120  # after the load stops: every booking terminal, outboxes sent, queues drained
READY_SECONDS = 120  # a restarted process (or all of them) answering 200 on /health/ready
SYSTEM_READY_SECONDS = 240  # the private servers, four migrations and nine processes
DRILL_SECONDS = BOOKING_DEADLINE_SECONDS + SETTLE_SECONDS + READY_SECONDS
# The first drill also starts the system (module-scoped), so every marker allows for it.
DRILL_TIMEOUT = SYSTEM_READY_SECONDS + DRILL_SECONDS
RETRY_PAUSE_SECONDS = 0.2  # the load's first pause between attempts at a step that failed
RETRY_PAUSE_MAX_SECONDS = 2.0  # ... doubling up to this, or what Retry-After says (at most 10 s)
PAYER_SECONDS = 1.0  # how long a payer spends on the pay page before paying
OUTAGE_SECONDS = 60  # how long Postgres or RabbitMQ stays down in their drills
# Bytes the system's logs may grow by during an outage drill: a line now and then for each part
# that meets it, never a stack trace per request or message.
OUTAGE_LOG_BYTES = 2_000_000
TRACEBACK = "Traceback (most recent call last)"
ACCESS_LINE = re.compile(rb'"logger": ?"booking\.access"')

# The defaults are the tested settings: attempt counts are the services' own.
CONSUMER_ATTEMPTS = RuntimeSettings().consumer_max_attempts
KONNECT_ATTEMPTS = PaymentsSettings().konnect_max_attempts
GOOGLE_ATTEMPTS = CalendarSettings().google_max_attempts
# Faults per endpoint in the drill the retries must absorb: fewer than one call's attempts, so
# no booking can meet more faults than it has retries, however the calls interleave.
ABSORBED_FAULTS = {"konnect": KONNECT_ATTEMPTS - 1, "google": GOOGLE_ATTEMPTS - 1}

DRILL_SETTINGS = {
    "LOG_LEVEL": "INFO",
    "EVENTS_EXCHANGE": "booking.events",
    "ADMIN_ALERTS_EXCHANGE": "admin.alerts",
    "QUEUE_PREFIX": "",
    "BROKER_RECONNECT_INTERVAL_SECONDS": "0.5",
    "OUTBOX_POLL_INTERVAL_SECONDS": "0.5",
    # Delays shortened, their shape (doubling) and the attempt counts kept.
    "CONSUMER_RETRY_BASE_DELAY_MS": "100",
    # payments: lost webhooks reconciled within seconds; an interrupted initiation redone soon.
    "RECONCILIATION_INTERVAL_SECONDS": "1",
    "RECONCILIATION_GRACE_SECONDS": "2",
    "INITIATION_LEASE_SECONDS": "5",
    "INITIATION_GRACE_SECONDS": "2",
    "KONNECT_RETRY_BASE_SECONDS": "0.05",
    "KONNECT_TIMEOUT_SECONDS": "5",
    # calendar: a lapsed lease or an unclaimed booking is swept within seconds.
    "SCHEDULING_LEASE_SECONDS": "5",
    "SCHEDULING_GRACE_SECONDS": "2",
    "SWEEPER_INTERVAL_SECONDS": "1",
    "MEET_PENDING_RETRY_SECONDS": "2",
    # The scheduling retry schedule's shape (1, 5, 15, 60 minutes), a hundred times faster.
    "SCHEDULING_RETRY_DELAYS_MINUTES": "0.01,0.05,0.15,0.6",
    "GOOGLE_RETRY_BASE_SECONDS": "0.05",
    "GOOGLE_TIMEOUT_SECONDS": "5",
    "GOOGLE_MEET_POLL_BASE_SECONDS": "0.05",
    # gateway: a service that is down answers at once; a slow one is not waited on for long.
    "UPSTREAM_TIMEOUT_SECONDS": "10",
    "UPSTREAM_CONNECT_TIMEOUT_SECONDS": "2",
    # sandbox Konnect: a webhook to a dead gateway is given up quickly (reconciliation follows).
    "SANDBOX_KONNECT_WEBHOOK_TIMEOUT_SECONDS": "5",
}

# Who consumes what (each service's handlers), for the check that no event was lost.
SUBSCRIBERS: dict[str, tuple[str, ...]] = {
    "MentorRegistered": ("calendar",),
    "MentorIdentityLinked": ("calendar",),
    "OrderConfirmed": ("payments",),
    "OrderCancelled": ("payments", "calendar"),
    "SchedulingAbandoned": ("payments",),
    "EscrowFrozen": ("orders", "notifications"),
    "EscrowUnfrozen": ("orders", "notifications"),
    "EscrowRefundDue": ("orders", "notifications"),
    "EscrowRefunded": ("orders", "notifications"),
    "EscrowReleased": ("orders",),
    "AdminActionRecorded": ("notifications",),
    "BookingRequested": ("payments",),
    "PaymentInitiated": ("orders",),
    "PaymentInitiationFailed": ("orders", "notifications"),
    "PaymentCompleted": ("orders",),
    "PaymentFailed": ("orders",),
    "PaymentAnomalyDetected": ("notifications",),
    "OrderPaid": ("calendar",),
    "SessionIssueDetected": ("notifications",),
    "CalendarBookingConfirmed": ("orders",),
    "CalendarBookingFailed": ("orders", "notifications"),
    "SystemErrorReported": ("notifications",),
}
SCHEMAS = ("orders", "payments", "calendar", "notifications")
CONSUMERS = {"orders": 1, "payments": 2, "calendar": 2, "notifications": 1}  # replicas each

# Outcomes of a booking, read from the orders and calendar schemas.
CONFIRMED = "confirmed"  # order confirmed, session scheduled
CALENDAR_FAILED = "calendar_failed"  # order paid, session scheduling_failed (the calendar gave up)
CALENDAR_WAITING = "calendar_waiting"  # order paid, waiting for the mentor to connect Google
UNPAID = "unpaid"  # order cancelled or payment_failed, session cancelled

WAITS_FOR_THE_MENTOR = ("mentor_not_integrated", "integration_revoked")

# The booking's state as the checks read it: the order, its session, its calendar booking.
BOOKING_STATE = """
    SELECT o.id::text AS id, o.status, s.status AS session_status,
           b.reason AS calendar_reason, coalesce(b.final, false) AS calendar_final
    FROM orders.orders o
    JOIN orders.booked_sessions s ON s.order_id = o.id
    LEFT JOIN calendar.calendar_bookings b ON b.session_id = s.id
"""


def outcome_of(booking: Any) -> str | None:
    """The booking's terminal outcome, or None while it is still in flight."""
    order_status, session_status = booking["status"], booking["session_status"]
    if order_status == "confirmed" and session_status == "scheduled":
        return CONFIRMED
    if order_status == "paid" and session_status == "scheduling_failed":
        return CALENDAR_FAILED
    if (
        order_status == "paid"
        and session_status == "awaiting_calendar"
        and booking["calendar_reason"] in WAITS_FOR_THE_MENTOR
        and not booking["calendar_final"]
    ):
        # Until its start passes: then final, which a week ahead no drill reaches.
        return CALENDAR_WAITING
    if order_status in ("cancelled", "payment_failed") and session_status == "cancelled":
        return UNPAID
    return None


# --- the processes ----------------------------------------------------------------------------


@dataclass
class Process:
    """One `python -m ...` process of the system, which a drill may kill and start again."""

    name: str
    module: str
    args: tuple[str, ...]
    port: int
    env: dict[str, str]
    logs: Path
    ready_path: str = "/health/ready"
    starts: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert not self.running(), f"{self.name} runs already"
        self.starts += 1
        with (self.logs / f"{self.name}-{self.starts}.log").open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: kill -9 reaches it alone
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def kill9(self) -> None:
        assert self.process is not None and self.running(), f"{self.name} is not running"
        os.killpg(self.process.pid, signal.SIGKILL)
        await asyncio.to_thread(self.process.wait, 10)

    async def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait, 10)

    async def ready(self, http: httpx.AsyncClient) -> bool:
        if not self.running():
            code = self.process.returncode if self.process else None
            pytest.fail(f"{self.name} exited ({code}):\n{self.tail()}")
        try:
            return (await http.get(self.url + self.ready_path, timeout=5)).status_code == 200
        except httpx.HTTPError:
            return False

    def tail(self, lines: int = 40) -> str:
        path = self.logs / f"{self.name}-{self.starts}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Mentor:
    id: str
    email: str
    offering_id: str
    connected: bool


@dataclass
class DrillSystem:
    postgres: PrivatePostgres
    rabbitmq: PrivateRabbitMQ
    env: dict[str, str]
    processes: dict[str, Process]
    http: httpx.AsyncClient
    mentors: list[Mentor] = field(default_factory=list)
    numbers: itertools.count = field(default_factory=itertools.count)
    checked: set[str] = field(default_factory=set)  # orders an earlier drill checked
    # Booking n starts n hours after this: each has a slot of its own, across all the drills.
    first_slot: datetime = field(
        default_factory=lambda: (
            datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=7)
        )
    )

    @property
    def gateway(self) -> str:
        return self.processes["gateway"].url

    @property
    def konnect(self) -> str:
        return self.processes["sandbox-konnect"].url

    @property
    def google(self) -> str:
        return self.processes["sandbox-google"].url

    def token(self, role: str, sub: str) -> dict[str, str]:
        secret = self.env.get("AUTH_JWT_SECRET") or RuntimeSettings().auth_jwt_secret
        if not isinstance(secret, str):
            secret = secret.get_secret_value()
        return {"Authorization": f"Bearer {issue_token(secret, sub, role)}"}

    async def wait_ready(self, *names: str) -> None:
        processes = [self.processes[n] for n in names] if names else self.processes.values()

        async def all_ready() -> bool:
            answers = await asyncio.gather(*(p.ready(self.http) for p in processes))
            return all(answers)

        await eventually(
            all_ready, timeout=READY_SECONDS, interval=0.2, what=f"{names or 'all'} ready"
        )

    @contextlib.asynccontextmanager
    async def database(self) -> AsyncIterator[asyncpg.Connection]:
        conn = await asyncpg.connect(self.postgres.url, timeout=10)
        try:
            yield conn
        finally:
            await conn.close()

    def log_bytes(self) -> dict[str, int]:
        """The size of every process's log file so far, by file."""
        logs = next(iter(self.processes.values())).logs
        return {path.name: path.stat().st_size for path in logs.glob("*.log")}

    def log_growth_since(self, sizes: dict[str, int]) -> int:
        """Bytes every log together gained since `sizes` (log_bytes of then), less the access
        log's lines: one per request, they grow with the load, not with the fault."""
        logs = next(iter(self.processes.values())).logs
        grown = 0
        for path in logs.glob("*.log"):
            with path.open("rb") as log:
                log.seek(sizes.get(path.name, 0))
                grown += sum(len(line) for line in log if not ACCESS_LINE.search(line))
        return grown

    def tracebacks_since(self, sizes: dict[str, int]) -> dict[str, str]:
        """The first stack trace each log gained since `sizes` (log_bytes of then), by file.

        The trace itself, so that a drill failing in CI says what was raised and where.
        """
        logs = next(iter(self.processes.values())).logs
        found = {}
        for path in logs.glob("*.log"):
            with path.open("rb") as log:
                log.seek(sizes.get(path.name, 0))
                grown = log.read().decode(errors="replace")
            first = grown.find(TRACEBACK)
            if first >= 0:
                count = grown.count(TRACEBACK)
                found[path.name] = f"{count} trace(s); the first:\n{grown[first : first + 4000]}"
        return found

    def tails(self) -> str:
        parts = [f"----- {p.name}\n{p.tail()}" for p in self.processes.values()]
        parts.append(f"----- private postgres\n{self.postgres.log_tail()}")
        parts.append(f"----- private rabbitmq\n{self.rabbitmq.log_tail()}")
        return "\n".join(parts)


async def migrate(name: str, env: dict[str, str], logs: Path) -> None:
    code, output = await run_command([sys.executable, "-m", f"booking.{name}", "migrate"], env=env)
    (logs / f"{name}-migrate.log").write_text(output)
    assert code == 0, f"{name} migrate failed:\n{output}"


def system_processes(env: dict[str, str], logs: Path, ports: list[int]) -> dict[str, Process]:
    """The nine processes: two sandboxes, the services (payments and calendar twice), gateway."""
    ports_of = dict(
        zip(
            [
                "sandbox-konnect",
                "sandbox-google",
                "orders",
                "payments-a",
                "payments-b",
                "calendar-a",
                "calendar-b",
                "notifications",
                "gateway",
            ],
            ports,
            strict=True,
        )
    )
    base = dict(
        env,
        SANDBOX_KONNECT_PORT=str(ports_of["sandbox-konnect"]),
        SANDBOX_GOOGLE_PORT=str(ports_of["sandbox-google"]),
        ORDERS_PORT=str(ports_of["orders"]),
        PAYMENTS_PORT=str(ports_of["payments-a"]),
        CALENDAR_PORT=str(ports_of["calendar-a"]),
        NOTIFICATIONS_PORT=str(ports_of["notifications"]),
        GATEWAY_PORT=str(ports_of["gateway"]),
    )
    # The addresses `make run` derives from the ports: the gateway reaches replica "a" of
    # payments and calendar (the webhook and OAuth path); Konnect calls back the gateway.
    base = child_environment(base)

    def process(name: str, module: str, *args: str, ready: str = "/health/ready", **extra):
        return Process(
            name,
            module,
            args,
            ports_of[name],
            dict(base, **extra),
            logs,
            ready_path=ready,
        )

    return {
        "sandbox-konnect": process(
            "sandbox-konnect", "booking.sandbox", "konnect", "serve", ready="/health/live"
        ),
        "sandbox-google": process(
            "sandbox-google", "booking.sandbox", "google", "serve", ready="/health/live"
        ),
        "orders": process("orders", "booking.orders", "serve"),
        "payments-a": process("payments-a", "booking.payments", "serve"),
        "payments-b": process(
            "payments-b", "booking.payments", "serve", PAYMENTS_PORT=str(ports_of["payments-b"])
        ),
        "calendar-a": process("calendar-a", "booking.calendar", "serve"),
        "calendar-b": process(
            "calendar-b", "booking.calendar", "serve", CALENDAR_PORT=str(ports_of["calendar-b"])
        ),
        "notifications": process("notifications", "booking.notifications", "serve"),
        "gateway": process("gateway", "booking.gateway", "serve"),
    }


@pytest.fixture(scope="module")
async def drill_system(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DrillSystem]:
    """The system on a private Postgres and RabbitMQ, with its mentors, for the whole module."""
    bindir, scripts = postgres_bindir(), rabbitmq_scripts()
    if bindir is None:
        pytest.skip("the fault drills need Postgres' initdb and pg_ctl for a private cluster")
    if scripts is None:
        pytest.skip("the fault drills need RabbitMQ's server scripts for a private node")
    if os.geteuid() == 0:
        try:
            as_postgres()
        except InfraError:
            pytest.skip("as root, the fault drills need runuser to run Postgres as postgres")

    logs = tmp_path_factory.mktemp("drills")
    pg_port, amqp_port, dist_port, *ports = pick_free_ports(12)
    # Throwaway: fsync off, since a drill stops the servers, never the machine.
    postgres = PrivatePostgres(bindir, pg_port, fsync=False)
    rabbitmq = PrivateRabbitMQ(scripts, amqp_port, dist_port)
    processes: dict[str, Process] = {}
    # The drills' one client: the sandboxes' control calls carry their token, the rest nothing.
    async with httpx.AsyncClient(timeout=15, trust_env=False, auth=ControlAuth()) as http:
        try:
            await asyncio.gather(postgres.create(), rabbitmq.start())
            env = {k: v for k, v in os.environ.items() if not k.endswith("_URL")}
            env.update(DRILL_SETTINGS)
            env.update(
                DATABASE_URL=postgres.url,
                RABBITMQ_URL=rabbitmq.url,
                BIND_HOST="127.0.0.1",
                PYTHONUNBUFFERED="1",
            )
            await asyncio.gather(*(migrate(name, env, logs) for name in SCHEMAS))
            processes.update(system_processes(env, logs, ports))
            system = DrillSystem(postgres, rabbitmq, env, processes, http)
            for name, process in processes.items():
                if name != "gateway":
                    process.start()
            await system.wait_ready(*(n for n in processes if n != "gateway"))
            processes["gateway"].start()
            await system.wait_ready("gateway")
            system.mentors = await register_mentors(system)
            yield system
        except BaseException:
            tails = [f"----- {p.name}\n{p.tail()}" for p in processes.values()]
            tails += [postgres.log_tail(), rabbitmq.log_tail()]
            print("process output:\n" + "\n".join(tails))
            raise
        finally:
            await asyncio.gather(*(p.stop() for p in processes.values()), return_exceptions=True)
            await asyncio.gather(rabbitmq.destroy(), postgres.destroy(), return_exceptions=True)


async def register_mentors(system: DrillSystem) -> list[Mentor]:
    """Five mentors with an offering each; the first four connect their (sandbox) Google."""
    admin = system.token("admin", "drill-admin")
    api = system.gateway
    mentors = []
    for number in range(5):
        email = f"drill-mentor-{number}-{uuid.uuid4().hex[:6]}@example.com"
        created = await system.http.post(
            f"{api}/api/mentors",
            json={"name": f"Mentor {number}", "email": email, "timezone": "Africa/Tunis"},
            headers=admin,
        )
        assert created.status_code == 201, created.text
        mentor_id = created.json()["id"]
        offering = await system.http.post(
            f"{api}/api/mentors/{mentor_id}/offerings",
            json={
                "title": "Architecture review",
                "duration_minutes": 60,
                "price": {"amount": 90_000, "currency": "TND"},
            },
            headers=admin,
        )
        assert offering.status_code == 201, offering.text
        mentors.append(Mentor(mentor_id, email, offering.json()["id"], connected=number < 4))
    for mentor in mentors:
        if mentor.connected:
            await connect_google(system, mentor)
    return mentors


async def connect_google(system: DrillSystem, mentor: Mentor) -> None:
    """The mentor's consent, approved at the sandbox, back through the gateway's callback."""
    headers = system.token("mentor", mentor.id)

    async def consent_url() -> str | None:
        # The calendar service knows the mentor once it has consumed MentorRegistered.
        start = await system.http.get(
            f"{system.gateway}/api/mentors/{mentor.id}/calendar/connect", headers=headers
        )
        return start.headers["location"] if start.status_code == 302 else None

    auth_url: str | None = await eventually(
        consent_url, timeout=30, interval=0.1, what="the consent URL"
    )
    approved = await system.http.post(
        f"{system.google}/_sandbox/oauth/approve", json={"auth_url": auth_url}
    )
    assert approved.status_code == 200, approved.text
    back = await system.http.get(approved.json()["location"])
    assert back.status_code == 200, back.text
    assert back.json()["connected"] is True


# --- the load ---------------------------------------------------------------------------------

RETRYABLE = {429, 500, 502, 503, 504}


@dataclass
class Booking:
    number: int
    mentor: Mentor
    start_at: datetime
    key: str = field(default_factory=lambda: f"drill-{uuid.uuid4()}")
    order_id: str | None = None
    on_the_pay_page: bool = False  # the payer has the pay link and is about to pay
    error: str | None = None
    done: bool = False


class Load:
    """Books and pays sessions at a steady rate through the gateway and the sandbox Konnect.

    Each booking is its own task, a client that keeps at it through an outage: it retries the
    POST with its Idempotency-Key until the gateway accepts it, reads the order until the pay
    link appears (or the order ends unpaid), then pays at the sandbox, which calls the webhook.
    As a well-behaved client it waits what a 503's Retry-After says, and backs off otherwise.
    Every answer of the gateway that was not a success is kept in `refusals`.
    """

    def __init__(self, system: DrillSystem) -> None:
        self.system = system
        self.bookings: list[Booking] = []
        self.refusals: list[Refusal] = []
        self.mentee = system.token("mentee", "drill-mentee")
        self._tasks: set[asyncio.Task] = set()
        self._stop = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self._client = httpx.AsyncClient(
            timeout=15,
            trust_env=False,
            auth=ControlAuth(),  # it pays at the sandbox Konnect too
            # Idle connections let go before uvicorn's keep-alive close, as the services' do.
            limits=httpx.Limits(
                max_connections=200,
                max_keepalive_connections=50,
                keepalive_expiry=KEEPALIVE_EXPIRY_SECONDS,
            ),
        )

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="drill-load")

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def payers_on_the_pay_page(self) -> list[Booking]:
        return [b for b in self.bookings if b.on_the_pay_page]

    async def stop(self) -> None:
        """Start no more bookings; wait for the ones under way to finish their client steps."""
        self._stop.set()
        if self._runner is not None:
            await self._runner
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=BOOKING_DEADLINE_SECONDS + 30)
        for task in self._tasks:
            task.cancel()
        await self._client.aclose()

    async def made(self, count: int, what: str) -> None:
        """Let the load start `count` more bookings (it paces itself)."""
        target = len(self.bookings) + count
        await eventually(
            lambda: len(self.bookings) >= target,
            timeout=count / RATE_PER_SECOND + 30,
            interval=0.05,
            what=f"{count} more bookings {what}",
        )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        mentors = self.system.mentors
        while not self._stop.is_set():
            number = next(self.system.numbers)
            # A slot of its own: booking n starts n hours after the first slot.
            booking = Booking(
                number,
                mentors[number % len(mentors)],
                self.system.first_slot + timedelta(hours=number),
            )
            self.bookings.append(booking)
            task = asyncio.create_task(self._book_and_pay(booking))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            next_at += 1 / RATE_PER_SECOND
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_at - loop.time())):
                    await self._stop.wait()

    async def _book_and_pay(self, booking: Booking) -> None:
        deadline = time.monotonic() + BOOKING_DEADLINE_SECONDS
        try:
            booking.order_id = await self._book(booking, deadline)
            ref = await self._pay_link(booking, deadline)
            if ref is not None:  # None: the order ended unpaid (no payment could be opened)
                # The payer takes a moment on Konnect's page, which is not ours: a payment can
                # land while our side is down, and its webhook is lost.
                booking.on_the_pay_page = True
                await asyncio.sleep(PAYER_SECONDS)
                await self._pay(booking, ref, deadline)
                booking.on_the_pay_page = False
        except Exception as exc:
            booking.error = f"{type(exc).__name__}: {exc}"
        finally:
            booking.done = True

    async def _attempt(self, deadline: float, what: str, step: Callable[[], Any]) -> Any:
        """Run `step` until it returns something other than None, through outages."""
        last = "no answer"
        pause = RETRY_PAUSE_SECONDS
        while True:
            wait = pause
            try:
                result = await step()
                if result is not None:
                    return result
                last = "not yet"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            except Retry as retry:
                last = str(retry)
                if retry.after is not None:
                    wait = min(retry.after, 10.0)
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: no success by the deadline (last: {last})")
            await asyncio.sleep(wait)
            pause = min(pause * 2, RETRY_PAUSE_MAX_SECONDS)

    def refused(self, answer: httpx.Response) -> Retry:
        """Keep a gateway's refusal; the Retry that says so."""
        after = answer.headers.get("retry-after")
        refusal = Refusal(time.monotonic(), answer.status_code, after, answer.text[:200])
        self.refusals.append(refusal)
        return Retry(
            f"{answer.status_code} {answer.text[:200]}",
            after=float(after) if after and after.isdigit() else None,
        )

    async def _book(self, booking: Booking, deadline: float) -> str:
        body = {
            "offering_id": booking.mentor.offering_id,
            "start_at": booking.start_at.isoformat(),
            "mentee": {
                "first_name": "Youssef",
                "last_name": "Trabelsi",
                "email": "youssef@example.com",
                "phone": "+216 20 123 456",
            },
        }
        headers = {**self.mentee, "Idempotency-Key": booking.key}

        async def post() -> str:
            answer = await self._client.post(
                f"{self.system.gateway}/api/bookings", json=body, headers=headers
            )
            if answer.status_code in RETRYABLE:
                raise self.refused(answer)
            assert answer.status_code == 202, f"booking {booking.number}: {answer.text}"
            return answer.json()["order_id"]

        return await self._attempt(deadline, f"booking {booking.number} accepted", post)

    async def _pay_link(self, booking: Booking, deadline: float) -> str | None:
        url = f"{self.system.gateway}/api/orders/{booking.order_id}"

        async def read() -> tuple[str | None] | None:
            answer = await self._client.get(url, headers=self.mentee)
            if answer.status_code in RETRYABLE:
                raise self.refused(answer)
            assert answer.status_code == 200, f"order {booking.order_id}: {answer.text}"
            order = answer.json()
            if order["status"] in ("cancelled", "payment_failed"):
                return (None,)
            payment = order["payment"]
            if payment and payment["ref"] and payment["pay_url"]:
                return (payment["ref"],)
            return None

        (ref,) = await self._attempt(deadline, f"the pay link of order {booking.order_id}", read)
        return ref

    async def _pay(self, booking: Booking, ref: str, deadline: float) -> None:
        url = f"{self.system.konnect}/_sandbox/payments/{ref}/complete"

        async def pay() -> bool:
            # Konnect calls the webhook before answering; when the gateway or payments is
            # down that call fails, and reconciliation finds the payment later.
            answer = await self._client.post(url, json={}, timeout=30)
            if answer.status_code == 409:  # paid by an earlier attempt whose answer was lost
                return True
            assert answer.status_code == 200, f"paying {ref}: {answer.text}"
            return True

        await self._attempt(deadline, f"paying order {booking.order_id}", pay)


class Retry(Exception):
    """An answer that says: try again (the system is recovering), after `after` seconds."""

    def __init__(self, message: str, *, after: float | None = None) -> None:
        super().__init__(message)
        self.after = after


@dataclass(frozen=True)
class Refusal:
    """An answer of the gateway other than a success: when, its status, its Retry-After."""

    at: float
    status: int
    retry_after: str | None
    text: str


@pytest.fixture
async def load(drill_system: DrillSystem) -> AsyncIterator[Load]:
    load = Load(drill_system)
    load.start()
    try:
        yield load
    finally:
        if not load.stopped:
            await load.stop()


# --- what must hold after each drill ----------------------------------------------------------


@dataclass
class Ledger:
    """Everything the checks compare, read from the databases, the broker and the sandboxes."""

    orders: dict[str, dict[str, Any]]
    payments: dict[str, dict[str, Any]]
    escrows: Counter
    konnect: dict[str, list[dict[str, Any]]]
    google: dict[str, list[dict[str, Any]]]
    events: dict[tuple[str, str], int]
    notifications: dict[str, list[dict[str, Any]]]
    calendar_reasons: dict[str, str | None]


async def in_flight(system: DrillSystem) -> list[str]:
    """Orders that have not reached a terminal outcome yet."""
    async with system.database() as db:
        rows = await db.fetch(BOOKING_STATE)
    return [r["id"] for r in rows if outcome_of(r) is None]


async def read_ledger(system: DrillSystem) -> Ledger:
    async with system.database() as db:
        orders = {
            r["id"]: dict(r)
            for r in await db.fetch(
                "SELECT o.id::text AS id, o.status, o.mentor_id::text AS mentor_id,"
                " o.payment_ref, o.amount, o.amount_paid, o.escrow_amount,"
                " s.id AS session_id, s.status AS session_status, s.calendar_event_id,"
                " b.reason AS calendar_reason, coalesce(b.final, false) AS calendar_final"
                " FROM orders.orders o JOIN orders.booked_sessions s ON s.order_id = o.id"
                " LEFT JOIN calendar.calendar_bookings b ON b.session_id = s.id"
            )
        }
        payments = {
            r["order_id"]: dict(r)
            for r in await db.fetch(
                "SELECT order_id::text AS order_id, status, payment_ref, amount_paid,"
                " escrow_amount FROM payments.payments"
            )
        }
        escrows = Counter(
            {
                r["order_id"]: r["holds"]
                for r in await db.fetch(
                    "SELECT order_id::text AS order_id, count(*) AS holds"
                    " FROM payments.escrow_holds GROUP BY order_id"
                )
            }
        )
        events: dict[tuple[str, str], int] = {}
        for schema in SCHEMAS:
            for r in await db.fetch(
                f"SELECT event_type, (body::jsonb -> 'payload' ->> 'order_id') AS order_id,"
                f" count(*) AS n FROM {schema}.outbox GROUP BY 1, 2"
            ):
                key = (r["event_type"], r["order_id"])
                events[key] = events.get(key, 0) + r["n"]
        notifications: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in await db.fetch(
            "SELECT metadata ->> 'order_id' AS order_id, type, occurrences,"
            " metadata ->> 'reason' AS reason FROM notifications.admin_notifications"
            " WHERE metadata ? 'order_id'"
        ):
            notifications[r["order_id"]].append(dict(r))
        calendar_reasons = {
            r["order_id"]: r["reason"]
            for r in await db.fetch(
                "SELECT order_id::text AS order_id, reason FROM calendar.calendar_bookings"
            )
        }
    listed = await system.http.get(f"{system.konnect}/_sandbox/payments")
    assert listed.status_code == 200, listed.text
    konnect: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for payment in listed.json()["payments"]:
        konnect[payment["orderId"]].append(payment)
    listed = await system.http.get(f"{system.google}/_sandbox/events")
    assert listed.status_code == 200, listed.text
    google: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in listed.json()["events"]:
        google[event["id"]].append(event)
    return Ledger(
        orders, payments, escrows, konnect, google, events, notifications, calendar_reasons
    )


def check_booking(ledger: Ledger, order_id: str, mentors: dict[str, Mentor]) -> list[str]:
    """What is wrong with one booking's effects, given its outcome (empty: nothing)."""
    order = ledger.orders[order_id]
    outcome = outcome_of(order)
    problems = []

    def expect(what: str, actual: object, wanted: object) -> None:
        if actual != wanted:
            problems.append(f"{what}: {actual!r}, expected {wanted!r}")

    event_id = order["session_id"].hex
    konnect = ledger.konnect.get(order_id, [])
    completed = [p for p in konnect if p["status"] == "completed"]
    events = ledger.google.get(event_id, [])
    alerts = ledger.notifications.get(order_id, [])
    expect("BookingRequested recorded", ledger.events.get(("BookingRequested", order_id)), 1)
    paid = outcome in (CONFIRMED, CALENDAR_FAILED, CALENDAR_WAITING)
    if paid:
        payment = ledger.payments.get(order_id) or {}
        expect("completed Konnect payments", [p["id"] for p in completed], [order["payment_ref"]])
        ours = (payment.get("status"), payment.get("payment_ref"))
        expect("our payment", ours, ("completed", order["payment_ref"]))
        # Any other Konnect payment of the order is an orphan of an interrupted initiation:
        # harmless only if nobody was ever shown it and it was never paid.
        for orphan in konnect:
            if orphan["id"] != order["payment_ref"]:
                expect(f"orphan Konnect payment {orphan['id']}", orphan["status"], "pending")
        expect("escrow holds", ledger.escrows.get(order_id, 0), 1)
        expect("escrow amount", payment.get("escrow_amount"), order["escrow_amount"])
        expect("PaymentCompleted recorded", ledger.events.get(("PaymentCompleted", order_id)), 1)
        expect("OrderPaid recorded", ledger.events.get(("OrderPaid", order_id)), 1)
    else:
        expect("completed Konnect payments", completed, [])
        expect("escrow holds", ledger.escrows.get(order_id, 0), 0)
        expect("OrderPaid recorded", ledger.events.get(("OrderPaid", order_id)), None)
    if outcome == CONFIRMED:
        expect(
            "Google events",
            [e["sandbox"]["account"] for e in events],
            [mentors[order["mentor_id"]].email],
        )
        expect("the session's event", order["calendar_event_id"], event_id)
        expect(
            "CalendarBookingConfirmed recorded",
            ledger.events.get(("CalendarBookingConfirmed", order_id)),
            1,
        )
        expect("OrderConfirmed recorded", ledger.events.get(("OrderConfirmed", order_id)), 1)
        # A scheduling attempt the calendar retried on its own raised nothing.
        expect("admin notifications", alerts, [])
    elif outcome in (CALENDAR_FAILED, CALENDAR_WAITING):
        expect("Google events", events, [])
        expect(
            "CalendarBookingConfirmed recorded",
            ledger.events.get(("CalendarBookingConfirmed", order_id)),
            None,
        )
        reason = ledger.calendar_reasons.get(order_id)
        if outcome == CALENDAR_WAITING:
            # One failed attempt, waiting for the mentor: told once, not abandoned.
            expect(
                "CalendarBookingFailed recorded",
                ledger.events.get(("CalendarBookingFailed", order_id)),
                1,
            )
            expect(
                "admin notifications (reason, counted)",
                [(a["reason"], a["occurrences"]) for a in alerts],
                [(reason, 1)],
            )
            expect(
                "SchedulingAbandoned", ledger.events.get(("SchedulingAbandoned", order_id)), None
            )
        else:
            expect("SchedulingAbandoned", ledger.events.get(("SchedulingAbandoned", order_id)), 1)
            expect("EscrowFrozen", ledger.events.get(("EscrowFrozen", order_id)), 1)
    elif outcome == UNPAID:
        expect("Google events", events, [])
        if order["status"] == "cancelled":
            expect(
                "PaymentInitiationFailed recorded",
                ledger.events.get(("PaymentInitiationFailed", order_id)),
                1,
            )
            expect("admin notifications", len(alerts), 1)
            expect("alert counted once", [a["occurrences"] for a in alerts], [1])
    else:
        problems.append(f"not terminal: order {order['status']}, session {order['session_status']}")
    return problems


async def webhooks_lost(system: DrillSystem) -> int:
    """Webhook calls of the sandbox Konnect that were not answered 200 (so far, in all)."""
    deliveries = (await system.http.get(f"{system.konnect}/_sandbox/webhooks")).json()
    return sum(d["status_code"] != 200 for d in deliveries["deliveries"])


async def queue_depths(system: DrillSystem) -> dict[str, tuple[int, int]]:
    """(ready messages, consumers) of every queue of every consumer, on the private broker."""
    names = []
    for consumer in CONSUMERS:
        names += [consumer, f"{consumer}.dlq"]
        names += [f"{consumer}.retry.{n}" for n in range(1, CONSUMER_ATTEMPTS)]
    depths = {}
    connection = await aio_pika.connect(system.rabbitmq.url, timeout=10)
    async with connection:
        for name in names:
            channel = await connection.channel()
            queue = await channel.declare_queue(name, passive=True)
            result = queue.declaration_result
            depths[name] = (result.message_count or 0, result.consumer_count or 0)
            await channel.close()
    return depths


async def unhandled_events(system: DrillSystem) -> list[str]:
    """Events some outbox sent on the events exchange that a subscriber's inbox lacks."""
    missing = []
    async with system.database() as db:
        inbox = {
            consumer: {
                r["message_id"]
                for r in await db.fetch(
                    f"SELECT message_id FROM {consumer}.inbox WHERE consumer = $1", consumer
                )
            }
            for consumer in CONSUMERS
        }
        for schema in SCHEMAS:
            for r in await db.fetch(
                f"SELECT message_id, event_type FROM {schema}.outbox WHERE exchange = $1",
                DRILL_SETTINGS["EVENTS_EXCHANGE"],
            ):
                for consumer in SUBSCRIBERS.get(r["event_type"], ()):
                    if r["message_id"] not in inbox[consumer]:
                        missing.append(
                            f"{r['event_type']} {r['message_id']} from {schema}"
                            f" not in {consumer}'s inbox"
                        )
    return missing


async def kept_dead_letters(system: DrillSystem) -> dict[str, int]:
    """Dead letters some service keeps for an admin (none should exist after a drill)."""
    async with system.database() as db:
        counts = {
            schema: await db.fetchval(
                f"SELECT count(*) FROM {schema}.dead_letters WHERE status = 'kept'"
            )
            for schema in SCHEMAS
        }
    return {schema: n for schema, n in counts.items() if n}


async def unsent_events(system: DrillSystem) -> dict[str, int]:
    async with system.database() as db:
        counts = {
            schema: await db.fetchval(f"SELECT count(*) FROM {schema}.outbox WHERE sent_at IS NULL")
            for schema in SCHEMAS
        }
    return {schema: n for schema, n in counts.items() if n}


async def assert_nothing_lost(
    system: DrillSystem, load: Load, allowed: Callable[[Booking], set[str]]
) -> dict[str, int]:
    """Every check of the drills, within their bounds; the outcomes of the load's bookings."""
    started = time.monotonic()
    await load.stop()
    # Every client did its part: each booking was accepted and paid (or ended unpaid).
    stuck = [(b.number, b.error) for b in load.bookings if b.error or not b.done]
    assert not stuck, f"bookings the load could not complete: {stuck}"

    async def until_none(what: str, find: Callable[[DrillSystem], Awaitable[Sized]]) -> None:
        """Within the bound, `find` finds nothing left (the last it found is the failure)."""

        async def none_left() -> bool:
            left = await find(system)
            assert not left, f"{len(left)} left: {reprlib.repr(left)}"
            return True

        await eventually(none_left, timeout=SETTLE_SECONDS, interval=0.5, what=what)

    # Every order in the database reaches a terminal state within the bound.
    await until_none("every booking ended (orders in flight)", in_flight)
    # Nothing stuck in an outbox, nothing waiting or dead in the broker, nothing lost between.
    await until_none("outboxes sent (unsent outbox rows)", unsent_events)

    async def queues_drained() -> dict[str, tuple[int, int]]:
        depths = await queue_depths(system)
        waiting = {q: d for q, d in depths.items() if d[0]}
        assert not waiting, f"messages waiting: {waiting}"
        consumers = {c: depths[c][1] for c in CONSUMERS}
        assert consumers == CONSUMERS, f"consumers attached: {consumers}"
        return depths

    await eventually(queues_drained, timeout=SETTLE_SECONDS, interval=0.5, what="queues drained")

    await until_none("events handled (events never handled)", unhandled_events)
    await until_none("no dead letter kept", kept_dead_letters)

    # One payment, one escrow, one calendar event, one confirmation per paid booking; one alert
    # per failure; for every order there is, not only this drill's.
    ledger = await read_ledger(system)
    mentors = {m.id: m for m in system.mentors}
    # Each order is checked by the drill that made it, so one drill's failure is not every later
    # drill's: an order no load made (none should exist) is checked all the same.
    unchecked = set(ledger.orders) - system.checked
    problems = {
        order_id: found
        for order_id in sorted(unchecked)
        if (found := check_booking(ledger, order_id, mentors))
    }
    system.checked |= unchecked
    assert not problems, f"bookings whose effects are wrong: {problems}"
    outcomes: Counter[str] = Counter()
    for booking in load.bookings:
        assert booking.order_id is not None  # none is stuck, so each was accepted
        order = ledger.orders[booking.order_id]
        outcome = outcome_of(order)
        assert outcome in allowed(booking), (booking, order)
        assert outcome is not None  # allowed() holds names only: the assert above ruled None out
        outcomes[outcome] += 1

    # And every process is ready again.
    await system.wait_ready()
    lost_webhooks = await webhooks_lost(system)
    orphans = sum(
        1
        for order_id, made in ledger.konnect.items()
        for p in made
        if p["id"] != (ledger.orders.get(order_id) or {}).get("payment_ref")
    )
    print(
        f"\n{len(load.bookings)} bookings {dict(outcomes)}; settled and checked in "
        f"{time.monotonic() - started:.1f}s; {len(ledger.orders)} orders in all,"
        f" {orphans} orphan Konnect payment(s), {lost_webhooks} webhook(s) not answered 200"
    )
    return dict(outcomes)


def as_planned(booking: Booking) -> set[str]:
    """Without provider outages: confirmed, unless the mentor never connected Google (then paid,
    the session waiting for them)."""
    return {CONFIRMED} if booking.mentor.connected else {CALENDAR_WAITING}


@contextlib.asynccontextmanager
async def showing_logs(system: DrillSystem) -> AsyncIterator[None]:
    try:
        yield
    except BaseException:
        print(f"process output:\n{system.tails()}")
        raise


async def under_load(
    system: DrillSystem,
    load: Load,
    what: str,
    fault: Callable[[], Awaitable[None]],
    recover: Callable[[], Awaitable[None]],
    allowed: Callable[[Booking], set[str]] = as_planned,
    *,
    loses_webhooks: bool = False,
    during: int = BOOKINGS_DURING_FAULT,
) -> Outage:
    """One drill: bookings before the fault, during it and after the recovery; then the checks.

    `loses_webhooks`: the fault cuts Konnect's webhook path, so the payments made during it
    must be found by reconciliation (and the drill checks that some were). `during`: bookings
    the load starts while the part is down (at RATE_PER_SECOND: how long it stays down).
    """
    async with showing_logs(system):
        lost_before = await webhooks_lost(system)
        await load.made(BOOKINGS_BEFORE_FAULT, f"before {what}")

        # Mid-flow: a payer is about to pay, other bookings are between two of their steps.
        async def mid_flow() -> list[Booking] | list[str]:
            return load.payers_on_the_pay_page() and await in_flight(system)

        caught: list[Booking] | list[str] = await eventually(
            mid_flow, timeout=30, interval=0.02, what="bookings mid-flow"
        )
        logs_before = system.log_bytes()
        started = time.monotonic()
        await fault()
        try:
            await load.made(during, f"during {what}")
        finally:
            await recover()
        outage = Outage(
            started,
            time.monotonic(),
            [r for r in load.refusals if r.at >= started],
            system.log_growth_since(logs_before),
            system.tracebacks_since(logs_before),
        )
        await system.wait_ready()
        await load.made(BOOKINGS_AFTER_RECOVERY, f"after {what}")
        print(
            f"\n{what}: {len(caught)} bookings in flight when it struck; "
            f"{outage.seconds:.0f}s down, {len(outage.refusals)} refusals, "
            f"logs grew {outage.log_bytes} bytes"
        )
        outage.outcomes = await assert_nothing_lost(system, load, allowed)
        if loses_webhooks:
            assert await webhooks_lost(system) > lost_before, "no webhook met the fault"
        return outage


@dataclass
class Outage:
    """What one drill saw while its part was down."""

    started: float
    ended: float
    refusals: list[Refusal]
    log_bytes: int
    tracebacks: dict[str, str]
    outcomes: dict[str, int] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    def assert_told_to_retry(self) -> None:
        """Every refusal was a 503 that said when to come back, and the logs stayed small."""
        wrong = [r for r in self.refusals if r.status != 503 or not r.retry_after]
        assert not wrong, f"refusals other than 503 with Retry-After: {wrong[:5]}"
        assert self.log_bytes <= OUTAGE_LOG_BYTES, f"the logs grew {self.log_bytes} bytes"
        traces = "\n".join(f"----- {name}: {trace}" for name, trace in self.tracebacks.items())
        assert not self.tracebacks, f"stack traces logged during the outage:\n{traces}"


# --- the drills -------------------------------------------------------------------------------

KILLED = [
    "orders",
    "payments-a",
    "payments-b",
    "calendar-a",
    "calendar-b",
    "notifications",
    "gateway",
]


class TestKillingEachService:
    @pytest.mark.timeout(DRILL_TIMEOUT)
    @pytest.mark.parametrize("name", KILLED)
    async def test_a_service_killed_mid_flow_and_started_again_loses_nothing(
        self, drill_system: DrillSystem, load: Load, name: str
    ):
        process = drill_system.processes[name]

        async def start_again() -> None:
            process.start()

        await under_load(
            drill_system,
            load,
            f"kill -9 {name}",
            process.kill9,
            start_again,
            # Konnect's webhook goes through the gateway to payments "a".
            loses_webhooks=name in ("gateway", "payments-a"),
        )


class TestTheServersDownForAMinute:
    @pytest.mark.timeout(DRILL_TIMEOUT + OUTAGE_SECONDS)
    async def test_rabbitmq_down_for_a_minute_under_load_loses_nothing(
        self, drill_system: DrillSystem, load: Load
    ):
        rabbitmq = drill_system.rabbitmq
        recorder = await Recorder.start(drill_system)

        async def stop() -> None:
            await recorder.close()
            await rabbitmq.stop_app()

        async def start_and_deliver_again() -> None:
            await rabbitmq.start_app()
            await drill_system.wait_ready()
            # A restart is when at-least-once delivery shows: deliveries whose ack was lost and
            # publishes whose confirm was come again. Here every event of before the stop does.
            await deliver_again(drill_system, recorder.seen)

        try:
            outage = await under_load(
                drill_system,
                load,
                "RabbitMQ down for a minute",
                stop,
                start_and_deliver_again,
                during=int(OUTAGE_SECONDS * RATE_PER_SECOND),
            )
        finally:
            await recorder.close()
        # Bookings go on without the broker (they wait in the outboxes): whatever was refused
        # was told when to come back.
        outage.assert_told_to_retry()

    @pytest.mark.timeout(DRILL_TIMEOUT + OUTAGE_SECONDS)
    async def test_postgres_down_for_a_minute_under_load_loses_nothing(
        self, drill_system: DrillSystem, load: Load
    ):
        postgres = drill_system.postgres
        recorder = await Recorder.start(drill_system)

        async def stop_and_deliver_again() -> None:
            await recorder.close()
            await postgres.stop()
            # Messages that arrive while the database is away (here: every event of the drill
            # so far, again) cannot be handled: the consumers pause, with every retry left.
            await deliver_again(drill_system, recorder.seen)

        try:
            outage = await under_load(
                drill_system,
                load,
                "Postgres down for a minute",
                stop_and_deliver_again,
                postgres.start,
                during=int(OUTAGE_SECONDS * RATE_PER_SECOND),
            )
        finally:
            await recorder.close()
        assert any(r.status == 503 for r in outage.refusals), "no request met the outage"
        outage.assert_told_to_retry()


class TestProvidersFailing:
    @pytest.mark.timeout(DRILL_TIMEOUT)
    async def test_provider_faults_within_the_retries_change_no_outcome(
        self, drill_system: DrillSystem, load: Load
    ):
        async def fail_a_few_calls() -> None:
            for endpoint in ("init", "get"):
                await add_fault(drill_system.konnect, ABSORBED_FAULTS["konnect"], endpoint)
            await add_fault(drill_system.google, ABSORBED_FAULTS["google"], "insert")

        async def faults_met() -> None:
            # The load meets every fault: each is a 503 that some call was retried after.
            async def used_up() -> bool:
                sandboxes = (drill_system.konnect, drill_system.google)
                return not any([await faults_left(sandbox) for sandbox in sandboxes])

            try:
                await eventually(used_up, timeout=60, interval=0.1, what="every fault met")
            finally:
                await clear_faults(drill_system)

        await under_load(
            drill_system, load, "faults within each call's retries", fail_a_few_calls, faults_met
        )

    @pytest.mark.timeout(DRILL_TIMEOUT)
    async def test_providers_down_beyond_the_retries_end_bookings_in_defined_outcomes(
        self, drill_system: DrillSystem, load: Load
    ):
        outage = 100_000  # faults: every call, until the outage is cleared

        async def google_then_konnect_down() -> None:
            # Google refuses every insert until a scheduling attempt has failed for it ...
            await add_fault(drill_system.google, outage, "insert")
            try:
                await eventually(
                    lambda: failed_for(drill_system, "calendar_api_error"),
                    timeout=60,
                    interval=0.1,
                    what="a scheduling attempt failed for Google's outage",
                )
            finally:
                await clear_faults(drill_system)
            # ... then Konnect refuses every call (webhooks and reconciliation cannot ask it
            # either) until an order was cancelled for it.
            for endpoint in ("init", "get"):
                await add_fault(drill_system.konnect, outage, endpoint)

        async def konnect_back() -> None:
            try:
                await eventually(
                    lambda: failed_for(drill_system, "initiation_failed"),
                    timeout=60,
                    interval=0.1,
                    what="an order cancelled for Konnect's outage",
                )
            finally:
                await clear_faults(drill_system)

        def defined_outcomes(booking: Booking) -> set[str]:
            return {CONFIRMED, UNPAID} if booking.mentor.connected else {CALENDAR_WAITING, UNPAID}

        result = await under_load(
            drill_system,
            load,
            "the providers' outage",
            google_then_konnect_down,
            konnect_back,
            defined_outcomes,
        )
        assert result.outcomes.get(UNPAID), result.outcomes
        # Google's outage failed attempts, and the retry schedule outlasted it: every booking
        # that met it was confirmed in the end, and none was abandoned.
        met = await orders_that_met(drill_system, "calendar_api_error")
        assert met, "no booking met Google's outage"
        async with drill_system.database() as db:
            rows = await db.fetch(BOOKING_STATE + " WHERE o.id::text = ANY($1)", list(met))
        assert {r["id"]: outcome_of(r) for r in rows} == dict.fromkeys(met, CONFIRMED)


class TestAConsumerThatStartsLate:
    @pytest.mark.timeout(DRILL_TIMEOUT)
    async def test_events_published_before_the_calendar_service_is_up_reach_it(
        self, drill_system: DrillSystem, load: Load
    ):
        """As on a first deployment where calendar starts after orders and nothing declared its
        queue's bindings: its events are unroutable until it starts."""
        calendars = [drill_system.processes[n] for n in ("calendar-a", "calendar-b")]
        late_mentor: dict[str, str] = {}

        async def calendar_not_there_yet() -> None:
            await asyncio.gather(*(c.stop() for c in calendars))
            await unbind_calendar(drill_system)
            # A mentor registered now: the calendar service must learn of them all the same.
            admin = drill_system.token("admin", "drill-admin")
            created = await drill_system.http.post(
                f"{drill_system.gateway}/api/mentors",
                json={"name": "Late", "email": "late@example.com", "timezone": "Africa/Tunis"},
                headers=admin,
            )
            assert created.status_code == 201, created.text
            late_mentor["id"] = created.json()["id"]

        async def calendar_starts() -> None:
            # The admins were told while the events waited.
            for event_type in ("MentorRegistered", "OrderPaid"):
                await eventually(
                    functools.partial(unroutable_alerts, drill_system, event_type),
                    timeout=60,
                    what=f"the unroutable {event_type} alert",
                )
            for calendar in calendars:
                calendar.start()

        started = time.time()
        await under_load(
            drill_system, load, "calendar starting late", calendar_not_there_yet, calendar_starts
        )
        # Once per event type and hour, however many events waited and however often they
        # were tried: one notification, counted once (twice if the drill crossed the hour).
        hours = len({int(started // 3600), int(time.time() // 3600)})
        for event_type in ("MentorRegistered", "OrderPaid"):
            [alert] = await unroutable_alerts(drill_system, event_type)
            assert 1 <= alert["occurrences"] <= hours, (event_type, alert)
        answer = await drill_system.http.get(
            f"{drill_system.gateway}/api/mentors/{late_mentor['id']}/calendar",
            headers=drill_system.token("admin", "drill-admin"),
        )
        assert answer.status_code == 200, answer.text  # known to calendar: not a 404
        assert answer.json()["connected"] is False


async def unbind_calendar(system: DrillSystem) -> None:
    """Remove the calendar queue's bindings, so what is published for it is unroutable (its
    queue itself stays: deleting it would drop what it already holds)."""
    connection = await aio_pika.connect(system.rabbitmq.url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("calendar", passive=True)
        exchange = DRILL_SETTINGS["EVENTS_EXCHANGE"]
        for event in (MentorRegistered, OrderPaid, OrderCancelled):
            await queue.unbind(exchange, event.binding_key())


async def unroutable_alerts(system: DrillSystem, event_type: str) -> list[dict[str, Any]]:
    async with system.database() as db:
        rows = await db.fetch(
            "SELECT id, occurrences FROM notifications.admin_notifications"
            " WHERE metadata ->> 'reason' = 'unroutable' AND metadata ->> 'message_type' = $1",
            event_type,
        )
    return [dict(r) for r in rows]


async def orders_that_met(system: DrillSystem, reason: str) -> set[str]:
    """Orders one of whose scheduling attempts failed for `reason`."""
    async with system.database() as db:
        rows = await db.fetch(
            "SELECT DISTINCT body::jsonb -> 'payload' ->> 'order_id' AS order_id"
            " FROM calendar.outbox WHERE event_type = 'CalendarBookingFailed'"
            " AND body::jsonb -> 'payload' ->> 'reason' = $1",
            reason,
        )
    return {r["order_id"] for r in rows}


class Recorder:
    """Keeps every event published on the private broker from `start` until `close`."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection) -> None:
        self.connection = connection
        self.seen: list[AbstractIncomingMessage] = []

    @classmethod
    async def start(cls, system: DrillSystem) -> Recorder:
        recorder = cls(await aio_pika.connect(system.rabbitmq.url, timeout=10))
        channel = await recorder.connection.channel()
        exchange = await channel.get_exchange(DRILL_SETTINGS["EVENTS_EXCHANGE"])
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, "#")

        async def keep(message: AbstractIncomingMessage) -> None:
            recorder.seen.append(message)

        await queue.consume(keep, no_ack=True)
        return recorder

    async def close(self) -> None:
        if not self.connection.is_closed:
            await self.connection.close()


async def deliver_again(system: DrillSystem, messages: list[AbstractIncomingMessage]) -> None:
    """Publish each message once more, as it was (same message id, routing key and body)."""
    assert messages, "nothing was published before the restart"
    connection = await aio_pika.connect(system.rabbitmq.url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(DRILL_SETTINGS["EVENTS_EXCHANGE"])
        for message in messages:
            await exchange.publish(
                aio_pika.Message(
                    body=message.body,
                    content_type=message.content_type,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=message.message_id,
                    correlation_id=message.correlation_id,
                    type=message.type,
                    headers=dict(message.headers or {}),
                ),
                routing_key=message.routing_key or "",
            )


async def add_fault(sandbox: str, count: int, endpoint: str) -> None:
    async with httpx.AsyncClient(timeout=10, trust_env=False, auth=ControlAuth()) as http:
        fault = {"kind": "http_503", "count": count, "endpoint": endpoint}
        added = await http.post(f"{sandbox}/_sandbox/faults", json=fault)
        assert added.status_code == 200, added.text


async def faults_left(sandbox: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=10, trust_env=False, auth=ControlAuth()) as http:
        return (await http.get(f"{sandbox}/_sandbox/faults")).json()["faults"]


async def failed_for(system: DrillSystem, reason: str) -> bool:
    async with system.database() as db:
        if reason == "initiation_failed":
            query = "SELECT count(*) FROM payments.payments WHERE status = 'initiation_failed'"
            return bool(await db.fetchval(query))
    return bool(await orders_that_met(system, reason))


async def clear_faults(system: DrillSystem) -> None:
    for url in (system.konnect, system.google):
        cleared = await system.http.delete(f"{url}/_sandbox/faults")
        assert cleared.status_code == 200, cleared.text
