"""The content waits in a TEMP table answer as ``mesh.core.stall.ContentWaits`` does."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable

from mesh.core.effects import PathState
from mesh.core.resolver import Version
from mesh.core.stall import NO_HOLDER, ContentWaits
from mesh.store.index import Index
from mesh.store.waits import ContentWaitTable
from tests.core.test_stall import LOOKUPS, never_delivered_stalls_after_the_bound
from tests.store.test_index import e

BOUND = 300.0


def _targets(index: Index, paths: list[str]) -> None:
    """The targets are ``paths``: the others deleted, the new ones written (as the
    index's flush does, path by path)."""
    index.db.execute("DELETE FROM targets WHERE path NOT IN (SELECT value FROM json_each(?))",
                     (json.dumps(paths),))
    index.db.executemany("INSERT OR IGNORE INTO targets VALUES (?, x'00')",
                         [(p,) for p in paths])
    index.targets_written += len(paths)


class _Updated:
    """The table, updated as ``ContentWaits`` is: with the paths waited for."""

    def __init__(self, lookups: int = LOOKUPS) -> None:
        self.index = Index(":memory:")
        # One walk covers every path, as ContentWaits.update takes them all at once (the
        # walk's lag: test_the_walks_go_on_where_they_stopped)
        self.table = ContentWaitTable(self.index, BOUND, lookups, walk=16384)

    def update(self, now: float, waiting: list[str]) -> None:
        _targets(self.index, waiting)
        self.table.update(now)

    def stalled(self, now: float, holders: Callable[[str], Iterable[str]]
                ) -> tuple[dict[str, int], int]:
        return self.table.stalled(now, holders)


def test_holders_asked_once_per_path_and_only_past_the_bound() -> None:
    """The core's scenario: holders looked up ``LOOKUPS`` at a time."""
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
        now = at = 0.0
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
            at = max(at, now + rng.choice([0, 100, 300]))  # a monotonic clock
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


def test_the_walks_go_on_where_they_stopped() -> None:
    """Ten rows a call: a wait starts when the walk of the targets reaches it, ends when
    the walk of the waits does; the counts follow both."""
    index = Index(":memory:")
    waits = ContentWaitTable(index, BOUND, lookups=4, walk=10)
    paths = [f"p{i:02d}" for i in range(25)]
    _targets(index, paths)
    for t in (0.0, 1.0, 2.0):  # one pass: 10, 10 and 5 targets
        waits.update(t)
    asked: list[str] = []
    answers = [waits.stalled(BOUND + 2, lambda p: asked.append(p) or ["n2"])[1]
               for _ in range(9)]
    assert sorted(asked) == paths  # each once
    steps = [b - a for a, b in zip([0, *answers], answers, strict=False)]
    assert answers[-1] == 25 and all(0 <= step <= 4 for step in steps)
    _targets(index, paths[:5])
    answers = [waits.stalled(BOUND + 3, lambda p: ["n2"])[1] for _ in range(4)]
    assert answers[-1] == 5 and answers == sorted(answers, reverse=True)


def test_the_targets_the_index_writes_and_drops_start_and_end_waits() -> None:
    """Through ``Index``'s own writes, held back in its batch until a flush."""
    index = Index(":memory:")
    waits = ContentWaitTable(index, BOUND)
    version = Version.of(e({"n2": 1}, "n2", 1, path="a/p"))
    with index.batch():
        index.set_state("a/p", PathState(None, version))
        waits.update(0.0)
    assert waits.stalled(BOUND, lambda p: ["n2"]) == ({"n2": 1}, 1)
    with index.batch():
        index.set_state("a/p", PathState(version, None))
        assert waits.stalled(BOUND + 1, lambda p: ["n2"]) == ({}, 0)
