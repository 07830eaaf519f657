"""Real agents (processes), real lsyncd, real rsync over TLS, 3 nodes on 127.0.0.x."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.adapters.fs.scanner import PREHASH_BYTES
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


def test_each_version_moves_once_per_peer(cluster: Cluster) -> None:
    """The writer's agent pushes its write at once; lsyncd's gate, asked for the same
    path a second later, is denied: one push per peer, not two (DESIGN.md, who pushes)."""
    n1, n2, n3 = cluster.nodes

    def pushes(node: Node) -> dict[str, Any]:
        status = node.status()
        assert status is not None
        return status["pushes"]  # type: ignore[no-any-return]

    received = {n.name: pushes(n)["received"] for n in (n2, n3)}
    denied = pushes(n1)["denied"]
    data = os.urandom(1 << 20)
    (n1.data / "once.bin").write_bytes(data)
    wait_for(lambda: all((n.data / "once.bin").exists()
                         and (n.data / "once.bin").read_bytes() == data for n in (n2, n3)),
             30, "the file at both peers")
    wait_for(lambda: pushes(n1)["denied"] >= denied + 2, 30, "lsyncd's gate asked for both peers")
    asked = time.time()
    wait_for(lambda: all((n.status() or {}).get("now", 0) > asked for n in (n2, n3)), 10,
             "fresh status from the peers")
    assert {n.name: pushes(n)["received"] - received[n.name] for n in (n2, n3)} == {
        "n2": 1, "n3": 1}


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
