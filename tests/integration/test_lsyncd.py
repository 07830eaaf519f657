"""Real lsyncd 2.2.3 with the rendered config and the gate (``lsyncd/gate.pl``), a real
agent socket (``GateServer`` with a fake carrier that pushes through the real executor)
and a real receiver (``TunnelServer``) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from mesh.adapters.fs.beneath import Beneath
from mesh.adapters.lsyncd.agentwrites import AgentWrites
from mesh.adapters.lsyncd.gate import GateServer
from mesh.adapters.lsyncd.supervisor import LsyncdSettings, LsyncdSupervisor, log_level
from mesh.adapters.rsync import rsyncd
from mesh.adapters.rsync.tunnel import TunnelServer
from tests.cluster import wait_for
from tests.integration.conftest import Pki, RecordingCarrier, RecordingSink, until

pytestmark = pytest.mark.integration

SENDER, RECEIVER, OTHER = "alpha", "bravo", "charlie"
KEEP = rsyncd.DEFAULT_KEEP_NAME


@dataclass
class Mesh:
    source: Path
    target: Path
    supervisor: LsyncdSupervisor
    carrier: RecordingCarrier
    sink: RecordingSink
    gate: GateServer


@asynccontextmanager
async def running(
    cluster_pki: Pki, tmp_path: Path, *, blocked: bool = False, folders: int = 0,
    **tuning: float,
) -> AsyncIterator[Mesh]:
    """alpha's lsyncd pushing to bravo (``folders`` empty folders in its tree, ``tuning``
    for LsyncdSettings). The data dir's name has a space, quotes and non-ASCII, which the
    rendered Lua must carry intact."""
    source, target = tmp_path / 'data "A" ü', tmp_path / "B"
    source.mkdir()
    for i in range(folders):
        (source / f"f{i}").mkdir()
    target.mkdir(exist_ok=True)
    sink = RecordingSink(target)
    async with AsyncExitStack() as stack:
        tunnel = TunnelServer(
            cluster_pki.creds(RECEIVER), "127.0.0.1", 0, target, target / KEEP, sink
        )
        await stack.enter_async_context(tunnel)
        carrier = RecordingCarrier(
            {RECEIVER: tunnel.address}, lambda peer, paths: paths if peer == RECEIVER else [],
            source=source, creds=cluster_pki.creds(SENDER),
        )  # fmt: skip
        if blocked:
            carrier.gate = asyncio.Event()
        socket_path = tmp_path / "agent.sock"
        gate = await stack.enter_async_context(GateServer(socket_path, source, carrier))
        settings = LsyncdSettings(source, socket_path, **{
            "backoff": (0.1, 1.0), "stop_timeout": 3, **tuning})  # type: ignore[arg-type]
        (tmp_path / "lsyncd").mkdir(exist_ok=True)
        config = tmp_path / "lsyncd" / "lsyncd.conf.lua"
        supervisor = LsyncdSupervisor(config, [RECEIVER], settings=settings)
        await supervisor.start()
        stack.push_async_callback(supervisor.stop)
        yield Mesh(source, target, supervisor, carrier, sink, gate)


async def poke_until(
    mesh: Mesh, condition: Callable[[str], bool] | None = None, *, within: float = 15.0
) -> None:
    """lsyncd says nothing once its watches are set, so write a probe file until
    ``condition(content)`` holds; by default, until that probe has landed on bravo (in a
    push's staging dir: the receiving agent moves it into place, mesh.core.landing)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    if condition is None:
        condition = lambda content: content in staged(mesh, "probe")  # noqa: E731
    count = 0
    while True:
        count += 1
        content = str(count)
        (mesh.source / "probe").write_text(content)
        try:
            await until(functools.partial(condition, content), "a probe", within=1.5)
            return
        except AssertionError:
            if loop.time() > deadline:
                raise


def staged(mesh: Mesh, rel: str) -> list[str]:
    """What the pushes to bravo staged at ``rel``, one entry per push."""
    return [text for p in sorted((mesh.target / KEEP / "in").glob(f"*/{rel}"))
            if (text := _read(p)) is not None]


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


async def test_a_write_reaches_the_peer_and_a_delete_is_only_announced(
    cluster_pki: Pki, tmp_path: Path
) -> None:
    """rsync stages writes on bravo and never deletes there: a delete goes in the push's
    announcement, and bravo's agent applies it (mesh.core.landing)."""
    async with running(cluster_pki, tmp_path) as mesh:
        (mesh.target / "second").write_text("bravo's copy")
        await poke_until(mesh)
        (mesh.source / "sub" / "dir").mkdir(parents=True)
        (mesh.source / "sub" / "dir" / "new file.txt").write_text("written on alpha")
        (mesh.source / "second").write_text("second")
        await until(lambda: "written on alpha" in staged(mesh, "sub/dir/new file.txt"),
                    "the write on bravo", 5)
        await until(lambda: "second" in staged(mesh, "second"), "the second write", 5)
        asked = len(mesh.carrier.calls)
        (mesh.source / "second").unlink()
        await until(lambda: any("second" in ps for _, ps in mesh.carrier.calls[asked:]),
                    "the gate asked about the delete", 5)
        # No batch starts after lsyncd stops; the agent's run to their end.
        await mesh.supervisor.stop()
        await until(lambda: mesh.gate.serving == 0
                    and len(mesh.sink.finished()) == len(mesh.sink.pushes), "the pushes", 10)
    assert (mesh.target / "second").read_text() == "bravo's copy"  # rsync deleted nothing
    assert not (mesh.target / "sub").exists()  # nor wrote into the live folder
    assert [(p.peer, p.returncode) for p in mesh.sink.pushes] == [(SENDER, 0)] * len(
        mesh.sink.pushes
    )


async def test_what_the_agent_writes_itself_starts_no_gate(
    cluster_pki: Pki, tmp_path: Path
) -> None:
    """A change the agent notes before making it (agentwrites; a push landing: a temp
    file renamed into place, or swapped with an older version, a delete, a folder made
    with its mode or on the way to a file) is passed over by lsyncd: no gate starts for
    it. A note counts for one event: a write after it, and what nobody noted, still go."""
    notes = tmp_path / "agent-writes"
    async with running(cluster_pki, tmp_path, agent_writes=notes) as mesh:  # type: ignore[arg-type]
        await poke_until(mesh)
        fs, writes = Beneath(mesh.source), AgentWrites(notes)
        fs.changing = writes.note
        asked = len(mesh.carrier.calls)

        def land(rel: str, data: bytes) -> None:  # as the landing does
            temp = fs.temp_name(rel)
            fs.write_bytes(temp, data, 0o644)
            fs.rename(temp, rel)

        def swap(rel: str, data: bytes) -> None:  # a newer version over an older one
            temp = fs.temp_name(rel)
            fs.write_bytes(temp, data, 0o644)
            assert fs.exchange(temp, rel)
            fs.unlink(temp)  # (the landing files it away)

        land("landed", b"from a peer")
        fs.unlink("landed")
        land("swapped", b"from a peer")
        swap("swapped", b"a newer one from a peer")
        fs.mkdir("folder", 0o755, exist_ok=False)
        land("new/deep/file", b"from a peer, in folders new here")
        land("again", b"from a peer")
        (mesh.source / "mine").write_text("an operator's")  # the head of a batch, and
        land("behind", b"from a peer")  # the agent's behind it: left out of that batch
        fs.changing = lambda rel: None
        land("unnoted", b"nobody said")
        calls = mesh.carrier.calls
        await until(lambda: any("unnoted" in ps for _, ps in calls[asked:])
                    and any("mine" in ps for _, ps in calls[asked:]), "unnoted, mine", 10)
        (mesh.source / "again").write_text("an operator's, after the landing")
        await until(lambda: any("again" in ps for _, ps in calls[asked:]), "the edit", 10)
        writes.close()
    theirs = {"landed", "behind", "swapped", "folder", "new", "new/deep", "new/deep/file"}
    assert [ps for _, ps in calls[asked:] if theirs & set(ps)] == []


async def test_a_busy_node_s_batches_start_a_pace_apart_and_a_sparse_one_s_at_once(
    cluster_pki: Pki, tmp_path: Path
) -> None:
    """lsyncd paces its batches to a peer while the node changes more than 6 paths a
    second (the config's ``pace``; issue 12: each push costs both ends processes and a
    handshake): the writes made within a pace of a batch's start wait until the pace
    has passed, not a pace from when they were made, and go together. A node writing
    less often, and a write after a quiet spell, go at once."""
    pace = 4.0  # long beside what load adds to a batch's start (a gate process, lsyncd's timer)
    async with running(cluster_pki, tmp_path, pace=pace) as mesh:
        await poke_until(mesh)
        calls, at = mesh.carrier.calls, mesh.carrier.called_at

        def carried(rel: str) -> int:
            return next(i for i, (_, ps) in enumerate(calls) if rel in ps)

        def since(i: int) -> float:
            return time.monotonic() - at[i]

        async def write(rels: list[str], wait_for: str) -> int:
            for rel in rels:
                (mesh.source / rel).write_text(rel)
            await until(lambda: any(wait_for in ps for _, ps in calls), wait_for, 10)
            return carried(wait_for)

        # Sparse (the cadences below are what is under test): two writes a second.
        await asyncio.sleep(1.0)
        first = await write(["s1"], "s1")
        await asyncio.sleep(max(0.0, 0.5 - since(first)))
        assert at[await write(["s2"], "s2")] - at[first] < pace
        # Busy: 40 files at once, then two more half a pace later.
        burst = await write([f"a{i}" for i in range(40)], "a39")
        await asyncio.sleep(max(0.0, pace / 2 - since(burst)))
        after = await write(["b", "c"], "c")
        assert carried("b") == after > burst
        # At least a pace after the burst's, and well before a pace after b was written.
        # (Timed where the gate calls reach the carrier, each a gate process after
        # lsyncd started its batch: a few ms either way, seen 1.998 s for a 2 s pace.)
        assert 0.95 * pace <= at[after] - at[burst] < 1.25 * pace
        # A quiet spell of a pace, then a write: no wait.
        await asyncio.sleep(pace - since(after) + 0.1)
        written = time.monotonic()
        assert at[await write(["d"], "d")] - written < pace


async def test_an_empty_source_at_start_deletes_nothing(cluster_pki: Pki, tmp_path: Path) -> None:
    target = tmp_path / "B"
    (target / "dir").mkdir(parents=True)
    (target / "dir" / "precious").write_text("only bravo has this")
    (target / "top").write_text("and this")
    async with running(cluster_pki, tmp_path) as mesh:
        # lsyncd would have run a start-up sync before handling this change.
        await poke_until(mesh)
        assert (target / "dir" / "precious").read_text() == "only bravo has this"
        assert (target / "top").read_text() == "and this"
        assert {p for _, paths in mesh.carrier.calls for p in paths} == {"probe"}
    assert not any((target / KEEP).rglob("precious"))


async def test_peer_change_restarts_lsyncd_with_a_sync_per_peer(
    cluster_pki: Pki, tmp_path: Path
) -> None:
    async with running(cluster_pki, tmp_path) as mesh:
        await poke_until(mesh)
        first = mesh.supervisor.pid
        # Two hellos 0.1 s apart (under LsyncdSettings.settle): one restart for both.
        mesh.supervisor.update_peers([RECEIVER, "delta"])
        await asyncio.sleep(0.1)  # the cadence under test
        mesh.supervisor.update_peers([RECEIVER, "delta", OTHER])
        await until(lambda: mesh.supervisor.pid not in (None, first), "a new lsyncd", 5)
        assert f"{OTHER}::data/" in mesh.supervisor.config_path.read_text()
        await poke_until(mesh)
        (mesh.source / "after").write_text("for both peers")
        await until(
            lambda: any(peer == OTHER and "after" in ps for peer, ps in mesh.carrier.calls),
            "the gate asking about charlie",
            5,
        )
        await until(lambda: "for both peers" in staged(mesh, "after"), "the write", 5)
        assert mesh.supervisor.starts == 2


async def test_a_restart_while_lsyncd_starts_up_ends_it_without_the_kill(
    cluster_pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """lsyncd 2.2.3 loses a SIGTERM that comes while it sets its watches, and runs on
    until killed: among ten nodes a restart for a peer's hello right after the start
    waited out the whole stop timeout with no lsyncd. The supervisor sends SIGTERM
    again until lsyncd ends; here the kill would come only after 60 s."""
    caplog.set_level(logging.INFO, "mesh.adapters.lsyncd.supervisor")
    async with running(cluster_pki, tmp_path, folders=3000, stop_timeout=60,
                       settle=0.01) as mesh:
        await until(lambda: mesh.supervisor.pid is not None, "lsyncd to start", 10)
        first = mesh.supervisor.pid
        mesh.supervisor.update_peers([RECEIVER, OTHER])  # while it watches 3,000 folders
        await until(lambda: mesh.supervisor.pid not in (None, first), "a new lsyncd", 30)
    assert not [r for r in caplog.records if "ignored SIGTERM" in r.getMessage()]


async def test_a_dead_lsyncd_is_restarted(cluster_pki: Pki, tmp_path: Path) -> None:
    async with running(cluster_pki, tmp_path) as mesh:
        await until(lambda: mesh.supervisor.pid is not None, "lsyncd to start", 5)
        first = mesh.supervisor.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await until(lambda: mesh.supervisor.pid not in (None, first), "a restarted lsyncd", 5)
        await poke_until(mesh)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


async def test_stop_ends_lsyncd_and_everything_it_started(cluster_pki: Pki, tmp_path: Path) -> None:
    async with running(cluster_pki, tmp_path, blocked=True) as mesh:
        await poke_until(mesh, lambda _: bool(mesh.carrier.calls))  # a gate now waits
        pgid = mesh.supervisor.pid
        assert pgid is not None
        assert len(group_members(pgid)) > 1  # lsyncd and the gate it runs
        await mesh.supervisor.stop()
        assert group_members(pgid) == []
        assert mesh.supervisor.pid is None


def stand_in(config: Path) -> subprocess.Popen[bytes]:
    """A process in a session of its own whose command line names ``config``, as the
    lsyncd of an agent that was killed outright (SIGKILL) goes on running."""
    config.parent.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                             str(config)], start_new_session=True)
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    wait_for(lambda: os.fsencode(config) in cmdline.read_bytes(), 10, "the exec")
    return proc


@pytest.mark.parametrize("ours", [True, False])
async def test_an_lsyncd_a_killed_agent_left_running_is_ended_at_the_next_start(
        cluster_pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture, ours: bool,
) -> None:
    """The pid file names the lsyncd the last agent of this state dir started: ended when
    its command line names our config (ours), left alone when the pid is another's."""
    config = tmp_path / "lsyncd" / "lsyncd.conf.lua"
    stale = stand_in(config if ours else tmp_path / "another.conf.lua")
    try:
        config.parent.mkdir(exist_ok=True)
        config.with_name("lsyncd.pid").write_text(f"{stale.pid}\n")
        async with running(cluster_pki, tmp_path) as mesh:
            if ours:  # killed before the new lsyncd started (reaped here: our child)
                assert stale.wait(5) == -signal.SIGKILL
            else:
                assert stale.poll() is None
            await until(lambda: mesh.supervisor.pid is not None, "lsyncd to start", 5)
            pid_file = mesh.supervisor.pid_path.read_text().split()
            assert pid_file == [str(mesh.supervisor.pid)]
            await poke_until(mesh)
        assert not config.with_name("lsyncd.pid").exists()  # stopped: nothing left running
        assert ("still running: ending it" in caplog.text) == ours
    finally:
        stale.kill()
        stale.wait()


@pytest.mark.parametrize(("line", "level"), [
    ("14:30:43 Normal: --- Startup ---", logging.INFO),
    ("14:30:43 Normal: --- TERM signal, fading ---", logging.INFO),
    ("14:30:45 Normal: Calling rsync with filter-list of new/modified files/dirs", logging.DEBUG),
    ("/docs/from-sw1.txt", logging.DEBUG),
    ("mesh gate: agent at /run/gate.sock: Connection refused", logging.WARNING),
    ("14:30:45 Normal: Finished a list after exitcode: 0", logging.DEBUG),
    ("14:30:45 Error: Failure on rsync, exitcode 12", logging.WARNING),
    ("14:30:45 Warn: Cannot access /data/x", logging.WARNING),
])
def test_lsyncd_output_is_logged_at_a_level_an_operator_can_filter(line: str, level: int) -> None:
    """lsyncd's per-batch chatter (each list's paths, its rsync calls) is debug; its
    start and stop are info; its errors, and anything the gate says, are warnings."""
    assert log_level(line) == level
