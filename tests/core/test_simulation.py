"""Convergence of simulated nodes under random interleavings (DESIGN.md invariants 1-3).

Hypothesis drives user writes, chmods, deletes and folder operations on random
nodes, scans that lag behind them, manifests that are reordered, duplicated and
delayed, pushes that land path by path while the receiver's user writes the same
paths (their gate decision may be stale by then, and the sender's disk may have
moved on), pushes overlapping on one path, folder deletes racing creates under
them, nodes killed at any step and restarted (cut-short pushes are settled
at the restart), and a peer's version forgotten at a restart (``Index.purge``).
After delivery quiesces, every node must hold the same tree and vectors, no
write may be lost, nothing a user deleted or replaced having seen it may come
back, and every node must have logged the same conflicts.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.core.sim import TOMBSTONE_AGE_MS, Cluster, ManifestMsg, SimNode

PATHS = ["a.txt", "d/x", "d/y", "d/e/z"]
FOLDERS = ["d", "d/e"]
MODES = [0o644, 0o600, 0o755]
EXAMPLES = int(os.environ.get("MESH_SIM_EXAMPLES", "500"))

node_ix = st.integers(0, 4)
path = st.sampled_from(PATHS)
folder = st.sampled_from(FOLDERS)
write = st.tuples(st.just("write"), node_ix, path, st.sampled_from(MODES))
actions = st.one_of(
    write,
    write,
    st.tuples(st.just("scan"), node_ix, st.sampled_from(PATHS + FOLDERS)),
    st.tuples(st.just("chmod"), node_ix, path, st.sampled_from(MODES)),
    st.tuples(st.just("delete"), node_ix, path),
    st.tuples(st.just("mkdir"), node_ix, folder),
    st.tuples(st.just("rmdir"), node_ix, folder),
    st.tuples(st.just("rmtree"), node_ix, folder),
    st.tuples(st.just("flush"), node_ix),
    st.tuples(st.just("deliver"), st.integers(0, 50)),
    st.tuples(st.just("duplicate"), st.integers(0, 50)),
    st.tuples(st.just("push"), node_ix, node_ix, st.sampled_from([*PATHS, *FOLDERS, None])),
    st.tuples(st.just("push"), node_ix, node_ix, st.just(None)),
    st.tuples(st.just("lsyncd"), node_ix, node_ix, st.sampled_from([*PATHS, *FOLDERS, None])),
    st.tuples(st.just("lsyncd"), node_ix, node_ix, st.just(None)),
    st.tuples(st.just("deliver"), st.integers(0, 50)),
    st.tuples(st.just("step"), st.integers(0, 50)),
    st.tuples(st.just("step"), st.integers(0, 50)),
    st.tuples(st.just("step"), st.integers(0, 50)),
    st.tuples(st.just("plan"), node_ix),
    st.tuples(st.just("plan"), node_ix),
    st.tuples(st.just("flow"), st.integers(1, 8)),
    st.tuples(st.just("flow"), st.integers(1, 8)),
    st.tuples(st.just("crash"), node_ix),
    st.tuples(st.just("restart"), node_ix),
    st.tuples(st.just("purge"), node_ix, path),
    st.tuples(st.just("tick"), st.integers(0, 3000)),
    st.tuples(st.just("collect"), node_ix),
    st.tuples(st.just("collect"), node_ix),
)


def run(cluster: Cluster, script: list[tuple[Any, ...]]) -> None:
    nodes = list(cluster.nodes.values())
    for kind, *args in script:
        if kind in NODE_ACTIONS:
            node, *rest = args
            getattr(nodes[node % len(nodes)], NODE_ACTIONS[kind])(*rest)
        elif kind == "deliver" and cluster.network:
            cluster.deliver(args[0])
        elif kind == "duplicate" and cluster.network:
            msg = cluster.network[args[0] % len(cluster.network)]
            if isinstance(msg, ManifestMsg):  # MQTT may redeliver; a push is one stream
                cluster.network.append(msg)
        elif kind == "push":
            src, dst = nodes[args[0] % len(nodes)], nodes[args[1] % len(nodes)]
            if src is not dst:
                cluster.push(src.name, dst.name, None if args[2] is None else [args[2]])
        elif kind == "lsyncd":
            src, dst = nodes[args[0] % len(nodes)], nodes[args[1] % len(nodes)]
            if src is not dst:
                cluster.lsyncd(src.name, dst.name, None if args[2] is None else [args[2]])
        elif kind == "step" and cluster.transfers:
            cluster.step(args[0])
        elif kind == "flow":  # a few messages and rsync steps, in the order they come
            for _ in range(args[0]):
                if cluster.network:
                    cluster.deliver(0)
                if cluster.transfers:
                    cluster.step(0)
        elif kind == "crash":
            cluster.crash(nodes[args[0] % len(nodes)].name)
        elif kind == "restart":
            cluster.restart(nodes[args[0] % len(nodes)].name)
        elif kind == "tick":
            cluster.time_ms += args[0]
        elif kind == "collect":
            check_collect(nodes[args[0] % len(nodes)])
        cluster.time_ms += 7


NODE_ACTIONS = {
    "write": "user_write",
    "chmod": "user_chmod",
    "delete": "user_delete",
    "mkdir": "user_mkdir",
    "rmdir": "user_rmdir",
    "rmtree": "user_rmtree",
    "scan": "scan",
    "flush": "flush",
    "plan": "plan_tick",
    "purge": "purge",
}


def announce(cluster: Cluster, node: SimNode) -> None:
    """``node``'s writes scanned, its manifest published and delivered: what a push of
    its may hold."""
    node.scan_all()
    node.flush()
    for _ in range(len(cluster.network)):
        cluster.deliver(0)


def check_collect(node: SimNode, known: list[str] | None = None) -> None:
    """Issue 14's safety: the collector never removes content a pending restore or an
    unwritten conflict copy needs (the invariants after quiescence then show that what
    it did remove was not needed either)."""
    wanted = {h.content for st in node.store.all_states().values() if st.target
              for h in st.target.heads if h.content in node.store.keep}
    wanted |= {e.content for e in node.store.unwritten_losers()
               if e.content in node.store.keep}
    gone = node.collect(known)
    assert not wanted & set(gone), "the collector removed content still needed"


def collect_everywhere(cluster: Cluster) -> None:
    """Time passes beyond the tombstones' age; every node collects; all settles again."""
    cluster.time_ms += 2 * TOMBSTONE_AGE_MS
    for node in cluster.nodes.values():
        check_collect(node)
    cluster.quiesce()


def check_invariants(cluster: Cluster) -> None:
    trees = cluster.trees()
    first = next(iter(trees.values()))
    for name, tree in trees.items():
        assert tree == first, f"{name} diverged from n1"
    indexes = cluster.indexes()
    first_index = next(iter(indexes.values()))
    for name, index in indexes.items():
        assert index == first_index, f"{name}'s index diverged"
    for path, (_vector, content, target) in first_index.items():
        assert target is None, f"{path} still has a pending target"
        on_disk = first.get(path)
        if content is None:
            assert on_disk is None, f"{path} is deleted in the index but on disk"
        else:
            assert on_disk is not None, f"{path} indexed but missing"
    for path in first:
        assert path in first_index, f"{path} on disk but not indexed"
    assert cluster.lost_writes() == [], "a write was lost"
    assert cluster.resurrected() == [], "something a user deleted or replaced came back"
    logs = cluster.conflict_logs()
    first_log = next(iter(logs.values()))
    for name, log in logs.items():
        assert log == first_log, f"{name}'s conflict log differs"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    n=st.integers(3, 5),
    skews=st.lists(st.integers(-2000, 2000), min_size=1, max_size=5),
    script=st.lists(actions, min_size=20, max_size=80),
)
def test_random_interleavings_converge(
    n: int, skews: list[int], script: list[tuple[Any, ...]]
) -> None:
    cluster = Cluster(n, skews)
    run(cluster, script)
    cluster.quiesce()
    check_invariants(cluster)
    collect_everywhere(cluster)  # tombstones every node acknowledged go; nothing changes
    check_invariants(cluster)


def test_a_node_away_longer_than_its_peers_waited_does_not_bring_deletes_back() -> None:
    """Issue 14: n3 is down while n1 deletes f; n1 and n2 forget n3 and collect the
    tombstone. n3 comes back announcing f as it held it: every node deletes f again
    (n3 files its copy into its keep area), none brings it back."""
    cluster = Cluster(3, [0, 700, -700])
    n1, n2, n3 = cluster.nodes.values()
    n1.user_write("f", 0o644)
    n1.user_write("g", 0o644)
    cluster.quiesce()
    old = n3.disk["f"].data
    cluster.crash("n3")
    n1.user_delete("f")
    n1.scan("f")
    for _ in range(3):
        cluster.land_all()
        n1.flush()
        n2.flush()
    cluster.time_ms += 2 * TOMBSTONE_AGE_MS
    for node in (n1, n2):
        check_collect(node, known=[p for p in node.peers if p != "n3"])
        assert "f" not in node.store.all_states(), "the tombstone was not collected"
    cluster.restart("n3")
    cluster.quiesce()
    assert all("f" not in tree for tree in cluster.trees().values())
    assert cluster.resurrected() == []
    assert any(k[1] == hashlib.sha256(old).digest() for k in n3.store.keep)
    assert n1.replica.stale + n2.replica.stale >= 1
    collect_everywhere(cluster)
    check_invariants(cluster)


def test_concurrent_writes_make_one_conflict_everywhere() -> None:
    cluster = Cluster(3, [0, 500, -500])
    n1, n2, _ = cluster.nodes.values()
    n1.user_write("f", 0o644)
    n2.user_write("f", 0o644)
    n1.scan("f")
    n2.scan("f")
    cluster.quiesce()
    check_invariants(cluster)
    logs = cluster.conflict_logs()
    assert len(logs["n1"]) == 1
    tree = cluster.trees()["n3"]
    assert len(tree) == 2 and any(".conflict-" in p for p in tree)


def test_push_over_an_unrecorded_edit_keeps_it() -> None:
    """DESIGN.md "the race to design for": rsync lands on an edit not yet scanned."""
    cluster = Cluster(3, [0])
    n1, n2, _ = cluster.nodes.values()
    n1.user_write("f", 0o644)
    n1.scan("f")
    cluster.quiesce()
    cluster.time_ms += 1000
    n2.user_write("f", 0o644)  # n2 edits; not scanned, not announced
    mine = n2.disk["f"].data
    cluster.time_ms += 1000
    n1.user_write("f", 0o644)  # n1 edits and pushes at once
    n1.scan("f")
    cluster.push("n1", "n2", ["f"])
    assert cluster.network  # n1's version dominates what n2 announced
    cluster.deliver(0)
    for _ in range(10):
        if cluster.transfers:
            cluster.step(0)
    cluster.quiesce()
    check_invariants(cluster)
    assert mine in {f.data for f in n2.disk.values()}


def test_edit_beats_delete() -> None:
    cluster = Cluster(3, [0])
    n1, n2, _ = cluster.nodes.values()
    n1.user_write("f", 0o644)
    cluster.quiesce()
    n1.user_delete("f")
    cluster.time_ms += 5000
    n2.user_write("f", 0o600)
    edit = n2.disk["f"].data
    n1.scan("f")
    n2.scan("f")
    cluster.quiesce()
    check_invariants(cluster)
    assert cluster.trees()["n1"]["f"] == (edit, 0o600)


def test_bytes_the_sender_changed_mid_push_are_not_a_write_of_the_receiver() -> None:
    """Shrunk from the property test (rsync reads the sender's disk when it gets there).

    n2 grants f at mode 644, its user chmods f to 600 before rsync reads it, and
    n3 gets the 600 bytes under the 644 announcement. When rsync wrote in place,
    n3 recorded them as its own edit on top of the landed version; n2's user then
    deleted f, and n3's "edit", concurrent with that delete, beat it: the file came
    back (also seen in the faults load profile). Staged bytes that are not the
    announced version are dropped now."""
    cluster = Cluster(3, [0])
    _, n2, _ = cluster.nodes.values()
    n2.user_write("f", 0o644)
    cluster.push("n2", "n3", ["f"])
    n2.user_chmod("f", 0o600)
    cluster.land_all()
    n2.user_delete("f")
    cluster.quiesce()
    check_invariants(cluster)


def test_a_new_file_deleted_before_a_cut_short_push_is_settled_stays_deleted() -> None:
    """Shrunk from the property test: n2 gets a new file from n1, its user deletes it,
    and n2 is killed before the push's end. With rsync writing in place, nothing at
    the restart told that the file had landed: it was pushed again, and the delete
    undone. Now nothing lands before the end, and the agent records what it puts in
    place the moment it does."""
    cluster = Cluster(3, [0])
    n1, n2, _ = cluster.nodes.values()
    n1.user_write("d/x", 0o644)
    announce(cluster, n1)  # the push's header says no more than n1 announced
    cluster.push("n1", "n2", ["d/x"])
    cluster.deliver(0)
    cluster.step(0)
    cluster.step(0)
    n2.user_delete("d/x")
    cluster.crash("n2")
    cluster.quiesce()
    check_invariants(cluster)


@pytest.mark.parametrize("old_rsync", [True, False])
def test_a_folder_delete_never_takes_a_file_the_deleter_did_not_see(old_rsync: bool) -> None:
    """Issue 11, mechanism 1: n1 removes the (on n1, empty) folder d while n2 creates
    d/x, which no scan of n2 has seen when n1's push arrives. With rsync deleting in
    the live folder (--delete --force, /d/***) the simulation finds the lost write;
    now rsync deletes nothing, and the folder is re-created around the new file."""
    cluster = Cluster(3, [0])
    cluster.old_rsync = old_rsync
    n1, n2, _ = cluster.nodes.values()
    n1.user_mkdir("d")
    cluster.quiesce()
    n2.user_write("d/x", 0o644)
    n1.user_rmdir("d")
    cluster.push("n1", "n2", ["d"])
    cluster.land_all()
    cluster.quiesce()
    if old_rsync:
        with pytest.raises(AssertionError, match="a write was lost"):
            check_invariants(cluster)
    else:
        check_invariants(cluster)
        assert all("d/x" in tree for tree in cluster.trees().values())


def test_a_restart_scans_only_what_changed_while_down_and_loses_none_of_it() -> None:
    """Issue 16: the start-up reconcile skips what one stat shows unchanged since it was
    indexed. What changed while the agent was down (an edit, a chmod, a delete, a new
    file) is scanned and becomes a local write at once, before anything else could scan
    it; the rest is not scanned at all; then every node converges on the edits."""
    cluster = Cluster(2, [0, 300])
    n1, n2 = cluster.nodes.values()
    for path in ("f", "g", "d/h", "d/i"):
        n1.user_write(path, 0o644)
    cluster.quiesce()
    n1.restart()
    assert n1.rescanned == [], "an unchanged tree was scanned"
    cluster.crash("n1")
    n1.user_write("f", 0o644)
    n1.user_chmod("g", 0o600)
    n1.user_delete("d/h")
    n1.user_write("d/new", 0o644)
    cluster.restart("n1")
    assert sorted(n1.rescanned) == ["d/h", "d/new", "f", "g"]
    for path in ("f", "g", "d/new", "d/i", "d"):
        disk = n1.store.state(path).disk
        assert disk is not None and disk.content == n1.disk[path].observed().content, path
    gone = n1.store.state("d/h").disk
    assert gone is not None and gone.content is None
    cluster.quiesce()
    assert cluster.trees()["n2"] == cluster.trees()["n1"]
    assert n2.disk["g"].mode == 0o600 and "d/h" not in n2.disk
    check_invariants(cluster)


def test_a_node_that_forgot_a_path_never_reuses_its_counter() -> None:
    """The fresh-clone CI run of d42d146 (``test_hostile_node.py::
    test_a_state_poisoned_before_the_bounds_does_not_stop_the_agent``): n1's version of
    f, n2's write on top of n1's, is forgotten at a start (the bounds refuse it), and no
    other peer announced f, so nothing stands in for it. n1's user writes f again: with
    counters one above what the path's state carries, that write was {n1: 1} again,
    before n2's {n1: 1, n2: 1}, and lost to it (or, where {n1: 1} was still held,
    one vector named two contents and the nodes stopped converging)."""
    cluster = Cluster(2, [0])
    n1, n2 = cluster.nodes.values()
    n1.user_write("f", 0o644)
    cluster.quiesce()
    cluster.time_ms += 1000
    n2.user_write("f", 0o644)
    cluster.quiesce()
    n1.crash()
    n1.purge("f")
    assert n1.store.state("f").disk is None  # nothing stands in: n2's vector went too
    cluster.time_ms += 1000
    n1.user_write("f", 0o644)
    mine = n1.disk["f"].data
    cluster.quiesce()
    check_invariants(cluster)
    assert mine in {f.data for f in n2.disk.values()}


def test_a_push_s_end_adopts_new_files_without_a_restore() -> None:
    """Issue 16: n2 holds nothing at d/x; n1's push of it ends with the staged file
    moved to its path (an adoption), not held and restored."""
    cluster = Cluster(3, [0])
    n1, n2, _ = cluster.nodes.values()
    n1.user_write("d/x", 0o644)
    announce(cluster, n1)
    cluster.push("n1", "n2", ["d", "d/x"])
    cluster.deliver(0)
    while cluster.transfers and not cluster.transfers[0].ended:
        cluster.step(0)
    assert n2.adopting, "the push's end should have left d/x to adopt"
    pushed = n2.staging[next(iter(n2.adopting))]["d/x"]
    cluster.land_all()
    assert n2.disk["d/x"] is pushed  # the staged file itself: moved, not copied
    assert not n2.store.keep, "an adopted file goes through the keep area"
    cluster.quiesce()
    check_invariants(cluster)


@pytest.mark.parametrize("meanwhile", ["newer version", "user write", "user mkdir"])
def test_an_adoption_waits_and_its_path_moves_on(meanwhile: str) -> None:
    """While a push's end adopts its files one after the other, a newer version of one
    of them arrives (it must not land the older one, which its scan would then record
    as a new write, concurrent with the newer), or a user writes there (the rename
    must not replace it), or makes a folder there."""
    cluster = Cluster(3, [0])
    n1, _, n3 = cluster.nodes.values()
    n1.user_write("x", 0o644)
    n1.scan("x")
    n1.flush()
    cluster.land_all()  # every node knows of x; n2 and n3 hold nothing yet
    if meanwhile == "newer version":
        pushed_first = n1.disk["x"].data
    cluster.push("n1", "n3", ["x"])
    cluster.deliver(0)
    while not cluster.transfers[0].ended:
        cluster.step(0)
    assert n3.adopting
    if meanwhile == "newer version":
        cluster.time_ms += 1000
        n1.user_write("x", 0o644)
        n1.scan("x")
        n1.flush()
        for _ in range(len(cluster.network)):  # n1's announcement reaches n3 first
            cluster.deliver(0)
        target = n3.store.state("x").target
        assert target is not None and target.winner.hash != hashlib.sha256(pushed_first).digest()
    elif meanwhile == "user write":
        n3.user_write("x", 0o600)
    else:
        n3.user_mkdir("x")
    cluster.land_all()
    cluster.quiesce()
    check_invariants(cluster)
    if meanwhile != "newer version":
        assert n3.store.conflict_map(), "n3's own write must meet n1's as a conflict"
    else:
        assert not n3.store.conflict_map(), "the older version came back as a write"


@pytest.mark.parametrize("then", ["delete", "write"])
def test_what_a_push_s_end_announces_late_does_not_hide_a_write_made_meanwhile(
        then: str) -> None:
    """Found by the load harness (quick profile with lsyncd dropping every event, so that
    the agent's pusher carries all): n2 adopts n1's new file; its user deletes it (or
    writes it again) while the push's end is still adopting; the scan of that records
    and announces the delete; then the end is done and passes on what it told the
    replica, the adopted version, which took the delete's place among what n2 had
    still to publish. n2 never announced its delete, and every push of it was refused
    as holding what n2 never announced: n1 and n3 kept the file for good."""
    cluster = Cluster(3, [0])
    n1, n2, _ = cluster.nodes.values()
    n1.user_write("x", 0o644)
    announce(cluster, n1)
    cluster.push("n1", "n2", ["x"])
    cluster.deliver(0)
    while not cluster.transfers[0].ended:
        cluster.step(0)
    assert n2.adopting
    cluster.step(0)  # x adopted; the end is not over (it looks for more to adopt)
    assert "x" in n2.disk and n2.held
    cluster.time_ms += 1000
    if then == "delete":
        n2.user_delete("x")
    else:
        n2.user_write("x", 0o644)
    n2.scan("x")  # n2's own change, recorded and to be announced
    cluster.step(0)  # the end is done
    cluster.quiesce()
    check_invariants(cluster)
    assert ("x" in n1.disk) is (then == "write")


def test_a_restart_s_sweep_brings_a_peer_all_it_missed() -> None:
    """Issue 16: after a resync, the sweep for what a peer is behind on is all that
    queues a path our pusher's queue lost. n1 indexed 60 new files while n2 was down,
    then crashed: its queue is gone, and its restart's reconcile finds nothing changed,
    so only the sweep can find them. Its own pusher, with no full push by hand
    (``quiesce`` pushes every path), brings n2 each of them."""
    cluster = Cluster(2, [0])
    n1, n2 = cluster.nodes.values()
    for i in range(20):
        n1.user_write(f"same/{i}", 0o644)
    cluster.quiesce()
    cluster.crash("n2")
    for i in range(60):
        n1.user_write(f"new/{i}", 0o644)
    n1.scan_all()
    n1.flush()  # announced to no one: n2 is down
    cluster.crash("n1")
    cluster.restart("n2")
    cluster.restart("n1")
    assert n1.rescanned == []
    for _ in range(200):  # seconds: pushes, their ends, the announcements
        cluster.time_ms += 1000
        for node in (n1, n2):
            node.plan_tick()
            node.flush()
        cluster.land_all()
        if all(f"new/{i}" in n2.disk for i in range(60)):
            break
    assert {p: n2.disk[p].data for p in n2.disk if p.startswith("new/")} == {
        p: n1.disk[p].data for p in n1.disk if p.startswith("new/")}
    check_invariants(cluster)
