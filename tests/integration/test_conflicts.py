"""Concurrent writes on real agents: one winner by the rule, the loser kept, every node
logging the same conflict (DESIGN.md, "Versions and the resolution rule"; invariants 1-3).

Three agents as processes (``tests.cluster``), real lsyncd, real rsync over the TLS tunnel.
Each node's state database is read read-only (``mode=ro``) while its agent runs. The
helpers here are shared with ``test_data_faults``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest

from mesh.core.manifest import entry_from_wire
from mesh.core.resolver import Conflict, Rule, resolve
from tests.cluster import Cluster, Node, running, wait_for

pytestmark = pytest.mark.integration

NETS = ("127.0.7", "127.0.8")  # nodes, proxies: see ``Cluster.nets``


# --- shared helpers ---------------------------------------------------------------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def state_db(node: Node) -> Iterator[sqlite3.Connection]:
    """The node's state database, read-only (the agent may be writing it)."""
    db = sqlite3.connect(f"{(node.state / 'state.db').as_uri()}?mode=ro", uri=True)
    try:
        yield db
    finally:
        db.close()


@dataclass(frozen=True)
class Row:
    """One path of a node's ``versions`` table."""

    vector: dict[str, int]
    hashes: tuple[str | None, ...]  # hex, of every head (None: a delete)


def versions(node: Node, paths: list[str] | None = None) -> dict[str, Row]:
    """path -> its disk version, as the node's index holds it."""
    with state_db(node) as db:
        rows: list[Any] = db.execute("SELECT path, heads, vector FROM versions").fetchall()
    out = {}
    for path, heads_blob, vector_blob in rows:
        if paths is not None and path not in paths:
            continue
        heads = [entry_from_wire(raw) for raw in msgpack.unpackb(heads_blob)]
        out[path] = Row(msgpack.unpackb(vector_blob),
                        tuple(None if h.hash is None else h.hash.hex() for h in heads))
    return out


def conflicts(node: Node) -> dict[str, Conflict]:
    """id -> conflict, as the node logged it; the stored rule and copy path must be what
    the resolver derives from the two versions."""
    with state_db(node) as db:
        rows: list[Any] = db.execute(
            "SELECT id, path, rule, copy_path, winner, loser FROM conflicts").fetchall()
    out = {}
    for cid, path, rule, copy_path, winner, loser in rows:
        c = resolve(entry_from_wire(msgpack.unpackb(winner)),
                    entry_from_wire(msgpack.unpackb(loser)))
        assert isinstance(c, Conflict), f"{node.name} logged a non-conflict on {path}"
        assert (c.id, c.path, c.rule.value, c.copy_path) == (cid, path, rule, copy_path)
        out[cid] = c
    return out


def conflicts_on(node: Node, path: str) -> dict[str, Conflict]:
    return {i: c for i, c in conflicts(node).items() if c.path == path}


def check_rule(c: Conflict) -> None:
    """The winner is the one DESIGN.md's rule picks, for the reason recorded."""
    w, lo = c.winner, c.loser
    if w.deleted != lo.deleted:
        assert not w.deleted and c.rule is Rule.EDIT_BEATS_DELETE
    elif w.hlc != lo.hlc:
        assert w.hlc > lo.hlc and c.rule is Rule.LATER_WRITE
    else:
        assert w.writer > lo.writer and c.rule is Rule.LARGER_NODE


def same_everywhere(cluster: Cluster, paths: list[str]) -> bool:
    """Identical trees, and identical versions of ``paths`` in every index."""
    if not cluster.converged():
        return False
    views = [versions(n, paths) for n in cluster.nodes if n.alive()]
    return all({p: r.vector for p, r in v.items()} == {p: r.vector for p, r in views[0].items()}
               for v in views[1:])


def seed(cluster: Cluster, node: Node, rel: str, data: bytes) -> None:
    """Write ``rel`` on ``node`` and wait until every node holds and indexed it."""
    (node.data / rel).write_bytes(data)
    wait_for(lambda: same_everywhere(cluster, [rel])
             and all(rel in versions(n, [rel]) for n in cluster.nodes), 30, f"{rel} everywhere")


def lsyncd_of(node: Node) -> tuple[int | None, list[str]]:
    """(pid, peers) of the node's lsyncd, from its status file."""
    doc = node.status()
    return (None, []) if doc is None else (doc["lsyncd"]["pid"], sorted(doc["lsyncd"]["peers"]))


def lsyncd_kept(cluster: Cluster, before: dict[str, tuple[int | None, list[str]]]) -> None:
    """A cut restarts no lsyncd: each keeps its sync to every peer that said hello, and
    the agent refuses its batches to a peer it cannot reach (a restart would kill the
    pushes lsyncd runs and miss the writes made meanwhile)."""
    assert all(before[n.name][0] is not None for n in cluster.nodes), before
    wait_for(lambda: all(lsyncd_of(n) == before[n.name] for n in cluster.nodes), 10,
             "each lsyncd as before the cut")


def leftovers(node: Node) -> list[str]:
    """What the keep area holds besides its objects: pushes not finished (yet), staged
    in ``in/`` (or, from releases before issue 11, backup dirs beside it)."""
    keep = node.data / ".mesh-keep"
    staged = {f"in/{p.name}" for p in (keep / "in").iterdir()} if (keep / "in").is_dir() else set()
    return sorted({p.name for p in keep.iterdir()} - {"objects", "tmp", "in"} | staged)


def wait_resolved(cluster: Cluster, path: str, timeout: float = 60) -> Conflict:
    """Wait until every node holds the same tree and versions, logged the same one
    conflict on ``path`` and finished every push; return the conflict."""
    def done() -> bool:
        logged = [conflicts_on(n, path) for n in cluster.nodes]
        return bool(logged[0]) and all(c == logged[0] for c in logged[1:]) \
            and same_everywhere(cluster, [path]) \
            and not any(leftovers(n) for n in cluster.nodes)

    wait_for(done, timeout, f"one conflict on {path} resolved alike everywhere", step=0.2)
    logged = conflicts_on(cluster.nodes[0], path)
    assert len(logged) == 1, f"expected one conflict on {path}, got {list(logged.values())}"
    return next(iter(logged.values()))


def check_kept(cluster: Cluster, path: str, c: Conflict, written: dict[str, bytes]) -> None:
    """Winner's bytes at ``path`` and the loser's at its conflict copy, on every node,
    with the same vector everywhere; ``written``: writer node -> what it wrote."""
    check_rule(c)
    assert c.copy_path is not None
    assert {c.winner.writer, c.loser.writer} == set(written)
    for node in cluster.nodes:
        tree = cluster.tree(node)
        assert tree[path][2] == sha(written[c.winner.writer]), f"winner on {node.name}"
        assert tree[c.copy_path][2] == sha(written[c.loser.writer]), f"copy on {node.name}"
        assert [p for p in tree if ".conflict-" in p] == [c.copy_path], node.name
    rows = [versions(n, [path])[path] for n in cluster.nodes]
    assert rows[0].vector == c.winner.vector.merge(c.loser.vector).to_dict()


# --- tests ------------------------------------------------------------------------------


def test_same_new_path_written_on_two_nodes(tmp_path: Path) -> None:
    with running(tmp_path, nets=NETS) as cluster:
        n1, n2, _ = cluster.nodes
        written = {"n1": b"n1 was here first\n", "n2": b"no, n2 was\n"}
        # Both writes land before either agent can scan, so neither saw the other.
        (n1.data / "notes.txt").write_bytes(written["n1"])
        (n2.data / "notes.txt").write_bytes(written["n2"])
        c = wait_resolved(cluster, "notes.txt")
        check_kept(cluster, "notes.txt", c, written)


def test_same_existing_file_edited_on_two_nodes(tmp_path: Path) -> None:
    with running(tmp_path, nets=NETS) as cluster:
        n1, n2, n3 = cluster.nodes
        seed(cluster, n3, "report.md", b"# draft\n")
        drafted = versions(n3, ["report.md"])["report.md"].vector
        # Different sizes: same-size edits are test_same_size_edit_in_the_same_second's.
        written = {"n1": b"# draft\nedited on n1\n", "n2": b"# draft\nrewritten on n2\n"}
        (n2.data / "report.md").write_bytes(written["n2"])
        (n1.data / "report.md").write_bytes(written["n1"])
        c = wait_resolved(cluster, "report.md")
        check_kept(cluster, "report.md", c, written)
        # Both saw n3's draft, and nothing after it.
        assert c.loser.vector.get("n3") == c.winner.vector.get("n3") == drafted["n3"]


def test_edit_beats_a_concurrent_delete(tmp_path: Path) -> None:
    with running(tmp_path, nets=NETS) as cluster:
        n1, n2, n3 = cluster.nodes
        seed(cluster, n1, "plan.txt", b"v1\n")
        edit = b"v2, edited on n2 while cut off\n"
        before = {n.name: lsyncd_of(n) for n in cluster.nodes}
        cluster.partition([n2])
        lsyncd_kept(cluster, before)
        (n1.data / "plan.txt").unlink()
        (n2.data / "plan.txt").write_bytes(edit)
        # Both changes are recorded before the two sides hear of each other.
        wait_for(lambda: not (n3.data / "plan.txt").exists(), 30, "the delete reached n3")
        wait_for(lambda: versions(n2, ["plan.txt"])["plan.txt"].hashes == (sha(edit),), 30,
                 "n2 recorded its edit")
        cluster.heal()
        c = wait_resolved(cluster, "plan.txt")
        check_rule(c)
        assert c.rule is Rule.EDIT_BEATS_DELETE and c.copy_path is None
        assert (c.winner.writer, c.loser.writer, c.loser.deleted) == ("n2", "n1", True)
        for node in cluster.nodes:
            assert cluster.tree(node)["plan.txt"][2] == sha(edit), node.name
        assert not any(".conflict-" in p for p in cluster.tree(n1))


def test_same_size_edit_in_the_same_second_reaches_every_peer(tmp_path: Path) -> None:
    with running(tmp_path, nets=NETS) as cluster:
        n1, _, _ = cluster.nodes
        seed(cluster, n1, "counter.txt", b"1\n")
        counter = n1.data / "counter.txt"
        before = counter.stat()
        counter.write_bytes(b"2\n")
        # What two saves within one second look like to rsync (or `cp -p`, `tar x`):
        # same size, same mtime.
        os.utime(counter, ns=(before.st_atime_ns, before.st_mtime_ns))
        wait_for(lambda: same_everywhere(cluster, ["counter.txt"]), 15, "the edit everywhere")
        for node in cluster.nodes:
            assert (node.data / "counter.txt").read_bytes() == b"2\n", node.name
