"""A scan that leaves a path out because a scan under way marked it waits for that scan
(``mesh.engine.scanmarks.ScanMarks.running``): the gate grants from the index once the
catch-up returns, so a peer's grant must not see the index before the other scan ends
(issue 12: a 256 MiB file reached one of two peers 1.4 s late)."""

from __future__ import annotations

import asyncio

from mesh.engine.scanmarks import ScanMarks


def test_running_waits_for_the_scan_that_marked_a_path_and_no_other() -> None:
    asyncio.run(_waits_for_the_marking_scan())


def test_a_later_scan_of_the_same_path_is_the_one_waited_for() -> None:
    asyncio.run(_waits_for_the_later_scan())


async def _waits_for_the_marking_scan() -> None:
    marks = ScanMarks()
    big = marks.begin(["big.bin"], 1.0)
    other = marks.begin(["other"], 2.0)
    assert marks.since("big.bin") == 1.0 and marks.since("other") == 2.0
    waiting = asyncio.ensure_future(marks.running(["big.bin", "unmarked"]))
    await asyncio.sleep(0)
    marks.end(other)
    await asyncio.sleep(0)
    assert not waiting.done()  # still hashing big.bin
    marks.end(big)
    await asyncio.wait_for(waiting, 5)
    await asyncio.wait_for(marks.running(["big.bin", "other"]), 5)  # both over: no wait


async def _waits_for_the_later_scan() -> None:
    marks = ScanMarks()
    first = marks.begin(["p"], 1.0)
    second = marks.begin(["p"], 2.0)
    marks.end(first)
    waiting = asyncio.ensure_future(marks.running(["p"]))
    await asyncio.sleep(0)
    assert not waiting.done()
    marks.end(second)
    await asyncio.wait_for(waiting, 5)
