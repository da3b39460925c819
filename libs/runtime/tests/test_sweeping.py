"""The sweepers' loop: a round never raises, and an outage is told quietly."""

from __future__ import annotations

import logging

from booking.devtools.fixtures import eventually
from booking.runtime.outages import OutageLog
from booking.runtime.sweeping import Every, run_quietly


async def test_an_unreachable_database_skips_the_round_quietly_and_a_bug_is_logged_in_full(
    caplog,
):
    outage = OutageLog(logging.getLogger("test.sweep"), "the database (a test sweeper)")

    async def unreachable() -> int:
        raise ConnectionRefusedError("connect call failed")

    async def bug() -> int:
        raise KeyError("a bug")

    async def fine() -> int:
        return 3

    with caplog.at_level(logging.WARNING):
        assert [await run_quietly(unreachable, outage, "sweeping") for _ in range(5)] == [None] * 5
        assert await run_quietly(bug, outage, "sweeping") is None
        assert await run_quietly(fine, outage, "sweeping") == 3
    lines = [r for r in caplog.records if "unreachable while" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None  # once, without a trace
    [traced] = [r for r in caplog.records if r.exc_info]
    assert "sweeping failed" in traced.getMessage()
    assert not outage.in_outage  # the round that went through ended the outage


async def test_every_runs_its_round_until_stopped():
    rounds: list[int] = []

    async def round() -> None:
        rounds.append(1)

    loop = Every(0.01, round, name="test-every")
    loop.start()
    await eventually(lambda: len(rounds) >= 3, what="three rounds")
    await loop.stop()  # cancels the loop's task and waits for it to end
    assert loop._task is None
