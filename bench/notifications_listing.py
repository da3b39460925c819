"""Notifications listing benchmark: the admins' feed with 1,000,000 notifications stored.

A fresh database is migrated with the notifications service's own migrations and filled with a
realistic mix (generate_series, in one pass per chunk): every type, ~5 % Critical, ~30 % unread,
three months of history, ids increasing with time. After VACUUM ANALYZE, each measured query is
run many times through the very function the API calls (`feed.page`, in a transaction from the
service's own engine), after a warm-up; the main one also through the HTTP route, in process
(auth, validation and JSON included; no network). Reported: p50/p95/p99 per query.

Target (issue 6): unread critical, newest first, limit 50: p99 <= 20 ms. Results also go to
bench/results/.

    python -m bench.notifications_listing [--rows 1000000] [--iterations 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import uvloop

from bench import results_file
from booking.devtools.fixtures import with_database
from booking.notifications import repository as feed
from booking.notifications.app import create_app
from booking.notifications.domain import Cursor, Filters, NotificationType, Severity
from booking.notifications.settings import NotificationsSettings
from booking.notifications.tables import SCHEMA
from booking.runtime.auth import Role, issue_token
from booking.runtime.db import Database, create_engine
from booking.runtime.logs import configure_logging
from booking.runtime.migrations import upgrade
from booking.runtime.settings import DEFAULT_DATABASE_URL

TABLE = f"{SCHEMA}.admin_notifications"
TARGET_P99_MS = 20.0
CHUNK = 100_000

# One chunk of rows [lo, hi] of `total`: ids (identity) follow i, so newer rows have larger ids.
# Severity: 5 % Critical, 35 % Error, 30 % Warning, 30 % Info; 30 % unread, spread over
# three months; every type; the metadata a real alert carries.
FILL = f"""
INSERT INTO {TABLE} (type, severity, title, message, metadata, is_read, read_at, created_at,
                     fingerprint, occurrences, last_occurred_at, is_open)
SELECT
    (i % 5)::smallint,
    (CASE WHEN s < 0.05 THEN 3 WHEN s < 0.40 THEN 2 WHEN s < 0.70 THEN 1 ELSE 0 END)::smallint,
    'Calendar booking failed: Google Calendar kept failing',
    'Session ' || md5(i::text)::uuid || ' of order ' || md5((i + 1)::text)::uuid
        || ' could not be put in the mentor''s Google Calendar after 3 attempts: 503',
    jsonb_build_object(
        'order_id', md5((i + 1)::text)::uuid, 'session_id', md5(i::text)::uuid,
        'mentor_id', md5((i % 977)::text)::uuid, 'reason', 'calendar_api_error',
        'detail', 'Google answered 503 three times', 'attempts', 3),
    u >= 0.30,
    CASE WHEN u >= 0.30 THEN at + interval '1 hour' END,
    at,
    md5('fingerprint' || i::text),
    1 + (i % 3),
    at + interval '5 minutes',
    true
FROM (
    SELECT i, random() AS s, random() AS u,
           $3::timestamptz + (i::float8 / $4) * interval '90 days' AS at
    FROM generate_series($1::bigint, $2::bigint) AS i
) AS rows
"""


async def fill(conn: asyncpg.Connection, total: int) -> float:
    started = time.perf_counter()
    start = datetime.now(UTC) - timedelta(days=90)
    for lo in range(1, total + 1, CHUNK):
        hi = min(lo + CHUNK - 1, total)
        await conn.execute(FILL, lo, hi, start, total)
        print(f"\r  filling      {hi:>9,}/{total:,} rows", end="", flush=True)
    print()
    await conn.execute(f"VACUUM ANALYZE {TABLE}")
    return time.perf_counter() - started


async def measure(call: Callable[[], Awaitable[Any]], iterations: int) -> dict[str, float]:
    for _ in range(max(50, iterations // 10)):  # warm-up: connections, plans, caches
        await call()
    timings = []
    for _ in range(iterations):
        started = time.perf_counter()
        await call()
        timings.append((time.perf_counter() - started) * 1000)
    timings.sort()
    q = statistics.quantiles(timings, n=100, method="inclusive")
    return {
        "iterations": iterations,
        "p50_ms": round(q[49], 3),
        "p95_ms": round(q[94], 3),
        "p99_ms": round(q[98], 3),
        "max_ms": round(timings[-1], 3),
    }


async def main(args: argparse.Namespace) -> None:
    head = results_file.started("notifications_listing")  # the calibration, before the load
    server = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    database = f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server)
    await admin.execute(f'CREATE DATABASE "{database}"')
    await admin.close()
    database_url = with_database(server, database)
    settings = NotificationsSettings(database_url=database_url, log_level="WARNING")
    engine = None
    try:
        # The service's own migrations: the indexes measured are the ones deployed.
        await asyncio.to_thread(upgrade, settings, "booking.notifications", SCHEMA)
        conn = await asyncpg.connect(database_url)
        print(f"notifications listing benchmark: {args.rows:,} notifications")
        fill_seconds = await fill(conn, args.rows)
        counts = dict(
            await conn.fetchrow(  # type: ignore[arg-type]  # an aggregate returns one row
                f"SELECT count(*) AS rows, count(*) FILTER (WHERE NOT is_read) AS unread, "
                f"count(*) FILTER (WHERE severity = 3) AS critical, "
                f"count(*) FILTER (WHERE severity = 3 AND NOT is_read) AS unread_critical, "
                f"max(id) AS max_id FROM {TABLE}"
            )
        )
        engine = create_engine(settings)
        db = Database(engine, SCHEMA)
        results, plan = await run_queries(db, conn, settings, counts, args.iterations)
        await conn.close()
    finally:
        if engine is not None:
            await engine.dispose()
        admin = await asyncpg.connect(server)
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
    report(head, args, counts, fill_seconds, results, plan)


async def run_queries(
    db: Database,
    conn: asyncpg.Connection,
    settings: NotificationsSettings,
    counts: dict[str, int],
    iterations: int,
) -> tuple[dict[str, dict[str, float]], str]:
    unread_critical = Filters(unread_only=True, severity=Severity.Critical)
    deep = Cursor(counts["max_id"] // 10)  # 90 % of the table is newer than this page

    def query(filters: Filters, **kwargs: Any) -> Callable[[], Awaitable[Any]]:
        async def call() -> Any:
            async with db.transaction() as session:
                page = await feed.page(session, filters, limit=50, **kwargs)
            assert page.items, f"no rows for {filters} {kwargs}"
            return page

        return call

    measures: dict[str, Callable[[], Awaitable[Any]]] = {
        "unread critical, newest 50": query(unread_critical),
        "unread critical, cursor deep": query(unread_critical, cursor=deep),
        "unfiltered, newest 50": query(Filters()),
        "unfiltered, cursor deep": query(Filters(), cursor=deep),
        "unread, min Error, newest 50": query(
            Filters(unread_only=True, min_severity=Severity.Error)
        ),
        "type SessionIssue, newest 50": query(Filters(type=NotificationType.SessionIssue)),
        "since 24 h, newest 50": query(Filters(since=datetime.now(UTC) - timedelta(days=1))),
        "after id (replay), 50 oldest": query(Filters(), after_id=counts["max_id"] - 500),
    }
    results = {}
    for name, call in measures.items():
        print(f"  measuring    {name} ...", flush=True)
        results[name] = await measure(call, iterations)

    # The same main query through the route, in process: auth, validation, JSON included.
    app = create_app(settings)
    app.state.runtime.db = db  # the measured engine; no broker is needed to answer the route
    token = issue_token(settings.auth_jwt_secret.get_secret_value(), "bench", Role.ADMIN)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://notifications",
        headers={"Authorization": f"Bearer {token}"},
    ) as client:

        async def route() -> None:
            answer = await client.get(
                "/api/admin/notifications",
                params={"unreadOnly": "true", "severity": "Critical", "limit": 50},
            )
            assert answer.status_code == 200 and len(answer.json()["items"]) == 50, answer.text

        print("  measuring    unread critical, newest 50 (HTTP route) ...", flush=True)
        results["unread critical, newest 50 (HTTP route)"] = await measure(route, iterations)

    compiled = feed.page_query(unread_critical, limit=50).compile(
        dialect=db.engine.dialect, compile_kwargs={"literal_binds": True}
    )
    rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {compiled}")
    plan = "\n".join(r[0] for r in rows)
    return results, plan


def report(
    head: dict[str, Any],
    args: argparse.Namespace,
    counts: dict[str, int],
    fill_seconds: float,
    results: dict[str, dict[str, float]],
    plan: str,
) -> None:
    main_p99 = results["unread critical, newest 50"]["p99_ms"]
    print()
    print(
        f"  {counts['rows']:,} rows ({counts['unread']:,} unread, {counts['critical']:,} "
        f"critical, {counts['unread_critical']:,} unread critical), filled in {fill_seconds:.0f}s"
    )
    print()
    print(f"  {'query (feed.page, limit 50)':<42}{'p50':>8}{'p95':>8}{'p99':>8}  target")
    for name, r in results.items():
        target = ""
        if name == "unread critical, newest 50":
            target = f"<= {TARGET_P99_MS:g} ms " + ("ok" if main_p99 <= TARGET_P99_MS else "MISSED")
        print(f"  {name:<42}{r['p50_ms']:>8.2f}{r['p95_ms']:>8.2f}{r['p99_ms']:>8.2f}  {target}")
    print("\n  plan of the main query:")
    for line in plan.splitlines():
        print(f"    {line}")
    result = {
        **head,
        "rows": counts,
        "fill_seconds": round(fill_seconds, 1),
        "iterations": args.iterations,
        "target": {"query": "unread critical, newest 50", "p99_ms_at_most": TARGET_P99_MS},
        "target_met": main_p99 <= TARGET_P99_MS,
        "queries": results,
        "plan": plan,
    }
    print(f"\n  results: {results_file.write('notifications-listing', result)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.notifications_listing")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--iterations", type=int, default=2000)
    args = parser.parse_args()
    configure_logging("bench", "WARNING")
    # The services run under uvicorn, which uses uvloop: measure on the same loop.
    uvloop.run(main(args))
