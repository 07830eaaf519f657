"""The keep area's and the tombstones' collection rules (mesh.core.retention, issue 14)."""

from __future__ import annotations

from mesh.core.effects import Announce
from mesh.core.manifest import Entry, Kind
from mesh.core.replica import Replica
from mesh.core.resolver import Version
from mesh.core.retention import Candidate, Policy, needed, plan, superseded, tombstone_due
from mesh.core.vclock import VersionVector, hlc_pack
from tests.core.sim import MemoryStore

H = [bytes([i]) * 32 for i in range(8)]
DAY = 86_400_000


def v(**counters: int) -> VersionVector:
    return VersionVector.of(counters)


def c(row: int, h: bytes, kept_ms: int, size: int = 100, sup: bool = True) -> Candidate:
    return Candidate(row, h, size, kept_ms, sup)


def test_retention_waits_for_the_duration_and_for_supersession() -> None:
    rows = [c(1, H[1], 0), c(2, H[2], 0, sup=False), c(3, H[3], 5 * DAY)]
    objects = {H[1]: 100, H[2]: 100, H[3]: 100}
    out = plan(rows, {h: 1 for h in objects}, objects, set(), Policy(7 * DAY, None), 8 * DAY)
    assert out.rows == (1,) and out.objects == (H[1],) and out.freed == 100


def test_needed_content_is_never_collected_not_even_over_the_cap() -> None:
    rows = [c(1, H[1], 0, size=1000), c(2, H[2], 1, size=10)]
    objects = {H[1]: 1000, H[2]: 10}
    out = plan(rows, {h: 1 for h in objects}, objects, {H[1]}, Policy(0, 0), 2)
    assert out.rows == (2,) and out.objects == (H[2],)
    assert out.held == 1000


def test_the_cap_collects_oldest_first_until_under_it() -> None:
    rows = [c(i, H[i], kept_ms=10 * i, sup=False) for i in range(1, 6)]
    objects = {H[i]: 100 for i in range(1, 6)}
    out = plan(rows, {h: 1 for h in objects}, objects, set(), Policy(7 * DAY, 250), 100)
    assert out.rows == (1, 2, 3)  # 500 -> 200 bytes, the three oldest
    assert set(out.objects) == {H[1], H[2], H[3]}


def test_an_object_another_row_keeps_stays() -> None:
    rows = [c(1, H[1], 0)]  # a second row of H[1] was not listed this round
    objects = {H[1]: 100}
    out = plan(rows, {H[1]: 2}, objects, set(), Policy(0, None), 1)
    assert out.rows == (1,) and out.objects == ()


def test_orphans_go_by_their_age_when_nothing_needs_them() -> None:
    rows = [Candidate(None, H[1], 100, 0, True), Candidate(None, H[2], 100, 0, True)]
    objects = {H[1]: 100, H[2]: 100}
    out = plan(rows, {}, objects, {H[2]}, Policy(0, None), 1)
    assert out.rows == () and out.objects == (H[1],)


def test_superseded_needs_our_disk_and_every_known_peer_strictly_newer() -> None:
    kept = v(a=1)
    assert superseded(kept, v(a=2), [v(a=2), None])
    assert not superseded(kept, v(a=1), [v(a=2)])  # our disk still holds it
    assert not superseded(kept, v(a=2), [v(a=1)])  # a peer still holds it
    assert not superseded(kept, v(a=2), [v(b=1)])  # a peer holds a concurrent write


def test_needed_is_every_head_of_a_target_and_every_unwritten_loser() -> None:
    heads = (Entry("f", v(a=1), H[1], writer="a", hlc=2), Entry("f", v(b=1), H[2], writer="b",
                                                                hlc=1))
    loser = Entry("g", v(c=1), H[3], writer="c")
    assert needed([Version(heads)], [loser]) == {H[1], H[2], H[3]}


def _tomb(counter: int, wall_ms: int) -> Version:
    return Version((Entry("f", v(a=counter), None, hlc=hlc_pack(wall_ms), writer="a"),))


def test_a_tombstone_goes_once_every_known_peer_acknowledged_it_and_it_is_old_enough() -> None:
    t = _tomb(2, 1000)
    assert tombstone_due(t, None, [v(a=2), v(a=3)], now_ms=10_000, min_age_ms=5000)
    assert not tombstone_due(t, None, [v(a=2), v(a=1)], now_ms=10_000, min_age_ms=5000)
    assert not tombstone_due(t, None, [v(a=2), None], now_ms=10_000, min_age_ms=5000)
    assert not tombstone_due(t, None, [v(a=2)], now_ms=3000, min_age_ms=5000)
    assert not tombstone_due(t, t, [v(a=2)], now_ms=10_000, min_age_ms=5000)


def test_a_version_older_than_a_collected_delete_is_deleted_again_not_brought_back() -> None:
    """Issue 14: a node that was away longer than its peers waited for it announces a
    file deleted (and the delete collected) since; the replica answers with a delete
    on top of it."""
    store = MemoryStore()
    replica = Replica("n1", store, clock=hlc_pack(5000), horizon=hlc_pack(4000))
    old = Entry("f", v(n3=1), H[1], 3, hlc=hlc_pack(1000), writer="n3")
    fx = replica.remote("n3", [old])
    [announce] = fx
    assert isinstance(announce, Announce)
    delete = announce.version.winner
    assert delete.deleted and delete.vector.dominates(old.vector)
    assert store.state("f").disk == announce.version
    # A delete as old asks for nothing; a write after the horizon is a new file.
    assert Replica("n1", MemoryStore(), horizon=hlc_pack(4000)).remote(
        "n3", [Entry("g", v(n3=2), None, hlc=hlc_pack(1000), writer="n3")]) == []
    new = Entry("h", v(n3=3), H[2], 3, hlc=hlc_pack(4001), writer="n3", kind=Kind.FILE)
    assert store.state("h").disk is None
    assert replica.remote("n3", [new])  # learned: wanted, not refused
    assert store.state("h").target is not None
