"""The batcher: a quiet delay plus a cap, with time passed in."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.core.batcher import Batcher
from mesh.errors import LocalProtocolError


def test_quiet_delay_then_cap() -> None:
    b = Batcher(quiet=0.1, cap=0.5)
    assert b.deadline() is None
    b.add("a", 0.0)
    assert not b.due(0.05) and b.due(0.1)
    for i in range(10):  # a steady trickle cannot postpone the batch past the cap
        b.add(f"f{i}", 0.05 * (i + 1))
    assert b.deadline() == pytest.approx(0.5)
    assert b.take(0.49) == []
    batch = b.take(0.5)
    assert batch[0] == "a" and len(batch) == 11 and len(b) == 0


def test_coalesces_and_caps_size() -> None:
    b = Batcher(quiet=1, cap=5, max_paths=3)
    for p in ["x", "y", "x"]:
        b.add(p, 0)
    assert not b.due(0)
    b.add("z", 0)
    assert b.due(0) and b.take(0) == ["x", "y", "z"]


def test_bad_knobs() -> None:
    with pytest.raises(LocalProtocolError):
        Batcher(quiet=2, cap=1)


@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.floats(0, 0.2)), max_size=50))
def test_nothing_is_lost_or_duplicated(events: list[tuple[str, float]]) -> None:
    b = Batcher(quiet=0.05, cap=0.3)
    now, seen, out = 0.0, set(), []
    for path, gap in events:
        now += gap
        out.extend(b.take(now))
        b.add(path, now)
        seen.add(path)
    out.extend(b.flush())
    assert set(out) == seen


def test_spacing_sends_a_lull_at_once_and_a_stream_once_per_spacing() -> None:
    b = Batcher(quiet=0, cap=1, spacing=0.005)
    b.add("a", 10.0)
    assert b.take(10.0) == ["a"]  # after a lull: no wait at all
    b.add("b", 10.001)
    b.add("c", 10.002)
    assert b.deadline() == pytest.approx(10.005)  # the stream waits out the spacing
    assert b.take(10.004) == []
    assert b.take(10.005) == ["b", "c"]
    b.add("d", 10.02)
    assert b.take(10.02) == ["d"]  # a lull again


def test_a_full_batch_does_not_wait_for_the_spacing() -> None:
    b = Batcher(quiet=0, cap=1, max_paths=2, spacing=0.5)
    b.add("a", 0)
    assert b.take(0) == ["a"]
    b.add("b", 0.1)
    assert not b.due(0.1)
    b.add("c", 0.1)
    assert b.take(0.1) == ["b", "c"]


def test_negative_spacing_is_refused() -> None:
    with pytest.raises(LocalProtocolError):
        Batcher(spacing=-1)


@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.floats(0, 0.02)), max_size=50),
       st.floats(0, 0.05))
def test_spacing_loses_nothing_and_keeps_batches_apart(
        events: list[tuple[str, float]], spacing: float) -> None:
    b = Batcher(quiet=0, cap=0.1, spacing=spacing)
    now, seen, out, taken = 0.0, set(), [], []
    for path, gap in events:
        now += gap
        batch = b.take(now)
        if batch:
            out.extend(batch)
            taken.append(now)
        b.add(path, now)
        seen.add(path)
    out.extend(b.flush())
    assert set(out) == seen
    assert all(later - earlier >= spacing - 1e-9 for earlier, later in itertools.pairwise(taken))
