"""`make run`: the whole system comes up on one command, and Ctrl-C takes all of it down.

These run the real `make run` (install, migrations, every service and sandbox as processes)
against a fresh database, a fresh RabbitMQ vhost and free ports, and poll with deadlines.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import httpx
import pytest

from booking.devtools.infra import listening as port_open
from booking.devtools.infra import postgres_bindir, rabbitmq_scripts

ROOT = Path(__file__).resolve().parents[2]
HEALTH_JSON = "application/health+json"
# (name in make run's output, port variable, readiness path)
PROCESSES = (
    ("gateway", "GATEWAY_PORT", "/health/ready"),
    ("orders", "ORDERS_PORT", "/health/ready"),
    ("payments", "PAYMENTS_PORT", "/health/ready"),
    ("calendar", "CALENDAR_PORT", "/health/ready"),
    ("notifications", "NOTIFICATIONS_PORT", "/health/ready"),
    ("sandbox-konnect", "SANDBOX_KONNECT_PORT", "/health/live"),
    ("sandbox-google", "SANDBOX_GOOGLE_PORT", "/health/live"),
)
# make install + four migrations + seven processes starting at once, on a slow machine.
READY_DEADLINE_SECONDS = 180
STOP_DEADLINE_SECONDS = 30

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed"),
]


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) for every process we can see."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        table[int(entry)] = (int(ppid), state)
    return table


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def descendants(pid: int) -> dict[int, str]:
    """Every live process below `pid`, with its command line."""
    children: dict[int, list[int]] = defaultdict(list)
    for child, (parent, _) in _process_table().items():
        children[parent].append(child)
    found, todo = {}, list(children[pid])
    while todo:
        current = todo.pop()
        found[current] = cmdline(current)
        todo.extend(children[current])
    return found


def still_running(processes: dict[int, str]) -> dict[int, str]:
    """Those of `processes` (pid -> command line) that still run (not zombies, not reused pids)."""
    table = _process_table()
    return {
        pid: command
        for pid, command in processes.items()
        if pid in table and table[pid][1] != "Z" and cmdline(pid) == command
    }


def kill_all(processes: Iterable[int]) -> None:
    """SIGKILL each process and its group: the cleanup of a test that failed half-way."""
    for pid in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def start_make_run(env: dict[str, str], log: Path) -> subprocess.Popen:
    """`make run` in its own process group, as a terminal would run it; output to `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            ["make", "run"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_until_ready(
    process: subprocess.Popen, urls: dict[str, str], log: Path
) -> dict[str, httpx.Response]:
    """Poll every URL until it answers 200, failing early if `make run` exits first."""
    answers: dict[str, httpx.Response] = {}
    last_seen: dict[str, str] = {}
    deadline = time.monotonic() + READY_DEADLINE_SECONDS
    with httpx.Client(timeout=2.0, trust_env=False) as http:
        while len(answers) < len(urls):
            if process.poll() is not None:
                pytest.fail(f"make run exited ({process.returncode}) before ready:\n{tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"not ready in {READY_DEADLINE_SECONDS}s: {last_seen}\n{tail(log)}")
            for name, url in urls.items():
                if name in answers:
                    continue
                try:
                    response = http.get(url)
                except httpx.HTTPError as exc:
                    last_seen[name] = type(exc).__name__
                    continue
                last_seen[name] = str(response.status_code)
                if response.status_code == 200:
                    answers[name] = response
            time.sleep(0.2)
    return answers


def wait_for_line(process: subprocess.Popen, log: Path, pattern: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not re.search(pattern, log.read_text(errors="replace"), re.MULTILINE):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"make run never printed /{pattern}/:\n{tail(log)}")
        time.sleep(0.1)


class TestMakeRun:
    @pytest.mark.timeout(READY_DEADLINE_SECONDS + STOP_DEADLINE_SECONDS + 60)
    def test_every_service_gets_ready_and_ctrl_c_stops_them_all(
        self, system_env: dict[str, str], tmp_path: Path
    ):
        log = tmp_path / "make-run.log"
        urls = {
            name: f"http://127.0.0.1:{system_env[variable]}{path}"
            for name, variable, path in PROCESSES
        }
        process = start_make_run(system_env, log)
        tree: dict[int, str] = {}
        try:
            answers = wait_until_ready(process, urls, log)
            for name, response in answers.items():
                assert response.headers["content-type"] == HEALTH_JSON, name
                assert response.json()["status"] == "pass", (name, response.json())
            # The supervisor's table lists each process as ready once all are.
            wait_for_line(process, log, r"^devrun +\| all 7 processes are ready", 10)
            output = log.read_text()
            for name, url in urls.items():
                base = url.rsplit("/health", 1)[0]
                assert re.search(
                    rf"^devrun +\| {re.escape(name)} +{re.escape(base)} +ready",
                    output,
                    re.MULTILINE,
                ), name

            tree = descendants(process.pid)
            serving = [c for c in tree.values() if c.endswith(" serve")]
            assert len(serving) == len(PROCESSES), tree

            started = time.monotonic()
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal
            process.wait(timeout=STOP_DEADLINE_SECONDS)
            stopped_in = time.monotonic() - started
            # make re-raises the SIGINT it got once its child has exited.
            assert process.returncode in (0, -signal.SIGINT), tail(log)
            assert re.search(r"^devrun +\| stopped$", log.read_text(), re.MULTILINE), tail(log)
            assert still_running(tree) == {}, f"left running after {stopped_in:.1f}s"
            for url in urls.values():
                with pytest.raises(httpx.ConnectError):
                    httpx.get(url, timeout=2.0, trust_env=False)
        finally:
            if process.poll() is None:
                tree.update(descendants(process.pid))
                kill_all([process.pid])
                process.wait(timeout=10)
            kill_all(still_running(tree))

    @pytest.mark.timeout(120)
    def test_without_postgres_it_says_so_and_how_to_start_it(
        self, tmp_path: Path, free_ports: Callable[[int], list[int]]
    ):
        log = tmp_path / "make-run.log"
        (closed_port,) = free_ports(1)
        env = dict(os.environ, DATABASE_URL=f"postgresql://postgres@127.0.0.1:{closed_port}/x")
        process = start_make_run(env, log)
        try:
            process.wait(timeout=90)
        finally:
            if process.poll() is None:
                kill_all([process.pid])
        output = log.read_text()
        assert process.returncode != 0, output
        assert (
            f"Postgres is not reachable at postgresql://postgres@127.0.0.1:{closed_port}/x"
            in output
        )
        assert "point DATABASE_URL at a running Postgres, or unset DATABASE_URL" in output
        assert "Traceback" not in output
        # An explicit URL is never replaced by a server of make run's own.
        assert "private Postgres" not in output
        assert not re.search(r"^devrun +\| started ", output, re.MULTILINE)

    @pytest.mark.skipif(
        postgres_bindir() is None or rabbitmq_scripts() is None,
        reason="needs the Postgres and RabbitMQ server programs",
    )
    @pytest.mark.timeout(READY_DEADLINE_SECONDS + STOP_DEADLINE_SECONDS + 120)
    def test_with_nothing_answering_it_brings_its_own_postgres_and_rabbitmq(
        self, tmp_path: Path, free_ports: Callable[[int], list[int]]
    ):
        log = tmp_path / "make-run.log"
        # Postgres runs as the postgres user when we are root: a folder it can reach (pytest's
        # own are closed to other users).
        infra_dir = Path(tempfile.mkdtemp(prefix="make-run-infra-"))
        infra_dir.chmod(0o755)
        closed, postgres_port, rabbitmq_port, dist_port, *ports = free_ports(4 + len(PROCESSES))
        env = {k: v for k, v in os.environ.items() if not k.endswith("_URL")}
        env.update(
            # Where it looks for running servers: nothing answers there.
            INFRA_PROBE_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{closed}/postgres",
            INFRA_PROBE_RABBITMQ_URL=f"amqp://guest:guest@127.0.0.1:{closed}/",
            INFRA_DIR=str(infra_dir),
            INFRA_POSTGRES_PORT=str(postgres_port),
            INFRA_RABBITMQ_PORT=str(rabbitmq_port),
            INFRA_RABBITMQ_DIST_PORT=str(dist_port),
            NO_COLOR="1",
        )
        env.update(zip((v for _, v, _ in PROCESSES), map(str, ports), strict=True))
        urls = {
            name: f"http://127.0.0.1:{env[variable]}{path}" for name, variable, path in PROCESSES
        }
        process = start_make_run(env, log)
        tree: dict[int, str] = {}
        try:
            wait_until_ready(process, urls, log)
            output = log.read_text()
            assert f"Postgres is up at postgresql://postgres@127.0.0.1:{postgres_port}/" in output
            assert f"RabbitMQ is up at amqp://guest@127.0.0.1:{rabbitmq_port}/" in output
            assert (infra_dir / "postgres" / "data" / "PG_VERSION").exists()
            tree = descendants(process.pid)
            os.killpg(process.pid, signal.SIGINT)
            process.wait(timeout=STOP_DEADLINE_SECONDS + 30)
            assert re.search(r"^devrun +\| stopping the private Postgres$", log.read_text(), re.M)
            # Both servers stop with it; their data stays for the next run.
            assert not port_open(postgres_port), tail(log)
            assert not port_open(rabbitmq_port), tail(log)
            assert (infra_dir / "postgres" / "data" / "PG_VERSION").exists()
        finally:
            if process.poll() is None:
                tree.update(descendants(process.pid))
                kill_all([process.pid])
                process.wait(timeout=10)
            kill_all(still_running(tree))
            subprocess.run(
                [sys.executable, "-m", "booking.devtools.infra", "clean"],
                env=env,
                cwd=ROOT,
                check=False,
                capture_output=True,
            )
            shutil.rmtree(infra_dir, ignore_errors=True)
