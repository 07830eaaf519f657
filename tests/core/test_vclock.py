"""Laws of version vectors and the hybrid logical clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.core.vclock import (
    Ordering,
    VersionVector,
    hlc_observe,
    hlc_pack,
    hlc_tick,
    hlc_wall_ms,
)
from mesh.errors import LocalProtocolError
from tests.core.strategies import NODES, vectors

FLIP = {
    Ordering.BEFORE: Ordering.AFTER,
    Ordering.AFTER: Ordering.BEFORE,
    Ordering.EQUAL: Ordering.EQUAL,
    Ordering.CONCURRENT: Ordering.CONCURRENT,
}


@given(vectors, vectors)
def test_compare_is_antisymmetric(a: VersionVector, b: VersionVector) -> None:
    assert b.compare(a) is FLIP[a.compare(b)]
    assert (a.compare(b) is Ordering.EQUAL) == (a == b)


@given(vectors, vectors, vectors)
def test_merge_is_a_join(a: VersionVector, b: VersionVector, c: VersionVector) -> None:
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    assert a.merge(a) == a
    m = a.merge(b)
    assert m.compare(a) in (Ordering.AFTER, Ordering.EQUAL)
    assert m.compare(b) in (Ordering.AFTER, Ordering.EQUAL)


@given(vectors, st.sampled_from(NODES))
def test_increment_dominates(a: VersionVector, node: str) -> None:
    bumped = a.increment(node)
    assert bumped.dominates(a)
    assert bumped[node] == a.get(node) + 1


@given(vectors, vectors)
def test_compare_matches_pointwise_definition(a: VersionVector, b: VersionVector) -> None:
    nodes = set(a) | set(b)
    le = all(a.get(n) <= b.get(n) for n in nodes)
    ge = all(a.get(n) >= b.get(n) for n in nodes)
    expected = {(True, True): Ordering.EQUAL, (True, False): Ordering.BEFORE,
                (False, True): Ordering.AFTER, (False, False): Ordering.CONCURRENT}[(le, ge)]
    assert a.compare(b) is expected


def test_zero_counters_are_dropped_and_bad_values_refused() -> None:
    assert VersionVector.of({"a": 0, "b": 2}) == VersionVector.of({"b": 2})
    with pytest.raises(LocalProtocolError):
        VersionVector((("a", -1),))
    with pytest.raises(LocalProtocolError):
        VersionVector((("b", 1), ("a", 1)))
    with pytest.raises(LocalProtocolError):
        VersionVector.of({"../x": 1})


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 10**12), st.integers(0, 10**12)),
                max_size=50))
def test_hlc_is_monotonic_and_tracks_the_wall_clock(
    events: list[tuple[bool, int, int]],
) -> None:
    clock = 0
    for is_receive, wall, remote_wall in events:
        remote = hlc_pack(remote_wall, 3)
        new = hlc_observe(clock, remote, wall) if is_receive else hlc_tick(clock, wall)
        assert new > clock
        assert hlc_wall_ms(new) >= wall
        if is_receive:
            assert new > remote
        clock = new
