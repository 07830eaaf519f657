"""What the harness reads of an agent for a finding (``loadtest.explain``): the index's
rows as an agent left them, read while the index is open for writing, and the log
lines that matter."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest import explain
from mesh.core.resolver import Version
from mesh.core.vclock import VersionVector
from mesh.store.index import Index
from tests.store.test_index import e


def test_a_path_s_rows_are_read_while_the_agent_holds_the_index(tmp_path: Path) -> None:
    index = Index(tmp_path / "state.db")
    try:
        with index.batch():
            index.upsert_versions([Version.of(e({"n1": 2, "n2": 1}, "n1", 7, path="d/f"))])
            index.set_peer_vector("n2", "d/f", VersionVector.of({"n2": 1}))
        rows = explain.index_rows(tmp_path / "state.db", ["d/f", "d/absent"])
    finally:
        index.close()
    disk = rows["d/f"]["disk"]
    assert disk is not None and len(disk) == 1
    assert disk[0]["writer"] == "n1" and disk[0]["vector"] == {"n1": 2, "n2": 1}
    assert disk[0]["hash"] == (bytes([7]) * 32).hex()
    assert rows["d/f"]["peers"] == {"n2": {"n2": 1}}
    assert rows["d/f"]["target"] is None and rows["d/f"]["stat_cache"] is None
    assert rows["d/absent"] == {"disk": None, "target": None, "peers": {}, "stat_cache": None}


def test_the_log_s_warnings_and_lines_naming_a_path_are_kept_and_no_other(
        tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    lines = ["10:00:00.000 n1 INFO    mesh.data: something routine",
             "10:00:01.000 n1 WARNING mesh.push: push to n2: refused",
             "10:00:02.000 n1 INFO    mesh.data: kept the losing version of d/f",
             *(f"10:00:03.{k:03d} n1 INFO    mesh.data: routine {k}" for k in range(100))]
    log.write_text("\n".join(lines) + "\n")
    assert explain.log_lines(log, ["d/f"]) == lines[1:3]
    assert explain.log_lines(tmp_path / "none.log", [])[0].startswith("no log")


def test_the_status_names_what_is_not_done(tmp_path: Path) -> None:
    doc = {"scanning": False, "backlog": 0, "pending_content": 0,
           "peers": {"127.0.0.2:8883": {"node": "n2", "state": "up", "catching_up": True,
                                        "inbox_pending": 0}},
           "pushes": {"pending": {"n2": 3}, "by_peer": {}}, "stalled": None, "wants": 0}
    (tmp_path / "agent.json").write_text(json.dumps(doc))
    said = explain.explain(tmp_path, tmp_path / "agent.log", [])
    assert "catching up with n2" in said["status"]
    assert "queued for peers: {'n2': 3}" in said["status"]
    assert explain.status_lines(None) == ["no status document (agent.json)"]
