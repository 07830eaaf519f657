"""The content waits in a TEMP table answer as ``mesh.core.stall.ContentWaits`` does."""

from __future__ import annotations

import random

from mesh.core.stall import NO_HOLDER, ContentWaits
from mesh.store.index import Index
from mesh.store.waits import ContentWaitTable

BOUND = 300.0


def _targets(index: Index, paths: list[str]) -> None:
    index.db.execute("DELETE FROM targets")
    index.db.executemany("INSERT INTO targets VALUES (?, x'00')", [(p,) for p in paths])


def test_holders_asked_once_per_path_and_only_past_the_bound() -> None:
    index = Index(":memory:")
    waits = ContentWaitTable(index, BOUND)
    forged = [f"f{i}" for i in range(8192)]
    _targets(index, forged)
    waits.update(0.0)
    asked: list[str] = []

    def holders(path: str) -> list[str]:
        asked.append(path)
        return ["n9"]

    assert waits.stalled(BOUND - 1, holders) == ({}, 0)
    assert waits.stalled(BOUND, holders) == ({"n9": 8192}, 8192)
    assert waits.stalled(BOUND + 5, holders) == ({"n9": 8192}, 8192)
    assert len(asked) == 8192
    _targets(index, forged[:10])
    waits.update(BOUND + 6)
    assert waits.stalled(BOUND + 7, holders) == ({"n9": 10}, 10)


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
