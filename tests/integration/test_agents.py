"""Real agents (processes), real lsyncd, real rsync over TLS, 3 nodes on 127.0.0.x."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.adapters.fs.listing import PREHASH_BYTES
from tests.cluster import Cluster, Node, running, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with running(tmp_path) as c:
        yield c


def every_kind_of_change(node: Node, tag: str) -> None:
    d = node.data
    (d / f"{tag}-new.txt").write_text(f"new on {node.name}\n")
    (d / f"{tag}-empty").write_bytes(b"")
    (d / f"{tag} dir/sub").mkdir(parents=True)
    (d / f"{tag} dir/sub/ünïcödé name.bin").write_bytes(os.urandom(70_000))
    (d / f"{tag} dir/new\nline").write_text("newline in the name")
    (d / f"{tag}-exec.sh").write_text("#!/bin/sh\n")
    (d / f"{tag}-exec.sh").chmod(0o750)
    (d / f"{tag}-link").symlink_to(f"{tag}-new.txt")
    (d / f"{tag}-dangling").symlink_to("/nonexistent/target")


def second_round(node: Node, tag: str) -> None:
    d = node.data
    (d / f"{tag}-new.txt").write_text("edited\n")
    (d / f"{tag}-exec.sh").chmod(0o700)
    (d / f"{tag}-empty").unlink()
    (d / f"{tag} dir/sub/ünïcödé name.bin").rename(d / f"{tag} dir/moved.bin")
    (d / f"{tag} dir/sub").rmdir()


def test_every_kind_of_change_converges_from_every_node(cluster: Cluster) -> None:
    for node in cluster.nodes:
        every_kind_of_change(node, node.name)
    cluster.wait_converged()
    tree = cluster.tree(cluster.nodes[0])
    assert tree["n2-exec.sh"][1] == 0o750
    assert tree["n3-link"][0] == "link"
    assert "n1 dir/new\nline" in tree
    for node in cluster.nodes:
        second_round(node, node.name)
    cluster.wait_converged()
    tree = cluster.tree(cluster.nodes[2])
    assert "n1-empty" not in tree and "n2 dir/sub" not in tree
    assert tree["n3-exec.sh"][1] == 0o700 and "n1 dir/moved.bin" in tree
    assert not any(".conflict-" in p for p in tree), "no conflicts were made"


def pushes(node: Node) -> dict[str, Any]:
    status = node.status()
    assert status is not None
    return status["pushes"]  # type: ignore[no-any-return]


def fresh_status(nodes: list[Node]) -> None:
    asked = time.time()
    wait_for(lambda: all((n.status() or {}).get("now", 0) > asked for n in nodes), 10,
             "fresh status")


def caught_up(nodes: list[Node]) -> None:
    """Every link up and caught up: until then a node pushes nothing to that peer (its
    writes there could race ours), and lsyncd's batches for it are refused."""
    def ready(node: Node) -> bool:
        peers = (node.status() or {}).get("peers", {})
        return len(peers) == 2 and all(p["state"] == "up" and not p["catching_up"]
                                       for p in peers.values())

    wait_for(lambda: all(ready(n) for n in nodes), 30, "links up and caught up")


def carried_more(node: Node, than: dict[str, int]) -> bool:
    by_peer = pushes(node)["by_peer"]
    return all(by_peer[p]["carried_paths"] > n for p, n in than.items())


def lsyncd_carries(node: Node, peers: list[str], tries: int = 10) -> None:
    """Write a probe on ``node`` until its lsyncd has carried one to each of ``peers``:
    lsyncd sets its watches some time after it starts, and says nothing when it has."""
    for attempt in range(1, tries + 1):
        was = {p: pushes(node)["by_peer"][p]["carried_paths"] for p in peers}
        (node.data / "lsyncd-probe").write_text(str(attempt))
        try:
            wait_for(functools.partial(carried_more, node, was), 5, "a probe")
            return
        except AssertionError:
            if attempt == tries:
                raise


def test_lsyncd_carries_own_writes_and_each_version_moves_once_per_peer(
        cluster: Cluster) -> None:
    """Issue 12: lsyncd is the live push path. A burst of 200 files on n1 goes through
    lsyncd's gate to each peer (allowed >= 200 per peer), the agent's own pusher sends
    none of it, and each push lands once: the peers' lsyncd, firing on the files pushed
    in, are refused (no echo)."""
    n1, n2, n3 = cluster.nodes
    caught_up(cluster.nodes)
    fresh_status(cluster.nodes)
    before = {n.name: pushes(n) for n in cluster.nodes}
    for i in range(200):
        (n1.data / f"burst/{i // 50}").mkdir(parents=True, exist_ok=True)
        (n1.data / f"burst/{i // 50}/f{i:03}.txt").write_bytes(f"file {i}\n".encode())
    cluster.wait_converged()
    fresh_status(cluster.nodes)
    after = {n.name: pushes(n) for n in cluster.nodes}
    for peer in ("n2", "n3"):
        was = before["n1"]["by_peer"][peer]
        now = after["n1"]["by_peer"][peer]
        assert now["allowed"] - was["allowed"] >= 200, (peer, now)
        assert now["carried_paths"] - was["carried_paths"] >= 200, (peer, now)
        assert now["sent_paths"] - was["sent_paths"] == 0, (peer, now)
        assert now["carry_failures"] == was["carry_failures"]
        # Every push n1's lsyncd ran to the peer arrived there, and nothing else did.
        assert (after[peer]["received"] - before[peer]["received"]
                == now["carried"] - was["carried"]), peer
    for node in (n2, n3):
        assert after[node.name]["allowed"] == before[node.name]["allowed"]  # no echo
        assert after[node.name]["sent"] == before[node.name]["sent"]
    status = subprocess.run([sys.executable, "-m", "mesh", "status", "--state-dir",
                             str(n1.state)], capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stderr
    assert "pushed by lsyncd" in status.stdout and "by the agent 0 paths" in status.stdout


def test_a_version_lsyncd_could_not_carry_goes_by_the_agent_through_the_same_executor(
        cluster: Cluster) -> None:
    """n3 is down while n1 writes: lsyncd's batch for n3 cannot go (the agent refuses a
    peer that is not up), so the agent's pusher sends the version once n3 is back (the
    catch-up), through the same executor: counted as n1's own push to n3, while n2 got
    it from lsyncd. n1's lsyncd keeps running throughout, with its sync to n3: a restart
    for a peer going down or coming back would miss the writes made during it."""
    n1, n2, n3 = cluster.nodes
    # Until n1 has caught up with a peer, the gate refuses lsyncd's batches for it and
    # the agent sends the write: a write made then would not test lsyncd's part.
    caught_up(cluster.nodes)
    lsyncd_carries(n1, ["n2", "n3"])
    fresh_status(cluster.nodes)
    before = pushes(n1)["by_peer"]
    lsyncd = (n1.status() or {})["lsyncd"]
    assert lsyncd["pid"] is not None and lsyncd["peers"] == ["n2", "n3"]
    cluster.stop(n3)
    (n1.data / "while-n3-away.txt").write_bytes(b"written while n3 was down\n")
    wait_for(lambda: (n2.data / "while-n3-away.txt").exists(), 30, "the file at n2")
    cluster.start(n3)
    cluster.wait_linked()
    wait_for(lambda: (n3.data / "while-n3-away.txt").exists(), 60, "the file at n3")
    fresh_status([n1])
    after = pushes(n1)["by_peer"]
    assert after["n2"]["carried_paths"] > before["n2"]["carried_paths"]
    assert after["n2"]["sent_paths"] == before["n2"]["sent_paths"]
    assert after["n3"]["sent_paths"] > before["n3"]["sent_paths"]
    assert (n3.data / "while-n3-away.txt").read_bytes() == b"written while n3 was down\n"
    assert (n1.status() or {})["lsyncd"] == lsyncd


def test_one_content_at_many_paths_lands_at_each(cluster: Cluster) -> None:
    """A push's end files one kept object per content: each path that wants it gets a
    copy, and the last takes the object itself out of the keep area (not a copy)."""

    n1 = cluster.nodes[0]
    small, large, alone = b"same small bytes\n", os.urandom(PREHASH_BYTES), os.urandom(5000)
    (n1.data / "dup").mkdir()
    for i in range(4):
        (n1.data / f"dup/small-{i}").write_bytes(small)
    for i in range(2):
        (n1.data / f"dup/large-{i}").write_bytes(large)
    (n1.data / "dup/alone").write_bytes(alone)
    cluster.wait_converged()
    tree = cluster.tree(cluster.nodes[1])
    assert sum(1 for p in tree if p.startswith("dup/")) == 7
    for peer in cluster.nodes[1:]:
        objects = peer.data / ".mesh-keep" / "objects"
        kept = {p.name for p in objects.iterdir()}
        assert hashlib.sha256(alone).hexdigest() not in kept, "taken, not copied"
        assert (peer.data / "dup/alone").read_bytes() == alone
