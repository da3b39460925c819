"""What every benchmark's JSON under bench/results/ starts with, and how it is written: the
benchmark, when, the commit and the machine, so that two runs can be told apart and compared."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def git_commit() -> str | None:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return out.stdout.strip() or None


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or None


def python_loop_ms(rounds: int = 5) -> float:
    """The best of `rounds` timings of one fixed pure-Python loop, in ms.

    Two hosts sold as the same 2 cores can differ twofold in what a core does, and a shared
    host's speed drifts from minute to minute: a rough guide to which of two runs had the
    faster machine, taken once, before the load.
    """
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python_loop_ms": python_loop_ms(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def started(benchmark: str) -> dict[str, Any]:
    """The head of a result document: `benchmark`, `at` (now), `commit` and `machine`."""
    return {
        "benchmark": benchmark,
        "at": datetime.now(UTC).isoformat(),
        "commit": git_commit(),
        "machine": machine(),
    }


def stamp(document: dict[str, Any]) -> str:
    """The document's `at`, as its files under bench/results/ are named."""
    return f"{datetime.fromisoformat(document['at']):%Y%m%dT%H%M%SZ}"


def write(name: str, document: dict[str, Any]) -> Path:
    """`document` as bench/results/<name>-<its stamp>.json; its path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{stamp(document)}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
