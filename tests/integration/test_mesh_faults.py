"""Faults with real agents (processes), real lsyncd and rsync over TLS, 3 nodes: a link
gone silent, a node killed and restarted, a partition with a conflict, a node paused.

Every fault is made by tests/cluster.py (per-pair TCP proxies, signals to the process
group); every wait is a condition with a deadline.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster, Node, running, wait_for

pytestmark = pytest.mark.integration

LIVENESS_S = 3.0  # LinkSettings.liveness_s, what the agent's links run with
STATUS_S = 1.0  # mesh.engine.node.STATUS_INTERVAL
NODE_NET, PROXY_NET = "127.0.5", "127.0.6"


# --- a cluster of our own addresses ------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with running(tmp_path, nets=(NODE_NET, PROXY_NET)) as c:
        yield c


# --- helpers -----------------------------------------------------------------------------------


def link_state(node: Node, peer: Node) -> str | None:
    """The state of ``node``'s link to ``peer`` in its status file."""
    doc = node.status()
    if doc is None:
        return None
    for link in doc["peers"].values():
        if link["node"] == peer.name:
            return str(link["state"])
    return None


def caught_up(node: Node, peers: list[Node]) -> bool:
    """``node`` applied every manifest ``peers`` published, in their current epochs."""
    doc = node.status()
    if doc is None:
        return False
    for peer in peers:
        theirs = peer.status()
        link = next((p for p in doc["peers"].values() if p["node"] == peer.name), None)
        if theirs is None or link is None or link["state"] != "up":
            return False
        if link["epoch"] != theirs["epoch"] or link["applied_seq"] != theirs["seq"]:
            return False
    return True


def log_lines(node: Node, pattern: str) -> list[re.Match[str]]:
    text = node.log.read_text(errors="replace") if node.log.exists() else ""
    return [m for m in (re.search(pattern, line) for line in text.splitlines()) if m]


def write_files(node: Node, prefix: str, count: int, text: str = "") -> list[str]:
    names = [f"{prefix}-{i:04d}.txt" for i in range(count)]
    folder = node.data / prefix
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_text(f"{name} {text or node.name}\n")
    return [f"{prefix}/{name}" for name in names]


def tunnels_to(cluster: Cluster, node: Node, mode: str) -> None:
    """Set the proxies of every peer's rsync tunnel to ``node`` (not its broker's)."""
    for (_, b), (_, tunnel) in cluster.proxies.proxies.items():
        if b == node.index:
            cluster.proxies.loop.call_soon_threadsafe(tunnel.set_mode, mode)


def others(cluster: Cluster, node: Node) -> list[Node]:
    return [n for n in cluster.nodes if n is not node]


def indexed(node: Node, count: int) -> bool:
    doc = node.status()
    return doc is not None and doc["index_size"] == count


def settled(node: Node, peers: list[Node]) -> bool:
    """Nothing left to announce, and every peer's announcements applied."""
    doc = node.status()
    return doc is not None and doc["backlog"] == 0 and caught_up(node, peers)


def block(cluster: Cluster, a: Node, b: Node, mode: str) -> None:
    """Cut only the pair a <-> b, both ways (``Cluster.partition`` cuts a group off)."""
    for key in ((a.index, b.index), (b.index, a.index)):
        cluster.proxies.set_mode(key, mode)


# --- 3. a link gone silent ---------------------------------------------------------------------


def test_a_silently_blocked_link_is_detected_and_reconnects_after_heal(
    cluster: Cluster,
) -> None:
    n1, n2, n3 = cluster.nodes
    block(cluster, n1, n2, "silent")
    blocked = time.monotonic()
    # Bytes stop, sockets stay open: only the liveness check can tell. The link is
    # declared dead after LIVENESS_S of silence, checked every sixth of it, and the
    # status file is rewritten every STATUS_S.
    wait_for(lambda: link_state(n1, n2) != "up" and link_state(n2, n1) != "up",
             LIVENESS_S + LIVENESS_S / 6 + STATUS_S + 2, "n1 <-> n2 down in the status files")
    detected = time.monotonic() - blocked
    assert link_state(n1, n3) == "up" and link_state(n2, n3) == "up"
    during = write_files(n1, "from-n1", 5) + write_files(n2, "from-n2", 5)
    cluster.heal()
    healed = time.monotonic()
    cluster.wait_linked(timeout=30)
    print(f"\nsilent link detected in {detected:.1f} s; "
          f"up again {time.monotonic() - healed:.1f} s after heal")
    assert log_lines(n1, r"link n2: down \(silent for")
    cluster.wait_converged(timeout=60)
    tree = cluster.tree(n3)
    assert all(p in tree for p in during)
    wait_for(lambda: caught_up(n1, [n2, n3]) and caught_up(n2, [n1, n3]), 20,
             "n1 and n2 caught up with each other")


# --- 4. a node killed and restarted ------------------------------------------------------------

BASE_FILES = 400
THIRD = 8  # paths edited on n1, deleted on n1, and new on n2 (in a new folder)
CHANGED = 3 * THIRD + 1


def test_a_killed_node_catches_up_by_digest_without_fetching_the_whole_index(
    cluster: Cluster,
) -> None:
    n1, n2, n3 = cluster.nodes
    base = write_files(n1, "base", BASE_FILES)
    cluster.wait_converged(timeout=60)
    # Trees match before every node has indexed and announced what it adopted.
    wait_for(lambda: all(indexed(n, BASE_FILES + 1) and settled(n, others(cluster, n))
                         for n in cluster.nodes), 30, "every adoption indexed and announced")
    cluster.kill(n3)
    # lsyncd retries its failed pushes to n3 and would deliver (and announce) some of the
    # changes as soon as n3 is back, racing the catch-up: the tunnels wait until it is done.
    tunnels_to(cluster, n3, "refuse")
    for path in base[:THIRD]:
        (n1.data / path).write_text("edited while n3 was down\n")
    for path in base[THIRD:2 * THIRD]:
        (n1.data / path).unlink()
    added = write_files(n2, "new", THIRD)
    cluster.wait_converged([n1, n2], timeout=60)
    wait_for(lambda: all(indexed(n, BASE_FILES + THIRD + 2) and settled(n, [p])
                         for n, p in ((n1, n2), (n2, n1))), 30, "n1 and n2 settled")
    pattern = r"caught up with (n\d): (\d+) buckets differed, (\d+) entries"
    before = len(log_lines(n3, pattern))
    cluster.start(n3)
    wait_for(lambda: len(log_lines(n3, pattern)) >= before + 2, 30,
             "n3 to log its catch-up with n1 and n2")
    fetched = {m[1]: (int(m[2]), int(m[3])) for m in log_lines(n3, pattern)[before:]}
    tunnels_to(cluster, n3, "open")
    cluster.wait_converged(timeout=60)
    tree = cluster.tree(n3)
    assert all(p in tree for p in added) and not any(p in tree for p in base[THIRD:2 * THIRD])
    print(f"\nn3 caught up after its restart: {fetched} (buckets, entries) with "
          f"{CHANGED} paths changed and {BASE_FILES + THIRD + 2} indexed (tombstones count)")
    # n1's view: its edits and deletes, and n2's new files it adopted; n2's likewise.
    assert set(fetched) == {"n1", "n2"}
    for peer, (buckets, entries) in fetched.items():
        # A bucket (of 4,096) per changed path, which may hold another path or two.
        assert 2 * THIRD <= buckets <= CHANGED and 2 * THIRD <= entries <= 2 * CHANGED, (
            peer, buckets, entries)


# --- 5. a partition with writes on both sides ----------------------------------------------------


def test_a_partition_with_a_conflict_heals_and_every_node_logs_the_same_conflict(
    cluster: Cluster,
) -> None:
    n1, n2, n3 = cluster.nodes
    (n1.data / "shared.txt").write_text("before the partition\n")
    cluster.wait_converged(timeout=60)
    cluster.partition([n1], mode="refuse")
    wait_for(lambda: all(link_state(n1, p) != "up" for p in (n2, n3)), 10, "n1 cut off")
    (n1.data / "shared.txt").write_text("n1's side\n")
    (n2.data / "shared.txt").write_text("n2's side, a bit longer\n")
    alone = write_files(n1, "alone", 5)
    majority = write_files(n3, "majority", 5)
    cluster.wait_converged([n2, n3], timeout=60)
    assert (n3.data / "shared.txt").read_text() == "n2's side, a bit longer\n"
    cluster.heal()
    cluster.wait_linked(timeout=30)
    pattern = r"conflict ([0-9a-f]{24}) on shared\.txt: (n\d) beats (n\d)"
    wait_for(lambda: all(log_lines(n, pattern) for n in cluster.nodes), 60,
             "the conflict logged on every node")
    cluster.wait_converged(timeout=60)
    logged = {n.name: [m.groups() for m in log_lines(n, pattern)] for n in cluster.nodes}
    print(f"\nconflicts logged: {logged}")
    assert all(len(v) == 1 for v in logged.values()), logged
    assert len({v[0] for v in logged.values()}) == 1, "the same id and winner everywhere"
    tree = cluster.tree(n1)
    assert all(p in tree for p in alone + majority)
    copies = [p for p in tree if p.startswith("shared.conflict-")]
    assert len(copies) == 1, tree.keys()
    contents = {(n1.data / p).read_text() for p in ("shared.txt", copies[0])}
    assert contents == {"n1's side\n", "n2's side, a bit longer\n"}, "no write was lost"


# --- 6. a node paused past the liveness window ---------------------------------------------------

PAUSE_S = 2 * LIVENESS_S + 1


def test_a_node_paused_past_the_liveness_window_recovers_and_catches_up(
    cluster: Cluster,
) -> None:
    n1, n2, n3 = cluster.nodes
    before = write_files(n3, "before", 5)
    cluster.wait_converged(timeout=60)
    cluster.pause(n3)
    paused = time.monotonic()
    try:
        wait_for(lambda: link_state(n1, n3) != "up" and link_state(n2, n3) != "up",
                 LIVENESS_S + LIVENESS_S / 6 + STATUS_S + 2, "n1 and n2 to drop n3")
        during = write_files(n1, "during-n1", 5) + write_files(n2, "during-n2", 5)
        (n1.data / before[0]).write_text("edited while n3 was paused\n")
        (n2.data / before[1]).unlink()
        # Held past the liveness window on n3's side too, whatever the waits above took.
        wait_for(lambda: time.monotonic() - paused > PAUSE_S, PAUSE_S + 1, "the pause")
    finally:
        cluster.resume(n3)
    resumed = time.monotonic()
    cluster.wait_linked(timeout=30)
    linked = time.monotonic() - resumed
    cluster.wait_converged(timeout=60)
    tree = cluster.tree(n3)
    assert all(p in tree for p in during) and before[1] not in tree
    assert (n3.data / before[0]).read_text() == "edited while n3 was paused\n"
    wait_for(lambda: caught_up(n3, [n1, n2]) and caught_up(n1, [n3]) and caught_up(n2, [n3]),
             20, "n3 and its peers caught up with each other")
    print(f"\npaused {resumed - paused:.1f} s; linked again {linked:.1f} s after resume")
