"""The index's sizes for the status (``mesh.store.sizes``): counted again only after a
while, and the pending count never below what is pending."""

from __future__ import annotations

import pytest

from mesh.core.effects import PathState
from mesh.core.resolver import Version
from mesh.store import sizes as sizes_mod
from mesh.store.index import Index
from mesh.store.sizes import IndexSizes
from tests.store.test_index import e


def _target(index: Index, path: str) -> None:
    with index.batch():
        index.set_state(path, PathState(None, Version.of(e({"n2": 1}, "n2", 1, path=path))))


def _landed(index: Index, path: str) -> None:
    with index.batch():
        index.set_state(path, PathState(index.state(path).target, None))


def test_the_pending_count_is_never_low_and_comes_down_at_the_next_count(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts held for a second here (a small index's are not held: each takes less
    than a millisecond)."""
    monkeypatch.setattr(sizes_mod, "MIN_AGE_S", 1.0)
    MIN_AGE_S = 1.0
    index = Index(":memory:")
    sizes = IndexSizes(index)
    assert sizes.pending(0.0) == 0
    for i in range(5):
        _target(index, f"p{i}")
    assert sizes.pending(0.1) == 5  # not counted again: 0 + 5 written since
    _landed(index, "p0")
    _target(index, "p1")  # written again: counted as one more, until the next count
    assert sizes.pending(0.2) == 6 >= index.count_targets() == 4
    assert sizes.pending(MIN_AGE_S) == 4  # counted again
    assert sizes.versions(MIN_AGE_S) == 1
    _landed(index, "p1")
    assert sizes.versions(MIN_AGE_S + 0.5) == 1  # as last counted
    assert sizes.versions(2 * MIN_AGE_S) == 2


def test_targets_over_reads_no_more_than_it_needs() -> None:
    index = Index(":memory:")
    for i in range(3):
        _target(index, f"p{i}")
    assert index.targets_over(2) and not index.targets_over(3)
    assert not index.targets_over(10)


def test_a_small_index_is_counted_every_time() -> None:
    index = Index(":memory:")
    sizes = IndexSizes(index)
    assert sizes.pending(0.0) == 0
    _target(index, "p")
    _landed(index, "p")
    assert (sizes.pending(0.1), sizes.versions(0.1)) == (0, 1)  # a status later


def test_a_target_held_back_in_a_batch_is_counted_once() -> None:
    index = Index(":memory:")
    sizes = IndexSizes(index)
    with index.batch():
        index.set_state("p", PathState(None, Version.of(e({"n2": 1}, "n2", 1, path="p"))))
        assert sizes.pending(0.0) == 1  # written at the count's flush: in it, not added
