"""Bounded disk on a real 3-node cluster (issue 14): with --keep-for 0 the keep areas
empty once the peers confirmed; by default a deleted file is listed and restored on
every node; a node away longer than --forget-after does not bring a delete back."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mesh.cli import app
from mesh.engine.keep import KEEP_NAME
from tests.cluster import Node, running, wait_for

pytestmark = pytest.mark.integration

runner = CliRunner()
MIB = 1 << 20
NETS = ("127.0.41", "127.0.42")  # networks of this file's own (tests/cluster.py)


def mesh(node: Node, *args: str) -> Any:
    result = runner.invoke(app, [*args, "--state-dir", str(node.state)])
    assert result.exit_code == 0, result.output
    return result


def objects_bytes(node: Node) -> int:
    total = 0
    for entry in os.scandir(node.data / KEEP_NAME / "objects"):
        total += entry.stat(follow_symlinks=False).st_size
    return total


def keep_doc(node: Node) -> dict[str, Any]:
    doc = node.status()
    return {} if doc is None else dict(doc.get("keep") or {})


def write_big(path: Path, size: int) -> None:
    block = hashlib.sha256(b"seed").digest() * (MIB // 32)
    with path.open("wb") as f:
        for i in range(size // MIB):
            f.write(i.to_bytes(8, "big") + block[8:])


def test_keep_for_0_empties_every_keep_area_once_the_peers_confirmed(tmp_path: Path) -> None:
    """The issue's benchmark: a 256 MiB file written, patched and deleted on one node of
    three; every node's keep area back under 1 MiB, and the delete's tombstone gone."""
    args = ["--keep-for", "0", "--max-clock-skew", "1"]
    with running(tmp_path, nets=NETS, extra_args=args) as c:
        c.wait_linked()
        n1 = c.nodes[0]
        big = n1.data / "big.bin"
        write_big(big, 256 * MIB)
        c.wait_converged(timeout=300)
        with big.open("r+b") as f:  # patched in place: 1 MiB in the middle
            f.seek(128 * MIB)
            f.write(b"\xff" * MIB)
        c.wait_converged(timeout=300)
        big.unlink()
        c.wait_converged(timeout=120)
        for node in c.nodes:
            wait_for(lambda node=node: objects_bytes(node) < MIB, 120,
                     f"{node.name}'s keep area under 1 MiB")
            wait_for(lambda node=node: keep_doc(node).get("tombstones_collected", 0) >= 1,
                     60, f"{node.name} to collect the tombstone of big.bin")
        for node in c.nodes[1:]:  # n1 replaced nothing: its user did, in place
            assert keep_doc(node)["freed_bytes"] >= 2 * 256 * MIB


def test_a_deleted_file_is_listed_and_restored_on_every_node(tmp_path: Path) -> None:
    with running(tmp_path, nets=NETS) as c:
        c.wait_linked()
        n1, n2, n3 = c.nodes
        (n1.data / "docs").mkdir()
        (n1.data / "docs/report.txt").write_bytes(b"quarterly numbers\n" * 1000)
        c.wait_converged()
        (n2.data / "docs/report.txt").unlink()
        c.wait_converged()
        assert all(not (n.data / "docs/report.txt").exists() for n in c.nodes)
        listed = [json.loads(line) for line in
                  mesh(n3, "versions", "--deleted", "--json").stdout.splitlines()]
        assert [d["path"] for d in listed] == ["docs/report.txt"]
        assert listed[0]["deleted_by"] == "n2" and listed[0]["held"]
        versions = json.loads(mesh(n3, "versions", "docs/report.txt", "--json").stdout)
        assert versions["now"]["deleted"] and versions["versions"][0]["reason"] == "deleted"
        out = mesh(n3, "restore", "docs/report.txt", "--version",
                   versions["versions"][0]["id"]).stdout
        assert "restored version" in out
        c.wait_converged()
        for node in c.nodes:
            assert (node.data / "docs/report.txt").read_bytes() == b"quarterly numbers\n" * 1000


def test_a_node_away_longer_than_forget_after_does_not_bring_a_delete_back(
        tmp_path: Path) -> None:
    """n3 stops; n1 deletes f; n1 and n2 forget n3 after 3 s of not hearing it and
    collect the tombstone. n3 comes back holding f: f is deleted again on every node
    (n3 keeps its copy as a deleted version), not brought back."""
    args = ["--forget-after", "3s", "--max-clock-skew", "1"]
    with running(tmp_path, nets=NETS, extra_args=args) as c:
        c.wait_linked()
        n1, n2, n3 = c.nodes
        (n1.data / "f").write_text("deleted while n3 was away\n")
        (n1.data / "g").write_text("stays\n")
        c.wait_converged()
        c.stop(n3)
        (n1.data / "f").unlink()
        for node in (n1, n2):
            wait_for(lambda node=node: "n3" in keep_doc(node).get("forgotten_peers", []),
                     60, f"{node.name} to forget n3")
            wait_for(lambda node=node: keep_doc(node).get("tombstones_collected", 0) >= 1,
                     60, f"{node.name} to collect the tombstone of f")
        c.start(n3)
        c.wait_linked()
        wait_for(lambda: not (n3.data / "f").exists(), 60, "n3 to delete f")
        c.wait_converged()
        assert all(not (n.data / "f").exists() for n in c.nodes)
        assert all((n.data / "g").exists() for n in c.nodes)
        kept = json.loads(mesh(n3, "versions", "f", "--json").stdout)["versions"]
        assert kept and kept[0]["reason"] == "deleted"
