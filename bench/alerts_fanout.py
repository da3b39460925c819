"""Admin alert fan-out benchmark: one alert to 1,000 connected admin websockets.

The gateway runs as it does in production (`python -m booking.gateway serve`, its own process,
uvicorn on uvloop), in front of a stand-in notifications service served from this process (it
answers the hello's `?limit=1` with an empty list). Client processes connect the admin websockets
(as browsers do, offering permessage-deflate unless `--no-compression`), then this process
publishes AdminNotificationRaised to the `admin.alerts` fanout, one at a time, the publish time in
the notification's metadata. Each client notes when each alert reached it. Reported:

- delivery latency, publish -> received by each client: p50, p95, p99, max over every delivery;
- the gateway process's memory (RSS): idle, with every admin connected, and its peak.

Targets (issue 6): p99 <= 100 ms and <= 100 MB with 1,000 connected. Results also go to
bench/results/. Run: `python -m bench.alerts_fanout` (see --help).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import uvloop
from fastapi import FastAPI
from websockets.asyncio.client import connect

from bench import results_file
from booking.contracts import AdminNotificationRaised, wrap
from booking.devtools.fixtures import free_port, serving
from booking.runtime.auth import issue_token
from booking.runtime.settings import DEFAULT_RABBITMQ_URL, RuntimeSettings

TARGET_P99_MS = 100.0
TARGET_RSS_MB = 100.0


# --- the client processes -----------------------------------------------------------------------


async def run_clients(url: str, token: str, count: int, alerts: int, compression: bool) -> None:
    """Connect `count` admins, say "ready", collect `alerts` notifications each, print latencies."""
    latencies: list[float] = []
    connected = 0
    all_ready = asyncio.Event()
    done = asyncio.Event()
    finished = 0
    gate = asyncio.Semaphore(50)  # connections opened at once

    async def admin() -> None:
        nonlocal connected, finished
        async with gate:
            ws = await connect(
                url,
                additional_headers={"Authorization": f"Bearer {token}"},
                proxy=None,
                compression="deflate" if compression else None,
                open_timeout=60,
                ping_interval=None,
            )
            hello = json.loads(await ws.recv())
            assert hello["type"] == "hello", hello
        connected += 1
        if connected == count:
            all_ready.set()
        received = 0
        async with ws:
            while received < alerts:
                frame = json.loads(await ws.recv())
                now = time.time()
                if frame["type"] == "notification":
                    latencies.append((now - frame["data"]["metadata"]["sent_at"]) * 1000)
                    received += 1
                elif frame["type"] == "ping":
                    await ws.send('{"type":"pong"}')
            finished += 1
            if finished == count:
                done.set()
            await done.wait()  # stay connected until every admin here has all

    tasks = [asyncio.create_task(admin()) for _ in range(count)]
    waiting = asyncio.ensure_future(all_ready.wait())
    await asyncio.wait([waiting, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        if task.done() and (error := task.exception()) is not None:
            raise error
    # What is measured is the gateway's delivery: a full collection here (100-250 ms over this
    # process's sockets, seen with a gc callback) would count as late deliveries.
    gc.collect()
    gc.freeze()
    print("ready", flush=True)
    await asyncio.gather(*tasks)
    print(json.dumps(latencies), flush=True)


# --- this process: stand-in, gateway, publisher -------------------------------------------------


def notifications_stand_in() -> FastAPI:
    app = FastAPI()

    @app.get("/api/admin/notifications")
    async def newest() -> dict[str, Any]:
        return {"items": [], "next_cursor": None}

    return app


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of process `pid`, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return round(fields["VmRSS"], 1), round(fields["VmHWM"], 1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = hard if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            raise SystemExit(f"need {needed} file descriptors, the hard limit is {hard}")


def alert(n: int) -> AdminNotificationRaised:
    now = datetime.now(UTC)
    return AdminNotificationRaised(
        id=n,
        type="PaymentAnomaly",
        severity="Critical",
        title="Money arrived for a cancelled order",
        message=f"Konnect reported a payment for order {uuid.uuid4()}, which was cancelled",
        metadata={
            "order_id": str(uuid.uuid4()),
            "payment_ref": f"bench-{n}",
            "reason": "payment_for_cancelled_order",
            "sent_at": time.time(),
        },
        is_read=False,
        read_at=None,
        created_at=now,
        fingerprint=f"PaymentAnomaly:payment_for_cancelled_order:{n}",
        occurrences=1,
        last_occurred_at=now,
    )


async def wait_consumed(base: str, gateway: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=10) as client:
        while time.monotonic() < deadline:
            if gateway.returncode is not None:
                raise SystemExit(f"the gateway exited with {gateway.returncode}")
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                checks = (await client.get("/internal/health")).json()["checks"]
                if checks["admin-alerts:consumers"][0]["status"] == "pass":
                    return
            await asyncio.sleep(0.2)
    raise SystemExit("the gateway's alert queue was not consumed within 60s")


async def connected_admins(base: str) -> int:
    async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=30) as client:
        checks = (await client.get("/internal/health")).json()["checks"]
    return checks["admin-alerts:connections"][0]["observedValue"]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    head = results_file.started("alerts_fanout")  # the machine's calibration, before the load
    raise_fd_limit(args.clients * 2 + 256)
    tag = uuid.uuid4().hex[:8]
    rabbitmq_url = os.environ.get("RABBITMQ_URL", DEFAULT_RABBITMQ_URL)
    settings = RuntimeSettings()
    secret = settings.auth_jwt_secret.get_secret_value()
    token = issue_token(secret, "bench-admin", "admin", ttl_seconds=3600)
    exchange_name = f"bench.{tag}.alerts"
    port = free_port()
    closed = f"http://127.0.0.1:{free_port()}"  # the other services: nobody there
    children: list[asyncio.subprocess.Process] = []
    gateway: asyncio.subprocess.Process | None = None
    connection = await aio_pika.connect(rabbitmq_url)
    try:
        async with serving(notifications_stand_in()) as notifications_url:
            env = {
                **os.environ,
                "GATEWAY_PORT": str(port),
                "RABBITMQ_URL": rabbitmq_url,
                "ADMIN_ALERTS_EXCHANGE": exchange_name,
                "EVENTS_EXCHANGE": f"bench.{tag}.events",
                "QUEUE_PREFIX": f"bench.{tag}.",
                "NOTIFICATIONS_URL": notifications_url,
                "ORDERS_URL": closed,
                "PAYMENTS_URL": closed,
                "CALENDAR_URL": closed,
                "HEALTH_MONITOR_INTERVAL_SECONDS": "3600",
                "LOG_LEVEL": "WARNING",
            }
            gateway = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "booking.gateway", "serve", env=env
            )
            base = f"http://127.0.0.1:{port}"
            await wait_consumed(base, gateway)
            idle = rss_mb(gateway.pid)

            print(
                f"alert fan-out benchmark: {args.clients} admins on one gateway, "
                f"{args.alerts} alerts, {args.processes} client processes, "
                f"compression {'off' if args.no_compression else 'on (as browsers)'}",
                flush=True,
            )
            per = [args.clients // args.processes] * args.processes
            per[0] += args.clients - sum(per)
            ws_url = f"ws://127.0.0.1:{port}/ws/admin"
            for count in per:
                command = [sys.executable, "-m", "bench.alerts_fanout", "clients", ws_url, token]
                command += [str(count), str(args.alerts)]
                if args.no_compression:
                    command.append("--no-compression")
                children.append(
                    await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE)
                )
            started = time.monotonic()
            for child in children:
                assert child.stdout is not None
                async with asyncio.timeout(300):
                    line = await child.stdout.readline()
                if line.strip() != b"ready":
                    raise SystemExit(f"a client process did not connect: {line!r}")
            connect_seconds = time.monotonic() - started
            admins = await connected_admins(base)
            with_admins = rss_mb(gateway.pid)
            print(f"  {admins} admins connected in {connect_seconds:.1f}s", flush=True)

            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(exchange_name)
            cpu_before = cpu_seconds(gateway.pid)
            for n in range(1, args.alerts + 1):
                envelope = wrap(alert(n), message_id=uuid.uuid4(), correlation_id=str(uuid.uuid4()))
                await exchange.publish(
                    aio_pika.Message(
                        envelope.model_dump_json().encode(),
                        content_type="application/json",
                        message_id=str(envelope.message_id),
                        type=envelope.type,
                    ),
                    routing_key="",
                )
                await asyncio.sleep(args.interval)
            latencies: list[float] = []
            for child in children:
                assert child.stdout is not None
                # The rest of its output, to its exit: one (long) JSON line.
                async with asyncio.timeout(120):
                    latencies.extend(json.loads(await child.stdout.read()))
            after = rss_mb(gateway.pid)
            cpu = cpu_seconds(gateway.pid) - cpu_before
            await channel.exchange_delete(exchange_name)
            await channel.exchange_delete(f"bench.{tag}.events")
    finally:
        for process in [*children, gateway]:
            if process is not None and process.returncode is None:
                process.terminate()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(20):
                        await process.wait()
        await connection.close()

    expected = args.clients * args.alerts
    if len(latencies) != expected:
        raise SystemExit(f"{len(latencies)} deliveries of the {expected} expected")
    latencies.sort()
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        **head,
        "clients": args.clients,
        "alerts": args.alerts,
        "interval_seconds": args.interval,
        "client_processes": args.processes,
        "compression": not args.no_compression,
        "deliveries": len(latencies),
        "connect_seconds": round(connect_seconds, 2),
        "latency": {
            "p50_ms": round(q[49], 2),
            "p95_ms": round(q[94], 2),
            "p99_ms": round(q[98], 2),
            "max_ms": round(latencies[-1], 2),
        },
        # The gateway's CPU time per alert fanned out to every admin (pings included).
        "gateway_cpu_ms_per_alert": round(cpu * 1000 / args.alerts, 1),
        "gateway_rss_mb": {
            "idle": idle[0],
            "connected": with_admins[0],
            "after_fanout": after[0],
            "peak": after[1],
            "per_1000_admins": round((with_admins[0] - idle[0]) * 1000 / args.clients, 1),
        },
    }


def report(result: dict[str, Any]) -> None:
    latency, rss = result["latency"], result["gateway_rss_mb"]
    n = result["clients"]
    rows = [
        ("delivery p50 (ms)", latency["p50_ms"], ""),
        ("delivery p95 (ms)", latency["p95_ms"], ""),
        ("delivery p99 (ms)", latency["p99_ms"], f"<= {TARGET_P99_MS:g}"),
        ("delivery max (ms)", latency["max_ms"], ""),
        (f"gateway CPU per alert to {n} (ms)", result["gateway_cpu_ms_per_alert"], ""),
        ("gateway RSS idle (MB)", rss["idle"], ""),
        (f"gateway RSS, {n} admins (MB)", rss["connected"], f"<= {TARGET_RSS_MB:g}"),
        (f"  of which {n} admins (MB)", round(rss["connected"] - rss["idle"], 1), ""),
        ("gateway RSS peak (MB)", rss["peak"], ""),
    ]
    checks = {
        "delivery p99 (ms)": latency["p99_ms"] <= TARGET_P99_MS,
        f"gateway RSS, {n} admins (MB)": rss["connected"] <= TARGET_RSS_MB,
    }
    print()
    print(f"  {'measure':<32}{'value':>10}  {'target':<9}")
    for name, value, target in rows:
        mark = "" if not target else ("ok" if checks[name] else "MISSED")
        print(f"  {name:<32}{value:>10}  {target:<9}{mark}")
    path = results_file.write("alerts_fanout", result)
    print(f"\n  results: {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.alerts_fanout")
    sub = parser.add_subparsers(dest="command")
    clients_cmd = sub.add_parser("clients", help="(internal) a process of admin websockets")
    clients_cmd.add_argument("url")
    clients_cmd.add_argument("token")
    clients_cmd.add_argument("count", type=int)
    clients_cmd.add_argument("alerts", type=int)
    clients_cmd.add_argument("--no-compression", action="store_true")
    parser.add_argument("--clients", type=int, default=1000, help="admin websockets (1000)")
    parser.add_argument("--alerts", type=int, default=50, help="alerts published (50)")
    parser.add_argument(
        "--interval", type=float, default=0.25, help="seconds between alerts (0.25)"
    )
    parser.add_argument("--processes", type=int, default=4, help="client processes (4)")
    parser.add_argument(
        "--no-compression", action="store_true", help="clients do not offer permessage-deflate"
    )
    args = parser.parse_args()
    # The gateway runs under uvicorn on uvloop: the clients use it too.
    if args.command == "clients":
        uvloop.run(
            run_clients(args.url, args.token, args.count, args.alerts, not args.no_compression)
        )
    else:
        report(uvloop.run(main(args)))
