"""``mesh gate`` as lsyncd runs it: the real command line and NUL patterns on stdin, a real
agent socket (``GateServer``), real rsync and the real tunnel to a receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from mesh.adapters import lsyncd, rsyncd
from mesh.adapters.tunnel import TunnelServer, credentials_env
from mesh.errors import MeshError
from mesh.gate import EXIT_RETRY, EXIT_USAGE, GateServer, PushGrant, hold_grant, request_grant
from tests.integration.conftest import GrantPolicy, Pki, RecordingSink, until

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


async def run_gate(
    argv: list[str], stdin: bytes, socket_path: Path, source: Path, cluster_pki: Pki
) -> tuple[int, list[str]]:
    env = {
        "PATH": os.environ["PATH"],
        "MESH_GATE_SOCKET": str(socket_path),
        "MESH_DATA_DIR": str(source),
        **credentials_env(cluster_pki.creds(SENDER)),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh.cli_gate", "gate", *argv,
        stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    _, errors = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, errors.decode().splitlines()


def make_dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    source, target = tmp_path / "A", tmp_path / "B"
    source.mkdir()
    target.mkdir()
    return source, target, tmp_path / "agent.sock"


async def test_gate_pushes_only_what_the_agent_allows(cluster_pki: Pki, tmp_path: Path) -> None:
    source, target, socket_path = make_dirs(tmp_path)
    (source / "dir").mkdir()
    (source / "dir" / "sent [1].txt").write_bytes(b"allowed")
    (source / "held.txt").write_bytes(b"not allowed")
    (target / "gone.txt").write_bytes(b"deleted at A, delete allowed")
    (target / "kept.txt").write_bytes(b"deleted at A, delete not allowed")
    allowed = {"dir", "dir/sent [1].txt", "gone.txt"}
    sink = RecordingSink(target)
    tunnel = TunnelServer(cluster_pki.creds(RECEIVER), "127.0.0.1", 0, target, target / KEEP, sink)
    async with tunnel:
        policy = GrantPolicy({RECEIVER: tunnel.address}, lambda _, ps: sorted(allowed & set(ps)))
        async with GateServer(socket_path, policy):
            stdin = patterns(
                "/", "/dir/", r"/dir/sent \[1].txt", "/held.txt", "/gone.txt", "/kept.txt"
            )
            returncode, lines = await run_gate(
                lsyncd_argv(source), stdin, socket_path, source, cluster_pki
            )
    assert (returncode, lines) == (0, [])
    assert policy.calls == [
        (RECEIVER, ["dir", "dir/sent [1].txt", "gone.txt", "held.txt", "kept.txt"])
    ]
    # rsync lands a push in its staging dir only (mesh.core.landing); deletes and the
    # move into place are the receiving agent's, from the push's announcement.
    staged = target / KEEP / "in" / sink.pushes[0].push_id
    assert (staged / "dir" / "sent [1].txt").read_bytes() == b"allowed"
    assert not (staged / "held.txt").exists()
    assert not (staged / "gone.txt").exists() and not (staged / "kept.txt").exists()
    assert not (target / "dir").exists()
    assert (target / "gone.txt").read_bytes() == b"deleted at A, delete allowed"
    assert (target / "kept.txt").read_bytes() == b"deleted at A, delete not allowed"
    assert [p.returncode for p in sink.pushes] == [0]


async def test_gate_runs_nothing_when_nothing_is_allowed(cluster_pki: Pki, tmp_path: Path) -> None:
    source, _, socket_path = make_dirs(tmp_path)
    (source / "f").write_bytes(b"x")
    # Port 9 (discard): nothing listens, so any push attempt would fail loudly.
    policy = GrantPolicy({RECEIVER: ("127.0.0.1", 9)}, lambda _, __: [])
    async with GateServer(socket_path, policy):
        result = await run_gate(
            lsyncd_argv(source), patterns("/", "/f"), socket_path, source, cluster_pki
        )
    assert result == (0, [])
    assert policy.calls == [(RECEIVER, ["f"])]


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
    ],
)
async def test_gate_refuses_a_command_line_it_does_not_know(
    cluster_pki: Pki, tmp_path: Path, argv: list[str]
) -> None:
    source, _, socket_path = make_dirs(tmp_path)
    argv = [arg.replace("{source}", str(source)) for arg in argv]
    policy = GrantPolicy({})
    async with GateServer(socket_path, policy):
        stdin = patterns("/", "/f")
        returncode, lines = await run_gate(argv, stdin, socket_path, source, cluster_pki)
    assert returncode == EXIT_USAGE
    assert len(lines) == 1 and lines[0].startswith("mesh gate: "), lines
    assert policy.calls == []


async def test_gate_without_agent_fails_for_a_retry(cluster_pki: Pki, tmp_path: Path) -> None:
    source, _, socket_path = make_dirs(tmp_path)
    returncode, lines = await run_gate(
        lsyncd_argv(source), patterns("/", "/f"), socket_path, source, cluster_pki
    )
    assert returncode == EXIT_RETRY
    assert len(lines) == 1, lines
    assert str(socket_path) in lines[0] and "No such file" in lines[0]


async def test_gate_server_refuses_bad_requests_and_bad_grants(tmp_path: Path) -> None:
    socket_path = tmp_path / "agent.sock"

    class Greedy:
        async def authorize(self, target: str, paths: list[str]) -> PushGrant:
            if target == "broken":
                raise MeshError("index unavailable")
            return PushGrant(target, "127.0.0.1", 1, "p1", [*paths, "extra"], b"")

    async with GateServer(socket_path, Greedy()):
        assert socket_path.stat().st_mode & 0o777 == 0o600
        for target, paths, reason in [
            ("bravo", ["a"], "not asked about"),
            ("broken", ["a"], "index unavailable"),
            ("bravo", ["../etc"], "not normalized"),
            ("bra/vo", ["a"], "invalid target"),
        ]:
            with pytest.raises(MeshError, match=reason):
                await request_grant(socket_path, target, paths)
    assert not socket_path.exists()


# --- lsyncd's patterns and ours (no I/O but the source's lstat) -----------------------------


def test_lsyncd_patterns_become_paths() -> None:
    data = patterns(
        "/", "/a/", "/a/b/", r"/a/b/we ird\*\?\[x].txt", "/gone/***", "/gone/sub/***",
        "/moved-from", "/moved-to", "/back\\slash", "/new\nline", "/\\\\*",
    )  # fmt: skip
    assert lsyncd.paths_from_patterns(data) == sorted(
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
    call = lsyncd.parse_rsync_call(lsyncd_argv(Path("/data"), lsyncd.target_of("node-2.x")))
    assert call == lsyncd.RsyncCall(Path("/data/"), "node-2.x")


async def test_a_grant_is_held_until_the_gate_closes(tmp_path: Path) -> None:
    """The agent learns when lsyncd's push is over: the gate keeps its connection open
    while it pushes (``hold_grant``), and ``finished`` runs when it closes."""
    socket_path = tmp_path / "agent.sock"
    done: list[PushGrant] = []

    class Some:
        async def authorize(self, target: str, paths: list[str]) -> PushGrant:
            allowed = [p for p in paths if p != "held"]
            return PushGrant(target, "127.0.0.1", 1, f"p-{len(paths)}", allowed, b"")

    async with GateServer(socket_path, Some(), finished=done.append):
        async with hold_grant(socket_path, "bravo", ["a", "held"]) as grant:
            assert grant.allowed == ["a"]
            # Another whole request in between gives the server's loop its turns; a grant
            # of nothing (this one) is not held: nothing is on its way.
            assert (await request_grant(socket_path, "bravo", ["held"])).allowed == []
            assert done == []
        await until(lambda: len(done) == 1, "the held grant to be released")
        assert done[0].push_id == "p-2"
