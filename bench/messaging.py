"""Messaging benchmark: commit -> outbox relay -> RabbitMQ -> inbox consumer -> handled.

Two processes, as a deployment runs them: this one is the producing service (it commits events
and runs the outbox relay); the other (`python -m bench.messaging serve consumer ...`) runs the
consumer, whose handler stamps each message handled in its inbox transaction. Reported:

- throughput: events per second from the first commit to the last handled, producing at full
  speed (10 events per transaction, several writers);
- latency at a steady 200 events/s (one event per transaction): p50/p95/p99 from commit to
  handled.

Targets: >= 2,000 events/s (issue 17; issue 2 asked 1,000); p99 <= 50 ms (issue 2). Results
also go to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid

import asyncpg
import uvloop
from sqlalchemy import Column, DateTime, MetaData, Table, Uuid, func, text

from bench import results_file
from booking.contracts import MentorRegistered
from booking.devtools.fixtures import delete_broker_objects, with_database
from booking.runtime.consumer import MessageContext
from booking.runtime.host import ServiceRuntime
from booking.runtime.logs import configure_logging
from booking.runtime.settings import DEFAULT_DATABASE_URL, RuntimeSettings
from booking.runtime.tables import MessagingTables

SCHEMA = "bench_messaging"
TARGET_EVENTS_PER_SECOND = 2000


def bench_tables() -> tuple[MetaData, MessagingTables, Table]:
    metadata = MetaData()
    tables = MessagingTables(metadata, SCHEMA)
    handled = Table(
        "handled",
        metadata,
        Column("message_id", Uuid, primary_key=True),
        Column("handled_at", DateTime(timezone=True), nullable=False),
        schema=SCHEMA,
    )
    return metadata, tables, handled


def settings_for(database_url: str, tag: str) -> RuntimeSettings:
    return RuntimeSettings(
        database_url=database_url,
        events_exchange=f"bench.{tag}.events",
        admin_alerts_exchange=f"bench.{tag}.alerts",
        queue_prefix=f"bench.{tag}.",
        log_level="WARNING",
    )


def event() -> MentorRegistered:
    return MentorRegistered(
        mentor_id=uuid.uuid4(), name="Bench", email="bench@example.com", timezone="UTC"
    )


# --- the consumer process -------------------------------------------------------------------------


async def consume(database_url: str, tag: str) -> None:
    """The consuming service: one consumer, no relay."""
    _, tables, handled = bench_tables()
    stamp = handled.insert().values(handled_at=func.clock_timestamp())

    async def stamp_handled(_event: MentorRegistered, ctx: MessageContext) -> None:
        await ctx.session.execute(stamp, {"message_id": ctx.envelope.message_id})

    runtime = ServiceRuntime(
        name="consumer",
        settings=settings_for(database_url, tag),
        tables=tables,
        handlers={MentorRegistered: stamp_handled},
        relay=False,
    )
    await runtime.start()
    await runtime.broker.wait_ready(30)
    print("ready", flush=True)
    await asyncio.Event().wait()


# --- the producing process (this one) ----------------------------------------------------------


class Producer:
    def __init__(self, runtime: ServiceRuntime) -> None:
        self.runtime = runtime
        self.committed: dict[uuid.UUID, float] = {}

    async def commit(self, count: int) -> None:
        assert self.runtime.db is not None and self.runtime.outbox is not None
        async with self.runtime.db.transaction() as session:
            ids = [await self.runtime.outbox.record(session, event()) for _ in range(count)]
        now = time.time()
        for message_id in ids:
            self.committed[message_id] = now


async def handled_times(conn: asyncpg.Connection, ids: list[uuid.UUID]) -> dict[uuid.UUID, float]:
    rows = await conn.fetch(
        f"SELECT message_id, extract(epoch from handled_at) AS t FROM {SCHEMA}.handled "
        "WHERE message_id = ANY($1::uuid[])",
        ids,
    )
    return {r["message_id"]: float(r["t"]) for r in rows}


async def wait_all_handled(
    conn: asyncpg.Connection, producer: Producer, ids: list[uuid.UUID], deadline: float
) -> dict[uuid.UUID, float]:
    """Poll a cheap count until every committed event is handled, then read the times once."""
    expected = len(producer.committed)
    while (count := await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.handled")) < expected:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {count} of {expected} events handled before the deadline")
        await asyncio.sleep(0.1)
    return await handled_times(conn, ids)


def percentile(sorted_values: list[float], q: int) -> float:
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[q - 1]


def progress(label: str, done: int, total: int) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    print(
        f"\r  {label:<12} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}",
        end="",
        flush=True,
    )


async def run_throughput(producer: Producer, conn: asyncpg.Connection, total: int) -> dict:
    writers, per_tx = 8, 10
    started = time.time()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for _ in range(total // per_tx):
        queue.put_nowait(per_tx)

    async def writer() -> None:
        while not queue.empty():
            await producer.commit(queue.get_nowait())

    ids_before = set(producer.committed)
    await asyncio.gather(*(writer() for _ in range(writers)))
    ids = [i for i in producer.committed if i not in ids_before]
    found = await wait_all_handled(conn, producer, ids, time.monotonic() + 300)
    elapsed = max(found.values()) - started
    return {
        "events": len(ids),
        "writers": writers,
        "events_per_transaction": per_tx,
        "seconds": round(elapsed, 3),
        "events_per_second": round(len(ids) / elapsed, 1),
    }


async def run_latency(
    producer: Producer, conn: asyncpg.Connection, rate: int, seconds: int
) -> dict:
    total = rate * seconds
    interval = 1 / rate
    ids_before = set(producer.committed)
    start = time.monotonic()
    pending: set[asyncio.Task] = set()
    for n in range(total):
        # Paced against the clock, not by sleeping a fixed interval, so the rate holds.
        delay = start + n * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(producer.commit(1))
        pending.add(task)
        task.add_done_callback(pending.discard)
        if n % rate == 0:
            progress("latency", n, total)
    await asyncio.gather(*pending)
    progress("latency", total, total)
    print()
    ids = [i for i in producer.committed if i not in ids_before]
    found = await wait_all_handled(conn, producer, ids, time.monotonic() + 120)
    latencies = sorted((found[i] - producer.committed[i]) * 1000 for i in ids)
    # Where the time goes: commit -> claimed by the relay, and claimed -> handled (publish,
    # broker, consumer). The relay stamps sent_at when it claims.
    rows = await conn.fetch(
        f"SELECT message_id, extract(epoch from sent_at) AS s FROM {SCHEMA}.outbox "
        "WHERE message_id = ANY($1::uuid[])",
        ids,
    )
    claimed = {r["message_id"]: float(r["s"]) for r in rows}
    split = {
        "commit_to_claimed": sorted((claimed[i] - producer.committed[i]) * 1000 for i in ids),
        "claimed_to_handled": sorted((found[i] - claimed[i]) * 1000 for i in ids),
    }
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "rate_per_second": rate,
        "events": len(ids),
        "p50_ms": round(quantiles[49], 2),
        "p95_ms": round(quantiles[94], 2),
        "p99_ms": round(quantiles[98], 2),
        "max_ms": round(latencies[-1], 2),
        **{
            f"{name}_p{q}_ms": round(percentile(xs, q), 2)
            for name, xs in split.items()
            for q in (50, 99)
        },
    }


async def main(args: argparse.Namespace) -> None:
    head = results_file.started("messaging")  # the machine's calibration, before the load
    server = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    database = f"bench_{uuid.uuid4().hex[:8]}"
    tag = uuid.uuid4().hex[:8]
    admin = await asyncpg.connect(server)
    await admin.execute(f'CREATE DATABASE "{database}"')
    await admin.close()
    database_url = with_database(server, database)
    children: list[asyncio.subprocess.Process] = []
    runtime = None
    try:
        metadata, tables, _ = bench_tables()
        # This process is the producing service: it commits events and runs their relay.
        runtime = ServiceRuntime(
            name="producer", settings=settings_for(database_url, tag), tables=tables
        )
        assert runtime.db is not None  # a runtime given tables has a database
        async with runtime.db.engine.begin() as c:
            await c.execute(text(f'CREATE SCHEMA "{SCHEMA}"'))
            await c.run_sync(metadata.create_all)
        consumer = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.messaging",
            "consume",
            database_url,
            tag,
            stdout=subprocess.PIPE,
        )
        children.append(consumer)
        assert consumer.stdout is not None
        async with asyncio.timeout(60):
            line = await consumer.stdout.readline()
        assert line.strip() == b"ready", line
        await runtime.start()
        await runtime.broker.wait_ready(30)
        producer = Producer(runtime)
        conn = await asyncpg.connect(database_url)
        print("messaging benchmark: commit -> relay -> RabbitMQ -> consumer -> handled")
        await run_throughput(producer, conn, 500)  # warm-up: connections, caches, JIT of queues
        print(f"  throughput   {args.events} events at full speed ...", flush=True)
        throughput = await run_throughput(producer, conn, args.events)
        latency = await run_latency(producer, conn, args.rate, args.seconds)
        await conn.close()
    finally:
        if runtime is not None:
            await runtime.stop()
        for child in children:
            if child.returncode is None:
                child.terminate()
                await child.wait()
        admin = await asyncpg.connect(server)
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
        # Its durable queues would outlive it in the shared vhost.
        settings = settings_for(database_url, tag)
        url = settings.rabbitmq_url.get_secret_value()
        await delete_broker_objects(url, settings, consumers=["consumer"])

    report(head, throughput, latency)


def report(head: dict, throughput: dict, latency: dict) -> None:
    rows = [
        (
            "events/s, full speed",
            throughput["events_per_second"],
            f">= {TARGET_EVENTS_PER_SECOND}",
            throughput["events_per_second"] >= TARGET_EVENTS_PER_SECOND,
        ),
        (f"p50 at {latency['rate_per_second']}/s (ms)", latency["p50_ms"], "", True),
        (f"p95 at {latency['rate_per_second']}/s (ms)", latency["p95_ms"], "", True),
        (
            f"p99 at {latency['rate_per_second']}/s (ms)",
            latency["p99_ms"],
            "<= 50",
            latency["p99_ms"] <= 50,
        ),
        ("  commit -> claimed p99", latency["commit_to_claimed_p99_ms"], "", True),
        ("  claimed -> handled p99", latency["claimed_to_handled_p99_ms"], "", True),
    ]
    print()
    print(f"  {'measure':<26}{'value':>10}  {'target':<9}")
    for name, value, target, ok in rows:
        mark = "" if not target else ("ok" if ok else "MISSED")
        print(f"  {name:<26}{value:>10}  {target:<9}{mark}")
    result = {
        **head,
        "throughput": throughput,
        "latency": latency,
    }
    print(f"\n  results: {results_file.write('messaging', result)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.messaging")
    sub = parser.add_subparsers(dest="command")
    consume_cmd = sub.add_parser("consume", help="(internal) the consumer process")
    consume_cmd.add_argument("database_url")
    consume_cmd.add_argument("tag")
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=15)
    args = parser.parse_args()
    configure_logging("bench", "WARNING")
    # The services run under uvicorn, which uses uvloop: measure on the same loop.
    if args.command == "consume":
        uvloop.run(consume(args.database_url, args.tag))
    else:
        uvloop.run(main(args))
