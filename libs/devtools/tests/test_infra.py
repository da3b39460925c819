"""booking.devtools.infra: where make run and make test find the servers, or start their own."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import asyncpg
import pytest

from booking.devtools import infra
from booking.devtools.fixtures import pick_free_ports


@pytest.fixture
def infra_dir() -> Iterator[Path]:
    # Postgres runs as the postgres user when we are root: a folder it can reach (pytest's own
    # temporary folders are closed to other users).
    path = Path(tempfile.mkdtemp(prefix="infra-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def nothing_answers(infra_dir: Path) -> dict[str, str]:
    """An environment with both URLs unset, probes at a closed port, and free ports of its own."""
    closed, postgres, rabbitmq, dist = pick_free_ports(4)
    return {
        "INFRA_PROBE_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{closed}/postgres",
        "INFRA_PROBE_RABBITMQ_URL": f"amqp://guest:guest@127.0.0.1:{closed}/",
        "INFRA_DIR": str(infra_dir),
        "INFRA_POSTGRES_PORT": str(postgres),
        "INFRA_RABBITMQ_PORT": str(rabbitmq),
        "INFRA_RABBITMQ_DIST_PORT": str(dist),
    }


class Said(list[str]):
    def __call__(self, text: str) -> None:
        self.append(text)


async def test_explicit_urls_are_used_as_they_are_and_nothing_is_started(infra_dir: Path):
    env = nothing_answers(infra_dir)
    env.update(DATABASE_URL="postgresql://x@127.0.0.1:1/x", RABBITMQ_URL="amqp://x@127.0.0.1:1/")
    said = Said()
    provided = await infra.start(env, said)
    # The caller checks an explicit URL and reports it; it is never replaced.
    assert provided.urls == {}
    assert provided.postgres is provided.rabbitmq is None
    assert said == []


async def test_servers_that_answer_where_it_looks_are_used(
    infra_dir: Path, database_url: str, rabbitmq_url: str
):
    env = nothing_answers(infra_dir)
    env.update(INFRA_PROBE_DATABASE_URL=database_url, INFRA_PROBE_RABBITMQ_URL=rabbitmq_url)
    provided = await infra.start(env, Said())
    assert provided.urls == {"DATABASE_URL": database_url, "RABBITMQ_URL": rabbitmq_url}
    assert provided.postgres is provided.rabbitmq is None
    assert await asyncio.to_thread(lambda: list(infra_dir.iterdir())) == []


async def test_without_servers_binaries_or_docker_one_message_says_what_to_install(
    infra_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(infra, "postgres_bindir", lambda: None)
    monkeypatch.setattr(infra, "rabbitmq_scripts", lambda: None)

    async def no_docker() -> bool:
        return False

    monkeypatch.setattr(infra, "docker_answers", no_docker)
    with pytest.raises(infra.InfraError) as raised:
        await infra.start(nothing_answers(infra_dir), Said())
    message = str(raised.value)
    assert message.startswith("Postgres and RabbitMQ: nothing answers at 127.0.0.1:")
    assert "sudo apt-get install postgresql rabbitmq-server" in message
    assert "sudo dnf install postgresql-server rabbitmq-server" in message
    assert "brew install postgresql@15 rabbitmq" in message
    assert "DATABASE_URL and RABBITMQ_URL" in message


@pytest.mark.servers  # its own
@pytest.mark.skipif(
    infra.postgres_bindir() is None or infra.rabbitmq_scripts() is None,
    reason="needs the Postgres and RabbitMQ server programs",
)
@pytest.mark.timeout(300)
async def test_its_own_servers_keep_their_data_across_runs_until_cleaned(infra_dir: Path):
    env = nothing_answers(infra_dir)
    said = Said()
    async with infra.provide(env, said) as provided:
        assert set(provided.urls) == {"DATABASE_URL", "RABBITMQ_URL"}
        conn = await asyncpg.connect(provided.urls["DATABASE_URL"])
        try:
            await conn.execute("CREATE TABLE kept (note text); INSERT INTO kept VALUES ('hello')")
        finally:
            await conn.close()
        connection = await aio_pika.connect(provided.urls["RABBITMQ_URL"])
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue("kept", durable=True)
            message = aio_pika.Message(b"hello", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await channel.default_exchange.publish(message, routing_key="kept")
    assert "stopping the private Postgres" in said
    assert not infra.listening(int(env["INFRA_POSTGRES_PORT"]))
    assert not infra.listening(int(env["INFRA_RABBITMQ_PORT"]))

    async with infra.provide(env, Said()) as provided:
        conn = await asyncpg.connect(provided.urls["DATABASE_URL"])
        try:
            assert await conn.fetchval("SELECT note FROM kept") == "hello"
        finally:
            await conn.close()
        connection = await aio_pika.connect(provided.urls["RABBITMQ_URL"])
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue("kept", durable=True)
            kept = await queue.get(no_ack=True, fail=False)
            assert kept is not None and kept.body == b"hello"

    await infra.clean(infra.InfraSettings.from_environment(env))
    assert not await asyncio.to_thread(infra_dir.exists)


def test_check_tools_names_each_missing_tool_and_how_to_get_it(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(shutil, "which", lambda name, **_: None)
    monkeypatch.setattr(infra, "postgres_bindir", lambda: None)
    monkeypatch.setattr(infra, "rabbitmq_scripts", lambda: None)
    missing = "\n".join(infra.missing_tools())
    assert "Chromium" in missing and "sudo apt-get install chromium" in missing
    assert "initdb and pg_ctl" in missing and "brew install postgresql@15" in missing
    assert "RabbitMQ's server" in missing and "sudo dnf install rabbitmq-server" in missing


def test_run_passes_the_servers_it_settled_on_to_the_command_and_its_exit_code_back(
    infra_dir: Path, database_url: str, rabbitmq_url: str
):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "RABBITMQ_URL")}
    env.update(nothing_answers(infra_dir))
    env.update(INFRA_PROBE_DATABASE_URL=database_url, INFRA_PROBE_RABBITMQ_URL=rabbitmq_url)
    script = (
        "import os, sys; print(os.environ['DATABASE_URL'], os.environ['RABBITMQ_URL']); sys.exit(7)"
    )
    result = subprocess.run(
        [sys.executable, "-m", "booking.devtools.infra", "run", "--", sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 7, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == f"{database_url} {rabbitmq_url}"
