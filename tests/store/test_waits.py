"""The content waits in a TEMP table answer as ``mesh.core.stall.ContentWaits`` does."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from mesh.core.stall import NO_HOLDER, ContentWaits
from mesh.store.index import Index
from mesh.store.waits import ContentWaitTable
from tests.core.test_stall import never_delivered_stalls_after_the_bound

BOUND = 300.0


def _targets(index: Index, paths: list[str]) -> None:
    index.db.execute("DELETE FROM targets")
    index.db.executemany("INSERT INTO targets VALUES (?, x'00')", [(p,) for p in paths])


class _Updated:
    """The table, updated as ``ContentWaits`` is: with the paths waited for."""

    def __init__(self) -> None:
        self.index = Index(":memory:")
        self.table = ContentWaitTable(self.index, BOUND)

    def update(self, now: float, waiting: list[str]) -> None:
        _targets(self.index, waiting)
        self.table.update(now)

    def stalled(self, now: float, holders: Callable[[str], Iterable[str]]
                ) -> tuple[dict[str, int], int]:
        return self.table.stalled(now, holders)


def test_holders_asked_once_per_path_and_only_past_the_bound() -> None:
    """The core's scenario, over more than one page of holders (PAGE)."""
    never_delivered_stalls_after_the_bound(_Updated())


def test_two_holders_and_none() -> None:
    index = Index(":memory:")
    waits = ContentWaitTable(index, BOUND)
    _targets(index, ["p", "q"])
    waits.update(0.0)
    waits.delivered("n2", 10.0)
    both = {"p": ["n9", "n2"], "q": []}
    assert waits.stalled(BOUND + 1, lambda p: both[p]) == ({NO_HOLDER: 1}, 1)
    assert waits.stalled(BOUND + 10, lambda p: both[p]) == ({NO_HOLDER: 1, "n2": 1,
                                                            "n9": 1}, 2)


def test_same_answers_as_content_waits() -> None:
    rng = random.Random(1)
    for _ in range(20):
        index = Index(":memory:")
        table, ref = ContentWaitTable(index, BOUND), ContentWaits(BOUND)
        universe = [f"p{i}" for i in range(300)]
        held = {p: rng.sample(["a", "b", "c"], rng.randint(0, 2)) for p in universe}
        now = 0.0
        for _ in range(30):
            now += rng.choice([1, 50, 120, 301])
            waiting = rng.sample(universe, rng.randint(0, 300))
            _targets(index, waiting)
            table.update(now)
            ref.update(now, waiting)
            if rng.random() < 0.3:
                peer = rng.choice("abc")
                table.delivered(peer, now)
                ref.delivered(peer, now)
            at = now + rng.choice([0, 100, 300])
            assert table.stalled(at, held.__getitem__) == ref.stalled(at, held.__getitem__)


def test_a_path_that_landed_since_the_update_is_not_stalled_with_no_holder() -> None:
    """At a million files: content landed between two updates (every 5 s) left its path
    in the table, with no target and so no holders: "content of N paths has not come
    for 300 s (no peer holds it)" was logged for content that had just come."""
    index = Index(":memory:")
    waits = ContentWaitTable(index, BOUND)
    _targets(index, ["landed", "waiting"])
    waits.update(0.0)
    index.db.execute("DELETE FROM targets WHERE path = 'landed'")  # its restore, no update
    held = {"landed": [], "waiting": ["n2"]}
    assert waits.stalled(BOUND + 1, held.__getitem__) == ({"n2": 1}, 1)
