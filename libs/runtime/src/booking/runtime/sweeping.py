"""Background work: sweepers, housekeeping, and the steps that run after a commit.

A sweep claims its rows itself (`FOR UPDATE SKIP LOCKED`), so replicas share the work; what is
shared here is the loop around it, a jittered interval (replicas started together do not sweep
in step), and a round that never raises. Work that meets an unreachable database is dropped
with a line now and then (a later round, or a sweeper, does it; nothing is spent); any other
failure is a bug, logged with its trace.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from booking.runtime.outages import OutageLog, is_unreachable

log = logging.getLogger(__name__)

T = TypeVar("T")


async def run_quietly(work: Callable[[], Awaitable[T]], outage: OutageLog, doing: str) -> T | None:
    """One round of background work that never raises; None when it did not go through (what
    it left is done later: by the next round, or by a sweeper)."""
    try:
        done = await work()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if is_unreachable(exc):
            outage.failed(exc, doing)
        else:
            log.exception("%s failed; it is done again later", doing)
        return None
    outage.recovered()
    return done


class Every:
    """Runs `round` every `interval` seconds (jittered), in the background, until stopped.

    `round` must not raise (see `run_quietly`): a round that did would end the loop.
    """

    def __init__(self, interval: float, round: Callable[[], Awaitable[Any]], name: str) -> None:
        self.interval = interval
        self.round = round
        self.name = name
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._forever(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval * random.uniform(0.8, 1.2))
            await self.round()
