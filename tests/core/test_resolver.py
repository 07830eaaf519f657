"""The resolution rule, conflict ids and copy names, and the heads lattice."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from mesh.core.manifest import Entry, Kind
from mesh.core.resolver import (
    Conflict,
    Merged,
    Rule,
    Version,
    conflict_copy_path,
    conflict_id,
    resolve,
)
from mesh.core.vclock import Ordering, VersionVector, hlc_pack
from mesh.errors import LocalProtocolError
from tests.core.strategies import entries

T0 = hlc_pack(1_764_064_800_000)  # 2025-11-25T10:00:00Z


def w(vector: dict[str, int], writer: str, content: int | None, hlc: int = T0,
      path: str = "docs/report.txt") -> Entry:
    digest = None if content is None else bytes([content]) * 32
    return Entry(path, VersionVector.of(vector), digest, 1, 0, 0o644, Kind.FILE, hlc, writer)


def test_edit_beats_delete_even_when_older() -> None:
    edit = w({"a": 1}, "a", 1, hlc=T0)
    delete = w({"b": 1}, "b", None, hlc=T0 + 10**9)
    c = resolve(edit, delete)
    assert isinstance(c, Conflict)
    assert c.winner == edit and c.rule is Rule.EDIT_BEATS_DELETE and c.copy_path is None


def test_later_write_wins_then_larger_node() -> None:
    early, late = w({"a": 1}, "z", 1, hlc=T0), w({"b": 1}, "b", 2, hlc=T0 + 1)
    c = resolve(early, late)
    assert isinstance(c, Conflict) and c.winner == late and c.rule is Rule.LATER_WRITE
    x, y = w({"a": 1}, "a", 1), w({"b": 1}, "b", 2)
    c = resolve(x, y)
    assert isinstance(c, Conflict) and c.winner == y and c.rule is Rule.LARGER_NODE


def test_same_content_merges_silently() -> None:
    out = resolve(w({"a": 1}, "a", 1), w({"b": 1}, "b", 1))
    assert isinstance(out, Merged)
    assert out.resolved.vector == VersionVector.of({"a": 1, "b": 1})


def test_refuses_ordered_versions() -> None:
    with pytest.raises(LocalProtocolError):
        resolve(w({"a": 1}, "a", 1), w({"a": 2}, "a", 2))


def test_copy_name_comes_from_the_losing_write() -> None:
    loser = w({"n2": 3}, "n2", 1, hlc=T0)
    assert conflict_copy_path(loser) == "docs/report.conflict-20251125T100000-n2-3.txt"
    plain = w({"n2": 1}, "n2", 1, path="Makefile")
    assert conflict_copy_path(plain) == "Makefile.conflict-20251125T100000-n2-1"
    dot = w({"n2": 1}, "n2", 1, path=".bashrc")
    assert conflict_copy_path(dot) == ".bashrc.conflict-20251125T100000-n2-1"
    long = w({"n2": 1}, "n2", 1, path="d/" + "é" * 120 + ".txt")
    name = conflict_copy_path(long).rsplit("/", 1)[1]
    assert len(name.encode()) <= 255 and name.endswith("-n2-1.txt")


@given(entries(path="p"), entries(path="p"))
def test_resolution_is_symmetric_and_deterministic(a: Entry, b: Entry) -> None:
    assume(a.vector.compare(b.vector) is Ordering.CONCURRENT)
    one, two = resolve(a, b), resolve(b, a)
    assert one == two
    if isinstance(one, Conflict):
        assert one.id == conflict_id(b, a)
        assert one.resolved.vector == a.vector.merge(b.vector)
        assert one.resolved.content == one.winner.content


@given(st.lists(entries(path="p"), min_size=1, max_size=6))
def test_heads_are_a_semilattice(writes: list[Entry]) -> None:
    """Absorbing writes in any order gives the same heads and the same winner."""
    results = {Version.of(*perm) for perm in itertools.islice(
        itertools.permutations(writes), 24)}
    assert len(results) == 1
    (version,) = results
    for x, y in itertools.combinations(version.heads, 2):
        assert x.vector.compare(y.vector) is Ordering.CONCURRENT
    for wr in writes:
        assert version.vector.compare(wr.vector) in (Ordering.AFTER, Ordering.EQUAL)


@given(st.lists(entries(path="p"), min_size=2, max_size=6))
def test_every_losing_head_is_one_conflict(writes: list[Entry]) -> None:
    version = Version.of(*writes)
    conflicts = version.conflicts()
    assert {c.loser for c in conflicts} == {
        h for h in version.heads if h.content != version.winner.content
    }
    assert all(c.winner == version.winner for c in conflicts)


def test_tombstones_differing_only_in_mode_still_order_totally() -> None:
    """Found in CI: the tie-break ignored the mode of deletes, so the first one kept won."""
    writes = [w({"a": 1}, "a", None), w({"b": 1, "c": 1}, "b", None),
              Entry("docs/report.txt", VersionVector.of({"b": 1, "c": 1}), None, 1, 0, 0o600,
                    Kind.FILE, T0, "b")]
    assert len({Version.of(*p) for p in itertools.permutations(writes)}) == 1
