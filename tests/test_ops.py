"""Operator tooling without a cluster: tree sums, wire messages, the control socket, the
metrics endpoint, health rules, and what every command says when no agent runs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest
import typer
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from mesh.cli import app
from mesh.cli import conflicts as cli_conflicts
from mesh.cli import ops as cli_ops
from mesh.cli import reach as cli_reach
from mesh.core import manifest, tree, wire
from mesh.core.manifest import Entry, Kind, Manifest
from mesh.core.resolver import Conflict, Version, resolve
from mesh.core.vclock import VersionVector, hlc_pack
from mesh.engine.ops import control, health, metrics
from mesh.errors import RemoteProtocolError
from mesh.store.index import Index
from tests.core.strategies import entries

runner = CliRunner()


def e(path: str, vector: dict[str, int], content: int | None, writer: str = "n1",
      hlc: int = 0, size: int = 3) -> Entry:
    digest = None if content is None else bytes([content]) * 32
    return Entry(path, VersionVector.of(vector), digest, size, 0, 0o644, Kind.FILE, hlc, writer)


# --- tree sums (mesh.core.tree) -----------------------------------------------------------


def test_tree_sums_locate_the_folder_and_name_the_path() -> None:
    same = [e("top.txt", {"n1": 1}, 1), e("docs/b", {"n2": 1}, 2, "n2")]
    n1 = [*same, e("docs/a", {"n1": 2}, 3)]
    n2 = [*same, e("docs/a", {"n1": 1}, 4)]
    n3 = [*same, e("docs/gone", {"n3": 2}, None, "n3")]  # a tombstone does not count
    sums = {"n1": tree.folder_sums(n1), "n2": tree.folder_sums(n2), "n3": tree.folder_sums(n3)}
    assert tree.differing_folders(sums) == ["docs"]
    diffs = tree.differences({"n1": n1, "n2": n2, "n3": n3})
    assert [d.path for d in diffs] == ["docs/a"]
    assert diffs[0].held["n3"] is None
    assert diffs[0].held["n1"] == n1[2] and diffs[0].held["n2"] == n2[2]


def test_same_content_under_another_vector_differs() -> None:
    a, b = [e("x", {"n1": 1}, 1)], [e("x", {"n1": 1, "n2": 1}, 1)]
    assert tree.differing_folders({"a": tree.folder_sums(a), "b": tree.folder_sums(b)}) == [""]
    assert [d.path for d in tree.differences({"a": a, "b": b})] == ["x"]


@given(st.lists(entries(), max_size=20, unique_by=lambda x: x.path), st.randoms())
def test_equal_trees_never_differ_whatever_the_order(items: list[Entry], rnd: Any) -> None:
    shuffled = list(items)
    rnd.shuffle(shuffled)
    sums = {"a": tree.folder_sums(items), "b": tree.folder_sums(shuffled)}
    assert tree.differing_folders(sums) == []
    assert tree.differences({"a": items, "b": shuffled}) == []


@pytest.mark.parametrize("message", [
    wire.TreeRequest(7),
    wire.TreeReply(7, (("", 2**64 - 1, 3), ("docs/sub", 12, 1)), True),
    wire.ListingRequest(8, ("", "docs")),
], ids=lambda m: type(m).__name__)
def test_verify_messages_round_trip(message: wire.Message) -> None:
    assert wire.decode(wire.encode(message)) == message


@pytest.mark.parametrize("folder", ["../up", "/abs", "a//b", 3])
def test_verify_messages_refuse_bad_folders(folder: object) -> None:
    bad = msgpack.packb({"t": "ls?", "rid": 1, "under": [folder]})
    with pytest.raises(RemoteProtocolError):
        wire.decode(bad)


# --- health, lag and --since --------------------------------------------------------------


def status_doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "node": "n1", "cluster": "c", "pid": os.getpid(), "epoch": 1,
        "started": time.time() - 5, "now": time.time(), "broker": "127.0.0.1:8883",
        "seq": 4, "backlog": 0, "index_size": 7, "pending_content": 0, "watches": 2,
        "wants": 0, "metrics": None, "data_dir": "/d",
        "peers": {"127.0.0.12:8883": {
            "node": "n2", "state": "up", "since": time.time() - 3, "last_message": time.time(),
            "reconnects": 0, "error": None, "applied_seq": 3, "epoch": 1, "manifests": 3,
            "resyncs": 1, "catching_up": False, "inbox_pending": 0}},
        "pushes": {"allowed": 5, "denied": 1, "received": 2, "pending": {"n2": 0}},
        "lsyncd": {"pid": None, "peers": []},
    }
    doc.update(over)
    return doc


def test_health_rules() -> None:
    assert health.health_problems(status_doc(), 0) == []
    doc = status_doc(pending_content=3, backlog=1)
    assert health.health_problems(doc, 4) == []
    assert health.health_problems(doc, 3) == [
        "lag 4 > 3 (unpublished 1, waiting for content 3)"]
    doc["peers"]["127.0.0.12:8883"]["state"] = "connecting"
    assert health.health_problems(doc, 10) == ["link to n2 is connecting"]
    # Issue 16: the loop now serves the status while the start-up scan runs.
    assert health.health_problems(status_doc(scanning=True), 0) == ["start-up scan running"]


def test_what_is_stalled_no_longer_counts_against_health_and_is_named(tmp_path: Path) -> None:
    """Issue 13: 8,192 paths announced by n9 and never delivered, and a queue to a peer
    with no tunnel, held health down for good."""
    stalled = {"after_s": 300, "content": {"n9": 8192}, "content_paths": 8192,
               "queues": {"n9": {"paths": 70, "for_s": 400,
                                 "why": "its hello advertises no tunnel, or its link is down"}}}
    doc = status_doc(pending_content=8195, stalled=stalled,
                     pushes={"allowed": 0, "denied": 0, "received": 0,
                             "pending": {"n2": 1, "n9": 70}})
    assert health.lag_of(doc)["waiting for content"] == 3
    assert health.lag_of(doc)["queued for peers"] == 1
    assert health.health_problems(doc, 100) == []
    doc["peers"]["127.0.0.12:8883"]["catching_up"] = True
    assert health.health_problems(doc, 100) == ["catching up with n2"]
    doc["stalled"]["catch_ups"] = {"n2": 301}
    assert health.health_problems(doc, 100) == []
    assert cli_ops.stalled_notes(doc)[-1] == "the catch-up with n2 has run for 5 min"
    doc["stalled"]["catch_ups"] = {}
    doc["peers"]["127.0.0.12:8883"]["catching_up"] = False
    (tmp_path / "agent.json").write_text(json.dumps(doc))
    result = runner.invoke(app, ["health", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0
    assert result.stdout == (
        "healthy: n1, 1/1 links up, lag 4; stalled, not counted: 8192 paths n9 announced have "
        "not come for over 5 min; 70 paths queued for n9 have not moved for 6 min (its hello "
        "advertises no tunnel, or its link is down)\n")


def test_since_takes_a_duration_or_an_iso_time() -> None:
    now = 1_700_000_000.0
    assert cli_conflicts.parse_since("1h", now) == (now - 3600) * 1000
    assert cli_conflicts.parse_since("90s", now) == (now - 90) * 1000
    assert cli_conflicts.parse_since("2023-11-14T22:13:20Z", now) == 1_700_000_000_000
    assert cli_conflicts.parse_since("2023-11-14T22:13:20", now) == 1_700_000_000_000
    assert cli_conflicts.parse_since("2023-11-14T23:13:20+01:00", now) == 1_700_000_000_000
    with pytest.raises(typer.BadParameter):
        cli_conflicts.parse_since("yesterday", now)


# --- no agent running ---------------------------------------------------------------------

COMMANDS = [["status"], ["status", "--json"], ["verify"], ["conflicts", "list"],
            ["conflicts", "show", "abcd"], ["conflicts", "restore", "abcd"]]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("setup, says", [
    ("none", "no agent is running with state dir"),
    ("dead", "is not running (pid"),
    ("stale", "is not responding: its status was last written"),
    ("garbage", "cannot read the agent's status"),
])
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_missing_agent_is_one_line_and_exit_3(tmp_path: Path, setup: str, says: str,
                                                command: list[str]) -> None:
    status = tmp_path / "agent.json"
    if setup == "dead":
        status.write_text(json.dumps(status_doc(pid=_dead_pid())))
    elif setup == "stale":
        status.write_text(json.dumps(status_doc(now=time.time() - 60)))
    elif setup == "garbage":
        status.write_text("{")
    result = runner.invoke(app, [*command, "--state-dir", str(tmp_path)])
    assert result.exit_code == cli_reach.EXIT_NOT_RUNNING, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and says in result.stderr
    assert "Traceback" not in result.output


def test_health_of_a_missing_agent_is_unhealthy_exit_1(tmp_path: Path) -> None:
    result = runner.invoke(app, ["health"], env={"MESH_STATE_DIR": str(tmp_path)})
    assert result.exit_code == 1
    assert result.stderr.startswith("unhealthy: no agent is running with state dir "
                                    f"{tmp_path}")


def test_a_running_agent_without_its_socket_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "agent.json").write_text(json.dumps(status_doc()))
    result = runner.invoke(app, ["conflicts", "list", "--state-dir", str(tmp_path)])
    assert result.exit_code == cli_reach.EXIT_NOT_RUNNING
    assert result.stderr == (f"error: cannot reach the agent at {tmp_path}/ctl.sock: "
                             "No such file or directory\n")
    healthy = runner.invoke(app, ["health", "--state-dir", str(tmp_path)])
    assert healthy.exit_code == 0 and healthy.stdout == "healthy: n1, 1/1 links up, lag 0\n"


# --- the control socket -------------------------------------------------------------------


def test_control_socket_round_trip(tmp_path: Path) -> None:
    async def echo(args: dict[str, Any]) -> Any:
        return {"got": args}

    async def refuse(args: dict[str, Any]) -> Any:
        raise control.ControlError("no conflict 'x'")

    ops: Any = SimpleNamespace(handlers={"echo": echo, "refuse": refuse})

    async def main() -> None:
        server = control.ControlServer(control.socket_path(tmp_path), ops)
        await server.start()
        try:
            assert oct(control.socket_path(tmp_path).stat().st_mode & 0o777) == "0o600"
            assert await control.ask(tmp_path, "echo", {"a": 1}, within=5) == {"got": {"a": 1}}
            with pytest.raises(control.ControlError, match="no conflict 'x'"):
                await control.ask(tmp_path, "refuse", {}, within=5)
            with pytest.raises(control.ControlError, match="bad request: unknown op 'nope'"):
                await control.ask(tmp_path, "nope", {}, within=5)
        finally:
            await server.stop()
        assert not control.socket_path(tmp_path).exists()
        with pytest.raises(control.AgentUnavailable, match="cannot reach the agent"):
            await control.ask(tmp_path, "echo", {}, within=5)

    asyncio.run(main())


# --- metrics ------------------------------------------------------------------------------


def _index_with_a_conflict() -> Index:
    index = Index(":memory:")
    outcome = resolve(e("p", {"n1": 1}, 1, "n1", hlc=5), e("p", {"n2": 1}, 2, "n2", hlc=9))
    assert isinstance(outcome, Conflict)
    with index.batch():
        index.log_conflict(outcome)
    return index


class _Sink:
    def __init__(self) -> None:
        self.ended: list[int] = []

    async def begin(self, peer: str, push_id: str, header: bytes) -> object:
        return "ticket"

    async def end(self, ticket: object, returncode: int) -> None:
        assert ticket == "ticket"
        self.ended.append(returncode)


def test_metrics_parse_with_prometheus_own_parser() -> None:
    m = metrics.Metrics("n1", status_doc, _index_with_a_conflict())
    now_ms = time.time_ns() // 1_000_000
    m.announced(Version.of(e("p", {"n2": 1}, 2, "n2", hlc=hlc_pack(now_ms - 2000))))
    m.announced(Version.of(e("q", {"n1": 1}, 2, "n1", hlc=hlc_pack(now_ms))))
    sink = _Sink()
    counting = m.counting(sink)
    header = manifest.encode(Manifest("n2", 1, 0, (e("p", {"n2": 1}, 2, "n2", size=1234),)))

    async def push(code: int) -> None:
        await counting.end(await counting.begin("n2", "n2-1-1", header), code)

    asyncio.run(push(0))
    asyncio.run(push(23))
    assert sink.ended == [0, 23]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}
    assert samples[("mesh_conflicts_total", (("rule", "later-write"),))] == 1
    assert samples[("mesh_changes_total", (("origin", "local"),))] == 1
    assert samples[("mesh_changes_total", (("origin", "peer"),))] == 1
    assert samples[("mesh_propagation_lag_seconds_count", ())] == 1
    assert samples[("mesh_propagation_lag_seconds_bucket", (("le", "1.0"),))] == 0
    assert samples[("mesh_propagation_lag_seconds_bucket", (("le", "2.5"),))] == 1
    assert samples[("mesh_push_bytes_total", ())] == 1234
    assert samples[("mesh_rsync_failures_total", ())] == 1
    assert samples[("mesh_pushes_received_total", (("result", "ok"),))] == 1
    assert samples[("mesh_link_up", (("address", "127.0.0.12:8883"), ("peer", "n2")))] == 1
    assert samples[("mesh_push_paths_total", (("decision", "denied"),))] == 1
    assert samples[("mesh_index_paths", ())] == 7
    assert samples[("mesh_inotify_watches", ())] == 2


def test_metrics_endpoint_speaks_http() -> None:
    m = metrics.Metrics("n1", status_doc, Index(":memory:"))

    async def get(port: int, request: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        writer.write_eof()
        data = await reader.read()
        writer.close()
        return data

    async def main() -> None:
        server = metrics.MetricsServer(m, "127.0.0.1", 0)
        await server.start()
        assert server.where is not None
        port = int(server.where.rsplit(":", 1)[1])
        try:
            ok = await get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            head, _, body = ok.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.0 200 OK") and b"text/plain" in head
            names = {f.name for f in text_string_to_metric_families(body.decode())}
            assert {"mesh_conflicts", "mesh_link_up", "mesh_propagation_lag_seconds"} <= names
            assert (await get(port, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.0 404")
            assert (await get(port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(
                b"HTTP/1.0 405")
            assert await get(port, b"garbage without an end") == b""
        finally:
            await server.stop()
        assert server.where is None

    asyncio.run(main())
