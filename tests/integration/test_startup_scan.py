"""The start-up reconcile of a real data plane (issue 16): on a tree unchanged since
it was indexed, no path is scanned (a stat each, no hash, the index read in bulk);
what changed while the agent was down is scanned and recorded; a scan serves the event
loop between its batches; the scan-time marks are not rebuilt at every batch."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from pathlib import Path

from mesh.adapters.fs.scanner import Scanner
from mesh.core.effects import Effect, Restore
from mesh.core.replica import Replica
from mesh.engine.dataplane import APPLY_CHUNK, SCAN_BATCH, DataPlane
from mesh.engine.keep import KeepArea
from mesh.engine.scanmarks import ScanMarks
from mesh.store.index import Index
from mesh.store.statcache import StatCache
from tests.core.test_pushplan import View


class Agent:
    """The data plane as a node wires it, over a state database on disk."""

    def __init__(self, root: Path, db: Path) -> None:
        self.index = Index(db)
        self.scanner = Scanner(root, cache=StatCache(self.index.db), racy_window=0.0)
        self.observed: list[str] = []
        observe = self.scanner.observe

        def counted(rel: str) -> object:
            self.observed.append(rel)
            return observe(rel)

        self.scanner.observe = counted  # type: ignore[method-assign,assignment]

        async def nowhere(effects: list[Effect]) -> None:
            pass

        self.plane = DataPlane(root=root, replica=Replica("n1", self.index), index=self.index,
                               keep=KeepArea(root), scanner=self.scanner, forward=nowhere)


def tree(root: Path, files: int) -> None:
    for i in range(files):
        folder = root / f"d{i % 7}"
        folder.mkdir(exist_ok=True)
        (folder / f"f{i}").write_bytes(b"x" * (i % 50))


def content(agent: Agent, rel: str) -> object:
    disk = agent.index.state(rel).disk
    return None if disk is None else disk.content


async def loop_turns_during(work: Awaitable[object]) -> int:
    """How many turns another task got while ``work`` was awaited."""
    turns = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal turns
        while not done.is_set():
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = turns
    await work
    during = turns - before
    done.set()
    await task
    return during


async def test_an_unchanged_tree_is_not_scanned_at_a_restart(tmp_path: Path) -> None:
    root, db = tmp_path / "data", tmp_path / "state.db"
    root.mkdir()
    tree(root, 60)
    first = Agent(root, db)
    assert await first.plane.startup() == 67
    assert len(first.observed) == 67 and first.index.count() == 67
    first.index.close()
    again = Agent(root, db)
    assert await again.plane.startup() == 67
    assert again.observed == []
    assert again.index.count() == 67
    again.index.close()


async def test_what_changed_while_down_is_scanned_and_recorded(tmp_path: Path) -> None:
    root, db = tmp_path / "data", tmp_path / "state.db"
    root.mkdir()
    tree(root, 20)
    first = Agent(root, db)
    await first.plane.startup()
    first.index.close()
    edited, chmodded, gone, link = root / "d1/f1", root / "d2/f2", root / "d3/f3", "d4/f4"
    stat = edited.stat()
    edited.write_bytes(b"y")  # the same size
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
    chmodded.chmod(0o600)
    (root / "d5").chmod(0o700)
    gone.unlink()
    (root / link).unlink()
    (root / link).symlink_to("f11")
    (root / "d6/new").write_bytes(b"new")
    again = Agent(root, db)
    await again.plane.startup()
    changed = ["d1/f1", "d2/f2", "d3/f3", "d4/f4", "d5", "d6/new"]
    assert sorted(again.observed) == changed
    scanner = Scanner(root)
    for rel in changed:
        found = scanner.observe(rel)
        assert content(again, rel) == (None if found is None else found.content), rel
    assert again.index.state("d3/f3").disk is not None  # a delete, recorded
    again.index.close()


async def test_a_scan_serves_the_event_loop_between_batches(tmp_path: Path) -> None:
    root, db = tmp_path / "data", tmp_path / "state.db"
    root.mkdir()
    tree(root, 3 * SCAN_BATCH)
    agent = Agent(root, db)
    during = await loop_turns_during(agent.plane.scan(sorted(agent.scanner.walk())))
    assert during >= 2, "the loop was not served during the scan"
    agent.index.close()


async def test_an_apply_serves_the_event_loop_between_chunks(tmp_path: Path) -> None:
    """Issue 16: among ten nodes on two cores, a push's end restoring 2,000 paths held
    the receiver's loop for 3 to 5 s and its links dropped. Restores that find nothing
    to do here, three chunks of them."""
    root = tmp_path / "data"
    root.mkdir()
    agent = Agent(root, tmp_path / "state.db")
    view = View()
    effects: list[Effect] = [Restore(view.write(f"r{i}", "n2"))
                             for i in range(3 * APPLY_CHUNK)]
    during = await loop_turns_during(agent.plane.apply(effects))
    assert during >= 2, "the loop was not served during the apply"
    assert len(agent.observed) == 3 * APPLY_CHUNK  # each was looked at
    agent.index.close()


def test_scan_marks_are_dropped_once_not_rebuilt() -> None:
    now = 1000.0
    marks = ScanMarks(kept=10, clock=lambda: now)
    for i in range(15):
        marks.mark(f"old{i}", now - 60)
    for i in range(15):
        marks.mark(f"young{i}", now - 1)
    marks.mark("old0", now)  # scanned again: young now, and last
    marks.forget()
    assert marks.paths() == [*(f"young{i}" for i in range(15)), "old0"]
    marks.forget()  # young marks over the bound stay: events may still be on the way
    assert len(marks) == 16


async def test_a_state_folder_with_uri_characters_in_its_name(tmp_path: Path) -> None:
    """The reconcile's reader opens the database by URI: '?', '#', '%' and spaces in
    the state folder's name are quoted, not taken for the URI's parts."""
    root, state = tmp_path / "data", tmp_path / "st?a#t e%41"
    root.mkdir()
    state.mkdir()
    tree(root, 5)
    first = Agent(root, state / "state.db")
    await first.plane.startup()
    first.index.close()
    again = Agent(root, state / "state.db")
    assert await again.plane.startup() == 10
    assert again.observed == []
    again.index.close()
