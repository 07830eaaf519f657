"""What a peer's versions must satisfy before the replica sees them (issue 13)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.core.admit import (
    COUNTER_BOUND,
    Limits,
    clock_refusal,
    refusal,
    screen,
    summary,
    unannounced,
)
from mesh.core.effects import Observed
from mesh.core.manifest import Entry, Kind
from mesh.core.replica import Replica
from mesh.core.vclock import MAX_COUNTER, MAX_HLC, VersionVector, hlc_pack
from mesh.errors import LocalProtocolError
from tests.core.sim import MemoryStore
from tests.core.strategies import entries

NOW_MS = 1_800_000_000_000
LIMITS = Limits(max_skew_ms=60_000)


def write(path: str, hlc: int | None = None, **vector: int) -> Entry:
    stamp = hlc_pack(NOW_MS) if hlc is None else hlc
    return Entry(path, VersionVector.of(vector or {"n9": 1}), None, hlc=stamp, writer="n9")


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        (write("t", n1=MAX_COUNTER), "counter 9223372036854775807 of n1 is above"),
        (write("t", n1=COUNTER_BOUND + 1), "could overflow"),
        (write("t", hlc=MAX_HLC - 2), "ahead of ours (max skew 60 s)"),
        (write("t", hlc=MAX_HLC), "ahead of ours"),
        (write("t", hlc=hlc_pack(NOW_MS + 61_000)), "61 s ahead"),
    ],
)
def test_the_attacks_values_are_refused(entry: Entry, why: str) -> None:
    found = refusal(entry, NOW_MS, LIMITS)
    assert found is not None and why in found


@pytest.mark.parametrize(
    "entry",
    [write("t", n1=COUNTER_BOUND), write("t", hlc=hlc_pack(NOW_MS + 60_000)),
     write("t", hlc=0), write("t", hlc=hlc_pack(NOW_MS - 10**9))],
)
def test_values_within_the_bounds_pass(entry: Entry) -> None:
    assert refusal(entry, NOW_MS, LIMITS) is None


def test_screen_drops_every_write_of_a_refused_path_and_keeps_the_rest() -> None:
    good, bad, bad_too = write("a"), write("b", n1=MAX_COUNTER), write("b", n2=1)
    loser = write("c", n3=1)
    far = write("c", hlc=MAX_HLC, n4=1)
    out = screen([good, bad, bad_too], [(far, loser)], NOW_MS, LIMITS)
    assert out.entries == (good,)
    assert out.conflicts == ()
    assert set(out.refused) == {"b", "c"}
    clean = screen([good], [], NOW_MS, LIMITS)
    assert clean.entries == (good,) and not clean.refused


def test_a_replica_fed_only_screened_writes_never_overflows() -> None:
    """The crash loop of issue 13: a tombstone {victim: 2**63-1}, then a local write."""
    replica = Replica("n1", MemoryStore())
    hostile = [write("t", n1=MAX_COUNTER), write("u", hlc=MAX_HLC - 2)]
    out = screen(hostile, [], NOW_MS, LIMITS)
    replica.remote("n9", out.entries, out.conflicts, NOW_MS)
    assert replica.clock <= hlc_pack(NOW_MS + LIMITS.max_skew_ms) + 1
    replica.local("t", Observed(Kind.FILE, b"\x01" * 32), NOW_MS)  # no exception
    replica.local("u", Observed(Kind.FILE, b"\x02" * 32), NOW_MS)


@given(st.lists(entries(), max_size=20))
def test_screen_keeps_everything_within_the_bounds(listed: list[Entry]) -> None:
    out = screen(listed, [], 2**50 >> 16, Limits())
    assert out.entries == tuple(listed) and not out.refused


def test_limits_check_themselves() -> None:
    with pytest.raises(LocalProtocolError):
        Limits(max_skew_ms=-1)
    with pytest.raises(LocalProtocolError):
        Limits(max_counter=MAX_COUNTER)


def test_a_header_says_no_more_than_was_announced() -> None:
    announced = {"a": VersionVector.of({"n9": 2}), "b": VersionVector.of({"n9": 1})}
    same, older = write("a", n9=2), write("a", n9=1)
    newer, concurrent, unknown = write("b", n9=2), write("b", n2=1), write("z")
    assert unannounced([same, older], [], announced.get) == {}
    out = unannounced([same, newer, unknown], [], announced.get)
    assert set(out) == {"b", "z"}
    assert "not among what was announced (vector {n9:1})" in out["b"]
    assert out["z"] == "never announced"
    assert set(unannounced([], [(same, concurrent)], announced.get)) == {"b"}


def test_summary_names_a_few_and_counts_the_rest() -> None:
    line = summary({f"p{i}": "why" for i in range(5)})
    assert line.startswith("5 path(s): 'p0': why;") and line.endswith("and 2 more")


def test_a_persisted_clock_far_ahead_is_not_taken_up_again() -> None:
    assert clock_refusal(MAX_HLC - 2, NOW_MS, LIMITS) is not None
    assert clock_refusal(hlc_pack(NOW_MS + 60_000), NOW_MS, LIMITS) is None
    assert clock_refusal(0, NOW_MS, LIMITS) is None
