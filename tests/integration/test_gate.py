"""lsyncd's gate as lsyncd runs it: ``lsyncd/gate.pl`` with the real command line and NUL
patterns on stdin, the agent's real socket (``GateServer``), and, behind a fake carrier,
real rsync and the real tunnel to a receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest

from mesh.adapters.lsyncd import call
from mesh.adapters.lsyncd.gate import EXIT_RETRY, EXIT_USAGE, MAGIC, GateLimits, GateServer
from mesh.adapters.lsyncd.supervisor import GATE
from mesh.adapters.rsync import rsyncd
from mesh.adapters.rsync.tunnel import TunnelServer
from mesh.errors import MeshError
from tests.integration.conftest import Pki, RecordingCarrier, RecordingSink, until

pytestmark = pytest.mark.integration

SENDER, RECEIVER = "alpha", "bravo"
KEEP = rsyncd.DEFAULT_KEEP_NAME


def lsyncd_argv(source: Path, target: str = f"{RECEIVER}::data/") -> list[str]:
    """What lsyncd 2.2.3 runs (its flag order varies from run to run)."""
    return [
        "-gstpolD", "-r", "--delete", "--ignore-errors", "--force", "--from0",
        "--include-from=-", "--exclude=*", f"{source}/", target,
    ]  # fmt: skip


def patterns(*items: str) -> bytes:
    return b"".join(os.fsencode(item) + b"\0" for item in items)


async def start_gate(argv: list[str], socket_path: Path | None) -> asyncio.subprocess.Process:
    env = {"PATH": os.environ["PATH"]}
    if socket_path is not None:
        env["MESH_GATE_SOCKET"] = str(socket_path)
    return await asyncio.create_subprocess_exec(
        str(GATE), *argv, stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env,
    )  # fmt: skip


async def run_gate(argv: list[str], stdin: bytes, socket_path: Path | None,
                   ) -> tuple[int, list[str]]:
    proc = await start_gate(argv, socket_path)
    _, errors = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, errors.decode().splitlines()


def make_dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    source, target = tmp_path / "A", tmp_path / "B"
    source.mkdir()
    target.mkdir()
    return source, target, tmp_path / "agent.sock"


async def test_the_gate_hands_the_batch_to_the_agent_which_pushes_what_may_go(
    cluster_pki: Pki, tmp_path: Path
) -> None:
    source, target, socket_path = make_dirs(tmp_path)
    (source / "dir").mkdir()
    (source / "dir" / "sent [1].txt").write_bytes(b"allowed")
    (source / "held.txt").write_bytes(b"not allowed")
    (target / "gone.txt").write_bytes(b"deleted at A, delete allowed")
    allowed = {"dir", "dir/sent [1].txt", "gone.txt"}
    sink = RecordingSink(target)
    tunnel = TunnelServer(cluster_pki.creds(RECEIVER), "127.0.0.1", 0, target, target / KEEP, sink)
    async with tunnel:
        carrier = RecordingCarrier({RECEIVER: tunnel.address},
                                   lambda _, ps: sorted(allowed & set(ps)), source=source,
                                   creds=cluster_pki.creds(SENDER))
        server = GateServer(socket_path, source, carrier)
        await server.start()
        try:
            stdin = patterns("/", "/dir/", r"/dir/sent \[1].txt", "/held.txt", "/gone.txt")
            result = await run_gate(lsyncd_argv(source), stdin, socket_path)
        finally:
            await server.stop()
    assert result == (0, [])
    assert carrier.calls == [(RECEIVER, ["dir", "dir/sent [1].txt", "gone.txt", "held.txt"])]
    assert [code for _, code in carrier.pushes] == [0]  # the agent knows how rsync ended
    # rsync lands a push in its staging dir only (mesh.core.landing); deletes and the
    # move into place are the receiving agent's, from the push's announcement.
    staged = target / KEEP / "in" / sink.pushes[0].push_id
    assert (staged / "dir" / "sent [1].txt").read_bytes() == b"allowed"
    assert not (staged / "held.txt").exists() and not (staged / "gone.txt").exists()
    assert (target / "gone.txt").read_bytes() == b"deleted at A, delete allowed"
    assert server.counters.batches == 1 and server.counters.refused == 0


async def test_the_gate_exits_only_when_the_agent_is_done_with_the_batch(
    cluster_pki: Pki, tmp_path: Path
) -> None:
    """lsyncd starts a peer's next batch when the gate exits: the changes made while a
    push runs go together in the next one."""
    source, _, socket_path = make_dirs(tmp_path)
    carrier = RecordingCarrier()
    carrier.gate = asyncio.Event()
    server = GateServer(socket_path, source, carrier)
    await server.start()
    try:
        proc = await start_gate(lsyncd_argv(source), socket_path)
        assert proc.stdin is not None
        proc.stdin.write(patterns("/", "/f"))
        proc.stdin.close()
        await until(lambda: bool(carrier.calls), "the batch to reach the agent")
        with pytest.raises(TimeoutError):  # the agent holds the batch: the gate waits
            await asyncio.wait_for(proc.wait(), 0.5)
        carrier.gate.set()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        await server.stop()


@pytest.mark.parametrize(
    "argv",
    [
        ["-gstpolD", "-r", "--inplace", "--force", "--from0", "--include-from=-", "--exclude=*"],
        lsyncd_argv(Path("/elsewhere")),
        lsyncd_argv(Path("{source}"), target="bravo:data/"),
        lsyncd_argv(Path("{source}"), target="../x::data/"),
        ["-gstpolDgg", *lsyncd_argv(Path("{source}"))[1:]],
        lsyncd_argv(Path("{source}"))[:-1],
        ["--rsh=sh -c 'rm -rf /'", *lsyncd_argv(Path("{source}"))],
        [],
    ],
)
async def test_a_command_line_the_agent_does_not_know_stops_lsyncd(
    cluster_pki: Pki, tmp_path: Path, argv: list[str]
) -> None:
    source, _, socket_path = make_dirs(tmp_path)
    argv = [arg.replace("{source}", str(source)) for arg in argv]
    carrier = RecordingCarrier()
    server = GateServer(socket_path, source, carrier)
    await server.start()
    try:
        returncode, lines = await run_gate(argv, patterns("/", "/f"), socket_path)
    finally:
        await server.stop()
    assert returncode == EXIT_USAGE  # lsyncd's "critical": it exits and is restarted
    assert len(lines) == 1 and lines[0].startswith("mesh gate: "), lines
    assert carrier.calls == [] and server.counters.refused == 1


async def test_without_the_agent_the_gate_fails_for_a_retry(tmp_path: Path) -> None:
    source, _, socket_path = make_dirs(tmp_path)
    returncode, lines = await run_gate(lsyncd_argv(source), patterns("/", "/f"), socket_path)
    assert returncode == EXIT_RETRY
    assert len(lines) == 1, lines
    assert str(socket_path) in lines[0] and "No such file" in lines[0]
    returncode, lines = await run_gate([], b"", None)
    assert returncode == EXIT_RETRY and "MESH_GATE_SOCKET" in lines[0], lines


class Failing:
    async def carry(self, peer: str, paths: list[str]) -> None:
        raise MeshError("index unavailable")


async def ask(socket_path: Path, request: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    writer.write(request)
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


def field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


async def test_the_server_refuses_what_is_not_a_gate_request(tmp_path: Path) -> None:
    source, _, socket_path = make_dirs(tmp_path)
    command = "\0".join(lsyncd_argv(source)).encode()
    limits = GateLimits(request_timeout=0.5, max_patterns_bytes=64)
    server = GateServer(socket_path, source, Failing(), limits=limits)
    await server.start()
    try:
        assert socket_path.stat().st_mode & 0o777 == 0o600
        for request, status, reason in [
            (MAGIC + field(command) + field(b"/\0/a\0"), EXIT_RETRY, b"index unavailable"),
            (b"mesh-gate 1\n" + field(command) + field(b"/a\0"), EXIT_USAGE, b"version 2"),
            (MAGIC + field(command) + field(b"x" * 65), EXIT_USAGE, b"exceeds 64"),
            (MAGIC + field(command), EXIT_RETRY, b"cut short"),
            (MAGIC + field(command) + field(b"/\0"), 0, b""),  # nothing named: nothing to do
        ]:
            answer = await ask(socket_path, request)
            assert answer.startswith(f"{status}\n".encode()) and reason in answer, answer
    finally:
        await server.stop()
    assert not socket_path.exists()


# --- lsyncd's patterns and ours (no I/O but the source's lstat) -----------------------------


def test_lsyncd_patterns_become_paths() -> None:
    data = patterns(
        "/", "/a/", "/a/b/", r"/a/b/we ird\*\?\[x].txt", "/gone/***", "/gone/sub/***",
        "/moved-from", "/moved-to", "/back\\slash", "/new\nline", "/\\\\*",
    )  # fmt: skip
    assert call.paths_from_patterns(data) == sorted(
        [
            "a", "a/b", "a/b/we ird*?[x].txt", "gone", "gone/sub", "moved-from", "moved-to",
            "back\\slash", "new\nline", "\\*",
        ]
    )  # fmt: skip


def test_include_patterns_match_exactly_the_paths(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f*").write_bytes(b"")
    got = rsyncd.include_patterns(["d", "d/f*", "gone", "back\\slash"], tmp_path)
    assert got == ["/", "/d/", "/d/f\\*"]  # what the sender lacks is not sent


def test_lsyncd_target_round_trips() -> None:
    parsed = call.parse_rsync_call(lsyncd_argv(Path("/data"), call.target_of("node-2.x")))
    assert parsed == call.RsyncCall(Path("/data/"), "node-2.x")
