"""Convergence of simulated nodes under random interleavings (DESIGN.md invariants 1-3).

Hypothesis drives user writes, chmods and deletes on random nodes, scans that
lag behind them, manifests that are reordered, duplicated and delayed, and
pushes whose gate decision goes stale before the bytes land. After delivery
quiesces, every node must hold the same tree and vectors, no write may be lost,
and every node must have logged the same conflicts with the same winners.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.core.sim import Cluster

PATHS = ["a.txt", "b", "dir/c.md"]
MODES = [0o644, 0o600, 0o755]
EXAMPLES = int(os.environ.get("MESH_SIM_EXAMPLES", "500"))

node_ix = st.integers(0, 4)
write = st.tuples(st.just("write"), node_ix, st.sampled_from(PATHS), st.sampled_from(MODES))
scan = st.tuples(st.just("scan"), node_ix, st.sampled_from(PATHS))
actions = st.one_of(
    write,
    write,
    scan,
    st.tuples(st.just("chmod"), node_ix, st.sampled_from(PATHS), st.sampled_from(MODES)),
    st.tuples(st.just("delete"), node_ix, st.sampled_from(PATHS)),
    st.tuples(st.just("scan"), node_ix, st.sampled_from(PATHS)),
    st.tuples(st.just("flush"), node_ix),
    st.tuples(st.just("deliver"), st.integers(0, 50)),
    st.tuples(st.just("duplicate"), st.integers(0, 50)),
    st.tuples(st.just("push"), node_ix, node_ix, st.sampled_from(PATHS)),
    st.tuples(st.just("tick"), st.integers(0, 3000)),
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
            cluster.network.append(cluster.network[args[0] % len(cluster.network)])
        elif kind == "push":
            src, dst = nodes[args[0] % len(nodes)], nodes[args[1] % len(nodes)]
            if src is not dst:
                cluster.push(src.name, dst.name, args[2])
        elif kind == "tick":
            cluster.time_ms += args[0]
        cluster.time_ms += 7


NODE_ACTIONS = {
    "write": "user_write",
    "chmod": "user_chmod",
    "delete": "user_delete",
    "scan": "scan",
    "flush": "flush",
}


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
    msg = n1.try_push("n2", "f")
    assert msg is not None  # n1's version dominates what n2 announced
    n2.receive(msg)
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
