"""What holds health down, and when it stops counting (issue 13)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from mesh.core.stall import NO_HOLDER, ContentWaits, QueueWatch, StalledQueue

BOUND = 300.0


class Waits(Protocol):
    def update(self, now: float, waiting: list[str]) -> None: ...

    def stalled(self, now: float, holders: Callable[[str], Iterable[str]]
                ) -> tuple[dict[str, int], int]: ...


LOOKUPS = 3000  # per call, in the scenario below


def test_content_a_peer_announced_and_never_delivers_stalls_after_the_bound() -> None:
    never_delivered_stalls_after_the_bound(ContentWaits(BOUND, lookups=LOOKUPS))


def never_delivered_stalls_after_the_bound(waits: Waits) -> None:
    """Also run against the agent's table (tests/store/test_waits.py), made with
    ``LOOKUPS`` holders looked up per call."""
    forged = [f"f{i}" for i in range(8192)]
    waits.update(0.0, forged)
    asked: list[str] = []

    def holders(path: str) -> list[str]:
        asked.append(path)
        return ["n9"]

    assert waits.stalled(BOUND - 1, holders) == ({}, 0)
    assert asked == []
    # LOOKUPS per call: the paths not looked up yet still count against health
    assert waits.stalled(BOUND, holders) == ({"n9": 3000}, 3000)
    assert waits.stalled(BOUND, holders) == ({"n9": 6000}, 6000)
    assert waits.stalled(BOUND + 1, holders) == ({"n9": 8192}, 8192)
    assert waits.stalled(BOUND + 5, holders) == ({"n9": 8192}, 8192)
    assert sorted(asked) == sorted(forged)  # once per path
    waits.update(BOUND + 6, forged[:10])  # the rest arrived (or went)
    assert waits.stalled(BOUND + 7, holders) == ({"n9": 10}, 10)


def test_the_oldest_waits_are_looked_up_first() -> None:
    waits = ContentWaits(BOUND, lookups=2)
    waits.update(0.0, ["old"])
    waits.update(10.0, ["old", "new1", "new2"])
    asked: list[str] = []
    waits.stalled(BOUND + 20, lambda p: asked.append(p) or [])
    assert asked[0] == "old" and len(asked) == 2


def test_a_long_catch_up_that_keeps_delivering_is_not_stalled() -> None:
    waits = ContentWaits(BOUND)
    waits.update(0.0, ["big/1", "big/2"])
    for t in range(0, 1000, 60):
        waits.delivered("n2", float(t))
    assert waits.stalled(999.0, lambda p: ["n2"]) == ({}, 0)
    assert waits.stalled(960 + BOUND, lambda p: ["n2"]) == ({"n2": 2}, 2)


def test_a_path_with_two_holders_stalls_only_when_both_are_silent() -> None:
    waits = ContentWaits(BOUND)
    waits.update(0.0, ["p", "q"])
    waits.delivered("n2", 10.0)
    both = {"p": ["n9", "n2"], "q": []}
    assert waits.stalled(BOUND + 1, lambda p: both[p]) == ({NO_HOLDER: 1}, 1)
    assert waits.stalled(BOUND + 10, lambda p: both[p]) == ({NO_HOLDER: 1, "n2": 1,
                                                            "n9": 1}, 2)


def test_a_queue_that_never_moves_stalls_one_that_drains_does_not() -> None:
    watch = QueueWatch(BOUND)
    for t in range(0, 400, 1):
        watch.update(float(t), {"n9": 100 + t, "n2": t % 7, "n3": 50})
    assert watch.stalled(399.0) == {"n9": StalledQueue(499, 0.0), "n3": StalledQueue(50, 0.0)}
    watch.update(400.0, {"n2": 3, "n3": 49})  # n9 gone; n3 moved
    assert watch.stalled(400.0) == {}
