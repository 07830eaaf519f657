"""The start-up walk in a process of its own (``mesh.adapters.fs.walker``, issue 16): the
same answer as the walk in a thread; a failure is an error that says why; a walk the
agent stops is killed, not left running."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import signal
from pathlib import Path

import pytest

from mesh.adapters.fs import walker, walkproc
from mesh.adapters.fs.reconcile import Reconciled
from mesh.adapters.fs.scanner import Scanner
from mesh.adapters.fs.watcher import Watcher
from mesh.engine.startwalk import StartWalk
from mesh.errors import LocalProtocolError, MeshError, StoreError
from mesh.store.index import Index
from mesh.store.known import open_reader
from mesh.store.statcache import StatCache
from tests.integration.conftest import until
from tests.integration.test_startup_scan import Agent, loop_turns_during, tree


async def test_the_process_finds_what_the_thread_finds(tmp_path: Path) -> None:
    root, db = tmp_path / "data", tmp_path / "state.db"
    root.mkdir()
    tree(root, 60)
    agent = Agent(root, db)
    await agent.plane.startup()  # indexes the tree
    (root / "d1" / "f1").write_bytes(b"changed while down")
    (root / "d2" / "f2").unlink()
    (root / "new").write_bytes(b"new")
    (root / "big").write_bytes(b"x" * (1 << 20))
    found = await walker.against_index(agent.scanner, agent.index)  # in a process
    with open_reader(db) as known:
        in_thread = walkproc.walk(root, known, hashed=True)
    assert dataclasses.replace(found, peak_rss_kib=0, walk_s=0.0) == in_thread
    assert found.walk_s > 0  # as the agent saw it, for its log
    assert found.peak_rss_kib > 0  # the walker's own, for the agent's log
    assert (found.on_disk, found.changed, found.gone) == (61 + 7, 3, ["d2/f2"])
    assert found.large == ["big"]
    assert sorted(p for run in found.to_scan() for p in run) == ["big", "d1/f1", "new"]


async def test_what_the_walk_s_process_says_is_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A name that cannot be synced is said by the walk's own process, on its stderr:
    that went nowhere when the walk ended well. The agent logs it."""
    root, db = tmp_path / "data", tmp_path / "state.db"
    root.mkdir()
    tree(root, 3)
    (root / os.fsdecode(b"bad\xff")).write_bytes(b"x")
    agent = Agent(root, db)
    with caplog.at_level(logging.WARNING, logger="mesh.data"):
        found = await walker.against_index(agent.scanner, agent.index)
    assert not any(p.startswith("bad") for run in found.to_scan() for p in run)
    assert any("start-up walk: skipping b'bad\\xff'" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


async def test_a_walk_that_fails_says_why(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"start-up walk of .*data failed \(exit 1\): "
                                         r"open .*missing\.db to read: unable to open"):
        await walker.walk_in_process(tmp_path / "data", tmp_path / "missing.db", True)


async def test_a_walk_cancelled_is_killed(tmp_path: Path) -> None:
    """Cancelled while the child runs (it takes a while to start, and 5,000 files to
    walk; stopped here, so that it cannot end by itself): the child is gone when the
    cancel returns."""
    root, db = tmp_path / "data", tmp_path / "state.db"
    root.mkdir()
    tree(root, 5000)
    Index(db).close()
    scanner = Scanner(root, cache=StatCache(Index(db).db))
    before = _walkers()
    task = asyncio.create_task(walker.against_index(scanner, Index(db)))
    await until(lambda: bool(_walkers() - before), "the walker to start", 30)
    started = _walkers() - before
    for pid in started:
        os.kill(pid, signal.SIGSTOP)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not (_walkers() & started)


def _walkers() -> set[int]:
    """Pids of the walker processes running now."""
    out = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if walkproc.__name__.encode() in cmdline.read_bytes():
                out.add(int(cmdline.parent.name))
        except OSError:
            continue
    return out


async def test_the_watcher_lists_its_folders_off_the_loop(tmp_path: Path) -> None:
    """``open_watcher``: every folder watched, and the loop served meanwhile."""
    root = tmp_path / "data"
    for i in range(300):
        (root / f"d{i % 30}" / f"e{i}").mkdir(parents=True)
        (root / f"d{i % 30}" / f"e{i}" / "file").write_bytes(b"x")
    watcher = Watcher(root)
    assert await loop_turns_during(walker.open_watcher(watcher)) > 0
    with watcher:
        assert watcher.watch_count == 1 + 30 + 300


class Watchers:
    """A watcher maker for ``StartWalk`` that keeps what it made."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: list[Watcher] = []

    def __call__(self) -> Watcher:
        self.made.append(Watcher(self.root))
        return self.made[-1]


def start_walk(agent: Agent, watchers: Watchers) -> StartWalk:
    """The early walk as the agent makes it, over ``agent``'s index."""
    return StartWalk(functools.partial(walker.against_index, agent.scanner, agent.index),
                     agent.plane.keep, watchers)


async def test_the_walk_begun_early_is_what_startup_would_walk(tmp_path: Path) -> None:
    """``StartWalk`` (issue 16: the walk begins before the agent's servers start): the
    watcher is open when the walk begins, the walk is the one ``startup`` makes, and
    ``startup`` given it does not walk again."""
    root, db = tmp_path / "data", tmp_path / "state.db"
    root.mkdir()
    tree(root, 40)
    agent = Agent(root, db)
    await agent.plane.startup()
    (root / "d1" / "f1").write_bytes(b"changed while down")
    watchers = Watchers(root)
    walks = 0

    async def counted() -> Reconciled:
        nonlocal walks
        assert watchers.made[0].watch_count == 1 + 7  # every folder watched first
        walks += 1
        return await walker.against_index(agent.scanner, agent.index)

    early = StartWalk(counted, agent.plane.keep, watchers)
    early.begin()
    taken, found = await early.take()
    with taken:
        assert found is not None and walks == 1
        assert [p for run in found.to_scan() for p in run] == ["d1/f1"]
        agent.observed.clear()
        assert await agent.plane.startup(found) == 40 + 7
        assert walks == 1 and agent.observed == ["d1/f1"]


async def test_after_a_cut_short_push_startup_walks_after_its_landing(tmp_path: Path) -> None:
    """A push the last stop cut short lands first: the early walk is not made."""
    root = tmp_path / "data"
    root.mkdir()
    tree(root, 5)
    agent = Agent(root, tmp_path / "state.db")
    agent.plane.keep.unfinished = ["p1"]
    early = start_walk(agent, Watchers(root))
    watcher, found = await early.take()
    watcher.close()
    assert found is None


async def test_a_walk_begun_early_and_abandoned_leaves_nothing_running(tmp_path: Path) -> None:
    """The agent stops (a server failed to start, say) before it took the walk: the
    walk's process is killed and the watcher closed."""
    root, db = tmp_path / "data", tmp_path / "state.db"
    root.mkdir()
    tree(root, 5000)
    agent = Agent(root, db)
    watchers = Watchers(root)
    before = _walkers()
    early = start_walk(agent, watchers)
    early.begin()
    await until(lambda: bool(_walkers() - before), "the walker to start", 30)
    started = _walkers() - before
    for pid in started:
        os.kill(pid, signal.SIGSTOP)  # so that it cannot end by itself
    await early.abandon()
    assert not (_walkers() & started)
    assert len(watchers.made) == 1
    with pytest.raises(LocalProtocolError, match="closed watcher"):
        watchers.made[0].open()


async def test_the_agent_goes_on_once_the_walk_runs(tmp_path: Path) -> None:
    """``walking`` returns once every folder is watched and the walk has begun (the
    agent then imports the node and starts its servers); when the watcher cannot
    open, it returns too, and ``take`` raises why."""
    root, db = tmp_path / "data", tmp_path / "state.db"
    root.mkdir()
    tree(root, 5000)
    agent = Agent(root, db)
    watchers = Watchers(root)
    early = start_walk(agent, watchers)
    await early.walking()
    assert watchers.made[0].watch_count == 1 + 7
    taken, found = await early.take()
    taken.close()
    assert found is not None and found.on_disk == 5000 + 7

    broken = start_walk(agent, Watchers(tmp_path / "missing"))
    await asyncio.wait_for(broken.walking(), 30)
    with pytest.raises(MeshError):
        await broken.take()
