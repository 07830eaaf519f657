"""The batcher: a quiet delay plus a cap, with time passed in."""

from __future__ import annotations

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
