"""Postgres and RabbitMQ for a local run, when none answers: our own, under the project folder.

`make run` and `make test` use the servers at DATABASE_URL and RABBITMQ_URL. When one of those is
unset and nothing answers where it is looked for (INFRA_PROBE_*_URL, the usual local addresses),
`provide` brings that server itself, in this order of preference:

1. a private instance of the installed server binaries, its data under INFRA_DIR (kept across
   runs; `make clean-infra` removes it), on ports of its own;
2. `docker compose --profile infra`, which publishes both on localhost, when a Docker daemon
   answers (a Docker client alone does not count);
3. otherwise one message naming what to install, for Debian/Ubuntu, Fedora and macOS.

An explicit URL is never replaced: if it does not answer, the caller says so.

The fault drills start their own throwaway instances with the same classes (`PrivatePostgres`,
`PrivateRabbitMQ`), so that stopping them never touches a shared server.

    python -m booking.devtools.infra run -- <command ...>   # `make test`
    python -m booking.devtools.infra check-tools            # what `make test` needs, up front
    python -m booking.devtools.infra clean                  # `make clean-infra`
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from pydantic_settings import BaseSettings, SettingsConfigDict

from booking.runtime.settings import DEFAULT_DATABASE_URL, DEFAULT_RABBITMQ_URL

PROJECT_ROOT = Path(__file__).resolve().parents[5]
COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"
SERVER_SECONDS = 90  # a server starting or stopping
PROBE_SECONDS = 3.0
EPMD_PORT = 4369

INSTALL_HINTS = """\
  Debian/Ubuntu:  sudo apt-get install postgresql rabbitmq-server
  Fedora:         sudo dnf install postgresql-server rabbitmq-server
  macOS:          brew install postgresql@15 rabbitmq
  (or start Docker: make run then uses `docker compose --profile infra`)"""


class InfraSettings(BaseSettings):
    """Where `make run` and `make test` look for servers, and where they keep their own."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    # Where to look for a running server when DATABASE_URL (RABBITMQ_URL) is unset.
    infra_probe_database_url: str = DEFAULT_DATABASE_URL
    infra_probe_rabbitmq_url: str = DEFAULT_RABBITMQ_URL
    # Where the servers `make run` starts itself keep their data (kept across runs; `make
    # clean-infra` removes it), and their ports: apart from the usual ones, so they never clash.
    infra_dir: Path = PROJECT_ROOT / ".infra"
    infra_postgres_port: int = 55432
    infra_rabbitmq_port: int = 55672
    infra_rabbitmq_dist_port: int = 55673

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> InfraSettings:
        """Read from `env` (the environment a run passes on, an .env file's lines included)."""
        given = {name: env[name.upper()] for name in cls.model_fields if name.upper() in env}
        return cls.model_validate(given)


class InfraError(Exception):
    """A server could not be provided; the message says why and what to do."""


async def run_command(
    argv: list[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> tuple[int, str]:
    """Run a command to its end without blocking the loop: its exit code and output."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # a terminal's Ctrl-C reaches the caller, which stops us in order
    )
    try:
        async with asyncio.timeout(SERVER_SECONDS):
            output, _ = await process.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        raise InfraError(f"{' '.join(argv)} did not finish within {SERVER_SECONDS}s") from None
    return process.returncode or 0, output.decode(errors="replace")


def listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def redacted(url: str) -> str:
    """`url` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return SplitResult(parts.scheme, netloc, parts.path, parts.query, parts.fragment).geturl()


async def answers(url: str, default_port: int) -> bool:
    """Something accepts TCP connections where `url` points."""
    parts = urlsplit(url)
    try:
        async with asyncio.timeout(PROBE_SECONDS):
            _, writer = await asyncio.open_connection(
                parts.hostname or "127.0.0.1", parts.port or default_port
            )
    except (TimeoutError, OSError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


# --- the server binaries ----------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl are: Debian keeps them off the PATH, by major version."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl", path=str(Path(initdb).parent)):
        return Path(initdb).parent
    return None


def rabbitmq_scripts() -> Path | None:
    """Where rabbitmq-server and rabbitmqctl are as scripts that run the node as we are.

    Debian's and Fedora's /usr/sbin wrappers switch to the rabbitmq user and its home (hence its
    Erlang cookie); the scripts they wrap run as the caller. Homebrew's are those scripts.
    """
    for candidate in (Path("/usr/lib/rabbitmq/bin"), Path("/usr/local/lib/rabbitmq/bin")):
        if (candidate / "rabbitmq-server").exists():
            return candidate
    server = shutil.which("rabbitmq-server")
    if server and Path(server).parent != Path("/usr/sbin"):
        return Path(server).parent
    return None


def as_postgres() -> list[str]:
    """The prefix that runs a command as the postgres user (Postgres refuses to run as root)."""
    # runuser is in /usr/sbin, which a PATH need not hold.
    runuser = shutil.which("runuser", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if runuser is None:
        raise InfraError("as root, Postgres must run as the postgres user: that needs runuser")
    return [runuser, "-u", "postgres", "--"]


@dataclass
class PrivatePostgres:
    """A Postgres cluster of our own, in `base`, on `port`, trusting local connections.

    As root it runs as the `postgres` OS user (Postgres refuses root), in a directory it owns.
    """

    bindir: Path
    port: int
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="private-pg-")))
    # Only a crash of the machine could lose what fsync protects: off for throwaway clusters.
    fsync: bool = True

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def data(self) -> Path:
        return self.base / "data"

    async def _run(self, program: str, *args: str) -> str:
        argv = [str(self.bindir / program), *args]
        if os.geteuid() == 0:
            argv = [*as_postgres(), *argv]
        code, output = await run_command(argv)
        if code != 0:
            raise InfraError(f"{program} {args[-1]} failed:\n{output}\n{self.log_tail()}")
        return output

    async def create(self) -> None:
        """Create the cluster unless it exists, then start it."""
        self.base.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            import pwd  # Unix only, as is everything here

            owner = pwd.getpwnam("postgres")
            os.chown(self.base, owner.pw_uid, owner.pw_gid)
            code, _ = await run_command([*as_postgres(), "test", "-w", str(self.base)])
            if code != 0:
                raise InfraError(
                    f"Postgres runs as the postgres user, which cannot reach {self.base} (a folder"
                    " above it is closed to other users): set INFRA_DIR to a folder it can reach,"
                    " e.g. /var/tmp/booking-infra"
                )
        if not (self.data / "PG_VERSION").exists():
            await self._run(
                "initdb", "-A", "trust", "-U", "postgres", "--no-sync", "-D", str(self.data)
            )
        await self.start()

    async def running(self) -> bool:
        argv = [str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"]
        if os.geteuid() == 0:
            argv = [*as_postgres(), *argv]
        code, _ = await run_command(argv)
        return code == 0

    async def start(self) -> None:
        options = [
            f"-p {self.port}",
            f"-k {self.base}",
            "-c listen_addresses=127.0.0.1",
            "-c max_connections=300",
            f"-c fsync={'on' if self.fsync else 'off'}",
        ]
        await self._run(
            "pg_ctl",
            *("-D", str(self.data), "-l", str(self.base / "server.log")),
            *("-o", " ".join(options), "-w", "-t", str(SERVER_SECONDS - 10), "start"),
        )

    async def stop(self) -> None:
        """A fast shutdown: open sessions are cut off, as in an outage."""
        await self._run(
            "pg_ctl",
            *("-D", str(self.data), "-m", "fast"),
            *("-w", "-t", str(SERVER_SECONDS - 10), "stop"),
        )

    def log_tail(self, lines: int = 30) -> str:
        path = self.base / "server.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    async def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(InfraError):
                await self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@dataclass
class PrivateRabbitMQ:
    """A RabbitMQ node of our own (its own name, ports, data, logs and Erlang cookie), in `base`.

    The node runs the installed scripts directly: everything it reads and writes is in `base`,
    and its config names its own listener, so the machine's /etc/rabbitmq (whose listener is
    the shared node's 5672) is never read. Its data outlives a stop when its name stays.
    """

    scripts: Path
    port: int
    dist_port: int
    node: str = field(default_factory=lambda: f"private-{uuid.uuid4().hex[:8]}@localhost")
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="private-rabbitmq-")))
    process: subprocess.Popen[bytes] | None = None
    started_epmd: bool = False

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def env(self) -> dict[str, str]:
        base = self.base
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(base),  # where the Erlang cookie is, for the node and for rabbitmqctl
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_CRASH_DUMP": str(base / "erl_crash.dump"),
        }

    async def start(self) -> None:
        base = self.base
        base.mkdir(parents=True, exist_ok=True)
        cookie = base / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(20).upper())
            cookie.chmod(0o400)
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (base / "rabbitmq-env.conf").write_text("")
        (base / "enabled_plugins").write_text("[].\n")
        self.started_epmd = not listening(EPMD_PORT)
        process = self._spawn()
        async with asyncio.timeout(SERVER_SECONDS):
            while True:
                if process.poll() is not None:
                    raise InfraError(
                        f"the private RabbitMQ exited ({process.returncode}):\n{self.log_tail()}"
                    )
                # await_startup fails at once while the node has not yet registered its name.
                code, _ = await self.ctl("--timeout", "30", "await_startup")
                if code == 0:
                    return
                await asyncio.sleep(0.5)

    def _spawn(self) -> subprocess.Popen[bytes]:
        with (self.base / "server.out").open("wb") as out:
            self.process = subprocess.Popen(
                [str(self.scripts / "rabbitmq-server")],
                cwd=self.base,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.process

    async def ctl(self, *args: str) -> tuple[int, str]:
        return await run_command(
            [str(self.scripts / "rabbitmqctl"), "-n", self.node, *args], env=self.env, cwd=self.base
        )

    async def stop_app(self) -> None:
        code, output = await self.ctl("stop_app")
        if code != 0:
            raise InfraError(f"rabbitmqctl stop_app failed:\n{output}")

    async def start_app(self) -> None:
        code, output = await self.ctl("start_app")
        if code != 0:
            raise InfraError(f"rabbitmqctl start_app failed:\n{output}")

    def log_tail(self, lines: int = 30) -> str:
        path = self.base / "server.out"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    async def stop(self) -> None:
        """Stop the node (ours, or one a killed run left running); its data stays in `base`."""
        process = self.process
        if process is None:
            if listening(self.port):
                await self.ctl("stop")
        elif process.poll() is None:
            await self.ctl("stop")
            try:
                await asyncio.to_thread(process.wait, 30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await asyncio.to_thread(process.wait, 10)
        if self.started_epmd and shutil.which("epmd"):
            # We started the port mapper with our node: stop it again (it refuses while any
            # other node is registered with it).
            await run_command(["epmd", "-kill"])

    async def destroy(self) -> None:
        await self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


# --- providing what a run needs ----------------------------------------------------------------


async def docker_answers() -> bool:
    """A Docker daemon answers (`docker info`), not merely a client installed."""
    if not shutil.which("docker"):
        return False
    try:
        code, _ = await run_command(["docker", "info"])
    except InfraError:
        return False
    return code == 0


def compose_argv(*args: str) -> list[str]:
    # A project of its own: `down --volumes` ignores profiles, and in the system's project
    # (`booking`) it would remove the data of a `docker compose up` system too.
    return [
        "docker",
        "compose",
        "-f",
        str(COMPOSE_FILE),
        "-p",
        "booking-infra",
        "--profile",
        "infra",
        *args,
    ]


def compose_environment(settings: InfraSettings) -> dict[str, str]:
    """The ports the infra profile publishes (docker-compose.yml reads them)."""
    return {
        **os.environ,
        "INFRA_POSTGRES_PORT": str(settings.infra_postgres_port),
        "INFRA_RABBITMQ_PORT": str(settings.infra_rabbitmq_port),
    }


@dataclass
class Provided:
    """What `provide` settled on: the URLs to use, and what it started (to stop again)."""

    urls: dict[str, str] = field(default_factory=dict)
    postgres: PrivatePostgres | None = None
    rabbitmq: PrivateRabbitMQ | None = None
    compose_services: list[str] = field(default_factory=list)


async def _start_private(
    settings: InfraSettings, missing: set[str], provided: Provided, say: Callable[[str], None]
) -> None:
    bindir, scripts = postgres_bindir(), rabbitmq_scripts()
    if "DATABASE_URL" in missing:
        assert bindir is not None
        base = settings.infra_dir / "postgres"
        say(f"starting a private Postgres in {base} on port {settings.infra_postgres_port}")
        postgres = PrivatePostgres(bindir, settings.infra_postgres_port, base)
        if (postgres.data / "PG_VERSION").exists() and await postgres.running():
            say("  (it was still running: a run before this one was killed)")
        else:
            await postgres.create()
        provided.postgres = postgres  # started: ours to stop
        provided.urls["DATABASE_URL"] = postgres.url
    if "RABBITMQ_URL" in missing:
        assert scripts is not None
        port = settings.infra_rabbitmq_port
        rabbitmq = PrivateRabbitMQ(
            scripts,
            port,
            settings.infra_rabbitmq_dist_port,
            node=f"booking-{port}@localhost",  # the same name each run: its data is found again
            base=settings.infra_dir / "rabbitmq",
        )
        say(f"starting a private RabbitMQ in {rabbitmq.base} on port {port}")
        if listening(port):
            say("  (it was still running: a run before this one was killed)")
        else:
            await rabbitmq.start()
        provided.rabbitmq = rabbitmq  # started: ours to stop
        provided.urls["RABBITMQ_URL"] = rabbitmq.url


async def _start_compose(
    settings: InfraSettings, missing: set[str], provided: Provided, say: Callable[[str], None]
) -> None:
    services = {"DATABASE_URL": "infra-postgres", "RABBITMQ_URL": "infra-rabbitmq"}
    wanted = [services[name] for name in sorted(missing)]
    say(f"starting {', '.join(wanted)} with docker compose --profile infra")
    code, output = await run_command(
        compose_argv("up", "--detach", "--wait", *wanted), env=compose_environment(settings)
    )
    if code != 0:
        raise InfraError(f"docker compose could not start {', '.join(wanted)}:\n{output}")
    provided.compose_services = wanted
    if "DATABASE_URL" in missing:
        port = settings.infra_postgres_port
        provided.urls["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    if "RABBITMQ_URL" in missing:
        # Not guest: RabbitMQ lets guest in from loopback only, and Docker's port is not that.
        port = settings.infra_rabbitmq_port
        provided.urls["RABBITMQ_URL"] = f"amqp://booking:booking@127.0.0.1:{port}/"


async def stop(provided: Provided, say: Callable[[str], None]) -> None:
    """Stop what `start` started; the data stays."""
    if provided.compose_services:
        say(f"stopping {', '.join(provided.compose_services)}")
        await run_command(compose_argv("stop", *provided.compose_services), env=os.environ)
    tasks = []
    if provided.rabbitmq is not None:
        say("stopping the private RabbitMQ")
        tasks.append(provided.rabbitmq.stop())
    if provided.postgres is not None:
        say("stopping the private Postgres")
        tasks.append(provided.postgres.stop())
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(result, Exception):
            say(f"  {result}")


async def start(env: Mapping[str, str], say: Callable[[str], None]) -> Provided:
    """Settle where Postgres and RabbitMQ are, starting our own where none answers.

    Only a server whose URL is unset is looked for and provided; the URLs it settles on are in
    the result, to be passed on as DATABASE_URL and RABBITMQ_URL.
    """
    settings = InfraSettings.from_environment(env)
    probes = {
        "DATABASE_URL": (settings.infra_probe_database_url, 5432),
        "RABBITMQ_URL": (settings.infra_probe_rabbitmq_url, 5672),
    }
    provided = Provided()
    missing = set()
    for name, (probe, port) in probes.items():
        if env.get(name):
            continue
        if await answers(probe, port):
            provided.urls[name] = probe
        else:
            missing.add(name)
    if not missing:
        return provided
    binaries = {"DATABASE_URL": postgres_bindir(), "RABBITMQ_URL": rabbitmq_scripts()}
    try:
        if all(binaries[name] is not None for name in missing):
            await _start_private(settings, missing, provided, say)
        elif await docker_answers():
            await _start_compose(settings, missing, provided, say)
        else:
            names = {"DATABASE_URL": "Postgres", "RABBITMQ_URL": "RabbitMQ"}
            lacking = " and ".join(names[name] for name in sorted(missing))
            where = ", ".join(redacted_probe(probes[name][0]) for name in sorted(missing))
            raise InfraError(
                f"{lacking}: nothing answers at {where}, and neither their server programs nor"
                f" a Docker daemon are here to start one. Install the servers:\n{INSTALL_HINTS}\n"
                "or point DATABASE_URL and RABBITMQ_URL at running servers."
            )
    except BaseException:
        await stop(provided, say)
        raise
    return provided


def redacted_probe(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


@contextlib.asynccontextmanager
async def provide(env: Mapping[str, str], say: Callable[[str], None]) -> AsyncIterator[Provided]:
    """`start`, then `stop` on the way out."""
    provided = await start(env, say)
    try:
        yield provided
    finally:
        await asyncio.shield(stop(provided, say))


# --- the command line --------------------------------------------------------------------------


def missing_tools() -> list[str]:
    """What `make test` needs that this machine lacks, each with how to get it."""
    missing = []
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        missing.append(
            "Chromium (the dashboard's and the return page's browser tests):\n"
            "  Debian/Ubuntu: sudo apt-get install chromium   Fedora: sudo dnf install chromium"
            "   macOS: brew install --cask chromium"
        )
    if postgres_bindir() is None:
        missing.append(
            "Postgres' server programs, initdb and pg_ctl (the fault drills' private cluster):\n"
            "  Debian/Ubuntu: sudo apt-get install postgresql   Fedora: sudo dnf install"
            " postgresql-server   macOS: brew install postgresql@15"
        )
    if rabbitmq_scripts() is None:
        missing.append(
            "RabbitMQ's server (the fault drills' private node):\n"
            "  Debian/Ubuntu: sudo apt-get install rabbitmq-server   Fedora: sudo dnf install"
            " rabbitmq-server   macOS: brew install rabbitmq"
        )
    return missing


async def clean(settings: InfraSettings) -> None:
    """Stop whatever of ours still runs, then remove its data (`make clean-infra`)."""
    bindir, scripts = postgres_bindir(), rabbitmq_scripts()
    base = settings.infra_dir
    if bindir is not None and (base / "postgres" / "data").exists():
        postgres = PrivatePostgres(bindir, settings.infra_postgres_port, base / "postgres")
        if await postgres.running():
            await postgres.stop()
    if scripts is not None and (base / "rabbitmq").exists():
        port = settings.infra_rabbitmq_port
        node = f"booking-{port}@localhost"
        await PrivateRabbitMQ(scripts, port, 0, node=node, base=base / "rabbitmq").stop()
    if await docker_answers():
        await run_command(compose_argv("down", "--volumes"), env=compose_environment(settings))
        _say("removed the infra profile's containers and volumes")
    shutil.rmtree(base, ignore_errors=True)
    _say(f"removed {base}")


def _say(text: str) -> None:
    print(f"infra | {text}", flush=True)


async def _run(command: list[str]) -> int:
    env = dict(os.environ)
    try:
        async with provide(env, _say) as provided:
            env.update(provided.urls)
            for name, url in provided.urls.items():
                _say(f"{name}={redacted(url)}")
            process = await asyncio.create_subprocess_exec(*command, env=env)
            try:
                return await process.wait()
            except asyncio.CancelledError:
                process.terminate()
                await process.wait()
                raise
    except InfraError as exc:
        _say(str(exc))
        return 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["check-tools"]:
        missing = missing_tools()
        if missing:
            print("make test needs what this machine lacks:\n- " + "\n- ".join(missing))
            print("(make test-fast runs every test that needs none of it)")
            return 1
        return 0
    if argv[:1] == ["clean"]:
        asyncio.run(clean(InfraSettings()))
        return 0
    if argv[:1] == ["run"] and len(argv) > 2 and argv[1] == "--":
        return asyncio.run(_run(argv[2:]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
