"""The loop watch names where the event loop is held, once per hold."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from mesh.engine.loopwatch import TICK, LoopWatch


def hold_the_loop_here(seconds: float) -> None:
    time.sleep(seconds)  # the hold under test


async def run_and_hold() -> LoopWatch:
    watch = LoopWatch(asyncio.get_running_loop(), held_s=1.0)
    watch.start()
    try:
        await asyncio.sleep(2 * TICK)  # running: nothing to log
        assert watch.reported == 0
        hold_the_loop_here(1.0 + 6 * TICK)
        await asyncio.sleep(2 * TICK)  # the loop runs again: the hold is over
    finally:
        watch.stop()
    return watch


def test_a_held_loop_is_logged_once_with_where_it_is(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "mesh.engine.loopwatch")
    watch = asyncio.run(run_and_hold())
    lines = [r.getMessage() for r in caplog.records]
    assert watch.reported == 1, lines
    assert "the event loop has been held for" in lines[0]
    assert "hold_the_loop_here" in lines[0]
