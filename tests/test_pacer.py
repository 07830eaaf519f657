"""lsyncd's batches to one peer are paced (``mesh.engine.pushes.Pacer``): a push when the
peer had none for ``every`` seconds goes at once; one right after another waits for the
rest of the interval, during which lsyncd gathers what comes into its next batch."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from mesh.engine.pushes import PACE_S, Pacer


def test_the_first_push_to_a_peer_goes_at_once_and_the_next_waits_the_rest() -> None:
    pacer = Pacer(0.2)
    assert pacer.wait("n2", 100.0) == 0.0
    pacer.started("n2", 100.0)
    assert abs(pacer.wait("n2", 100.05) - 0.15) < 1e-9
    assert pacer.wait("n3", 100.05) == 0.0  # each peer on its own
    assert pacer.wait("n2", 100.2) == 0.0
    assert pacer.wait("n2", 107.0) == 0.0


@given(st.lists(st.tuples(st.sampled_from(["n2", "n3"]), st.floats(0, 1)), max_size=50))
def test_pushes_to_one_peer_start_at_least_every_apart(steps: list[tuple[str, float]]) -> None:
    """However batches come, starting each after its wait keeps one peer's pushes at
    least ``every`` apart, and none waits longer than ``every``."""
    pacer, now = Pacer(), 0.0
    starts: dict[str, list[float]] = {}
    for peer, gap in steps:
        now += gap
        wait = pacer.wait(peer, now)
        assert 0.0 <= wait <= PACE_S + 1e-9
        now += wait
        pacer.started(peer, now)
        starts.setdefault(peer, []).append(now)
    for times in starts.values():
        assert all(b - a >= PACE_S - 1e-9 for a, b in itertools.pairwise(times))
