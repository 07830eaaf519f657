"""The watcher on real inotify, in temporary directories.

No pytest-asyncio: each test body runs under ``asyncio.run`` with a deadline.
Every wait is on a condition (a path reported, a batch seen) with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from asyncinotify import Event, Inotify, Mask

from mesh.adapters.fs.watcher import Watcher, WatchError, WatchLimit
from tests.adapters.test_scanner import NAMES

TEST_TIMEOUT = 30.0
WAIT = 5.0
QUEUE_KNOB = Path("/proc/sys/fs/inotify/max_queued_events")
QUEUE_LOCK = Path(tempfile.gettempdir()) / "meshsync-inotify-queue-knob.lock"


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), TEST_TIMEOUT))


class Seen:
    """Everything a watcher reported, and ways to wait for it."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self.batches: list[tuple[list[str], bool]] = []
        self._mark = 0
        self._news = asyncio.Event()

    async def consume(self) -> None:
        async with contextlib.aclosing(self.watcher.batches()) as batches:
            async for batch in batches:
                self.batches.append((batch.paths, batch.rescan))
                self._news.set()

    def since_mark(self) -> set[str]:
        return {p for paths, _ in self.batches[self._mark:] for p in paths}

    def mark(self) -> None:
        """Later expectations only look at batches reported from now on."""
        self._mark = len(self.batches)

    async def until(self, cond: Callable[[], bool], what: str) -> None:
        try:
            async with asyncio.timeout(WAIT):
                while not cond():
                    self._news.clear()
                    # Woken by a batch; the short timeout re-checks conditions
                    # that change without one (watch counts).
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._news.wait(), 0.05)
        except TimeoutError:
            raise AssertionError(f"not seen in {WAIT}s: {what}; got {self.since_mark()}"
                                 ) from None

    async def expect(self, *paths: str) -> set[str]:
        await self.until(lambda: set(paths) <= self.since_mark(), f"{paths}")
        return self.since_mark()

    async def quiet_except(self, sentinel: Path, *absent: str) -> None:
        """Touch ``sentinel``; once it is reported, none of ``absent`` was."""
        sentinel.write_bytes(b"")  # noqa: ASYNC240 - the test makes the events
        rel = sentinel.relative_to(self.watcher.root).as_posix()
        got = await self.expect(rel)
        assert not set(absent) & got, f"unexpected {set(absent) & got}"


@contextlib.asynccontextmanager
async def consuming(watcher: Watcher) -> AsyncIterator[Seen]:
    """Iterate the watcher's batches in a task for the duration of the block."""
    seen = Seen(watcher)
    task = asyncio.create_task(seen.consume())
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert watcher.watch_count == 0


@contextlib.asynccontextmanager
async def watching(root: Path, **options: Any) -> AsyncIterator[Seen]:
    settings: dict[str, Any] = {"quiet": 0.02, "cap": 0.2, "settle": 0.3, **options}
    watcher = Watcher(root, **settings)
    watcher.open()  # watches exist before the test touches anything
    async with consuming(watcher) as seen:
        yield seen


@pytest.fixture
def root(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    return data


def open_fds() -> set[str]:
    return {p.name for p in Path("/proc/self/fd").iterdir()}


# --- files ------------------------------------------------------------------------


def test_file_create_modify_chmod_rename_delete(root: Path) -> None:
    async def body() -> None:
        async with watching(root) as seen:
            (root / "f").write_bytes(b"one")
            await seen.expect("f")
            seen.mark()
            with (root / "f").open("ab") as w:
                w.write(b"two")
            await seen.expect("f")
            seen.mark()
            (root / "f").chmod(0o600)
            await seen.expect("f")
            seen.mark()
            (root / "f").rename(root / "g")
            await seen.expect("f", "g")
            seen.mark()
            (root / "g").unlink()
            assert await seen.expect("g") == {"g"}

    run(body)


def test_a_file_is_reported_when_closed_not_while_written(root: Path) -> None:
    async def body() -> None:
        async with watching(root, settle=60.0) as seen:
            with (root / "big").open("wb") as w:
                w.write(b"partial")
                w.flush()
                await seen.quiet_except(root / "sentinel", "big")
                seen.mark()
                w.write(b" and the rest")
            assert "big" in await seen.expect("big")

    run(body)


def test_being_written_names_the_files_open_and_changed_until_closed(root: Path) -> None:
    """What a restore asks before it scans (DESIGN.md §5): read at once, with no wait
    for the watcher's loop, and no longer named once the writer closed the file."""
    with Watcher(root, settle=60.0) as watcher:
        (root / "done").write_bytes(b"closed")
        with (root / "open").open("wb") as w:
            w.write(b"partial")
            w.flush()
            assert set(watcher.being_written()) == {"open"}
        assert set(watcher.being_written()) == set()
        batch = watcher.take_all()
        assert batch is not None and sorted(batch.paths) == ["done", "open"]


def test_a_file_written_but_never_closed_is_reported_once_quiet(root: Path) -> None:
    async def body() -> None:
        async with watching(root, settle=0.2) as seen:
            with (root / "held").open("wb") as w:
                w.write(b"data")
                w.flush()
                started = time.monotonic()
                await seen.expect("held")
                assert time.monotonic() - started >= 0.2
            os.link(root / "held", root / "hardlink")  # CREATE alone, never closed
            await seen.expect("hardlink")

    run(body)


def test_batches_coalesce_and_respect_max_paths(root: Path) -> None:
    async def body() -> None:
        async with watching(root, max_paths=10) as seen:
            names = [f"f{i:02}" for i in range(35)]
            for _ in range(3):
                for name in names:
                    (root / name).write_bytes(b"x")
            await seen.expect(*names)
            assert all(len(paths) <= 10 for paths, _ in seen.batches)
            assert sum(len(paths) for paths, _ in seen.batches) < 3 * 35

    run(body)


# --- directories -------------------------------------------------------------------


def test_deep_tree_made_and_written_at_once_misses_nothing(root: Path) -> None:
    async def body() -> None:
        async with watching(root) as seen:
            parts = [f"d{i}" for i in range(8)]
            deep = root.joinpath(*parts)
            deep.mkdir(parents=True)  # mkdir -p, then write at every level at once
            expected = []
            for i in range(1, len(parts) + 1):
                rel = "/".join(parts[:i])
                expected.append(rel)
                (root / rel / "f").write_bytes(rel.encode())
                expected.append(f"{rel}/f")
            await seen.expect(*expected)
            assert seen.watcher.watch_count == 1 + len(parts)
            seen.mark()
            (deep / "later").write_bytes(b"")
            await seen.expect("/".join(parts) + "/later")

    run(body)


def test_directory_moved_in_and_out(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "proj" / "src").mkdir(parents=True)
    (outside / "proj" / "src" / "main.c").write_bytes(b"int main;")
    (outside / "proj" / "README").write_bytes(b"hi")

    async def body() -> None:
        async with watching(root) as seen:
            (outside / "proj").rename(root / "proj")
            await seen.expect("proj", "proj/src", "proj/src/main.c", "proj/README")
            assert seen.watcher.watch_count == 3
            seen.mark()
            (root / "proj" / "src" / "new.c").write_bytes(b"")
            await seen.expect("proj/src/new.c")
            seen.mark()
            (root / "proj").rename(outside / "proj")
            await seen.expect("proj")
            await seen.until(lambda: seen.watcher.watch_count == 1, "watches dropped")
            seen.mark()
            (outside / "proj" / "src" / "gone.c").write_bytes(b"")
            await seen.quiet_except(root / "sentinel", "proj/src/gone.c")

    run(body)


def test_directory_renamed_inside_the_tree_keeps_its_watches(root: Path) -> None:
    (root / "a" / "sub").mkdir(parents=True)
    (root / "a" / "sub" / "f").write_bytes(b"")

    async def body() -> None:
        async with watching(root) as seen:
            (root / "a").rename(root / "b")
            # Both names are reported for the whole subtree: old ones are gone now.
            await seen.expect("a", "a/sub", "a/sub/f", "b", "b/sub", "b/sub/f")
            assert seen.watcher.watch_count == 3
            seen.mark()
            (root / "b" / "sub" / "g").write_bytes(b"")
            assert "b/sub/g" in await seen.expect("b/sub/g")
            assert "a/sub/g" not in seen.since_mark()

    run(body)


def test_directory_tree_removed(root: Path) -> None:
    (root / "t" / "u").mkdir(parents=True)
    (root / "t" / "u" / "f").write_bytes(b"")

    async def body() -> None:
        async with watching(root) as seen:
            assert seen.watcher.watch_count == 3
            (root / "t" / "u" / "f").unlink()
            (root / "t" / "u").rmdir()
            (root / "t").rmdir()
            await seen.expect("t", "t/u", "t/u/f")
            await seen.until(lambda: seen.watcher.watch_count == 1, "watches dropped")

    run(body)


# --- what is special ---------------------------------------------------------------


def test_symlinks_are_reported_and_never_followed(root: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()

    async def body() -> None:
        async with watching(root) as seen:
            (root / "link").symlink_to(target)
            await seen.expect("link")  # no CLOSE_WRITE for a symlink: its CREATE
            assert seen.watcher.watch_count == 1
            seen.mark()
            (target / "f").write_bytes(b"")
            await seen.quiet_except(root / "sentinel", "link/f")

    run(body)


def test_odd_names_are_reported_exactly(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with watching(root) as seen:
            expected = []
            for name in NAMES:
                (root / name).mkdir()
                (root / name / name).write_bytes(b"")
                expected += [name, f"{name}/{name}"]
            await seen.expect(*expected)
            seen.mark()
            bad = root / os.fsdecode(b"bad\xffname")
            bad.write_bytes(b"")  # CREATE, MODIFY, CLOSE_WRITE: one log line
            bad.chmod(0o600)
            await seen.quiet_except(root / "sentinel")
            assert seen.since_mark() == {"sentinel"}

    with caplog.at_level(logging.WARNING, logger="mesh.adapters.fs.listing"):
        run(body)
    assert [r.getMessage() for r in caplog.records] == [
        "skipping b'bad\\xffname' in '.': name is not valid UTF-8"]


def test_rsync_temp_names_and_the_keep_area_are_ignored(root: Path) -> None:
    async def body() -> None:
        async with watching(root) as seen:
            (root / ".mesh-keep" / "deep").mkdir(parents=True)
            (root / ".mesh-keep" / "deep" / "old").write_bytes(b"kept")
            (root / ".mesh-state").mkdir()
            (root / ".mesh-state" / "state.db").write_bytes(b"")
            temp = root / ".report.pdf.Xy12Zq"
            temp.write_bytes(b"half")
            temp.chmod(0o600)
            temp.rename(root / "report.pdf")  # rsync renames the temp file into place
            got = await seen.expect("report.pdf")
            await seen.quiet_except(root / "sentinel")
            assert seen.since_mark() == {"report.pdf", "sentinel"}, got
            assert seen.watcher.watch_count == 1  # the keep area is not watched

    run(body)


# --- failure modes ------------------------------------------------------------------


@contextlib.contextmanager
def tiny_inotify_queue(size: int) -> Iterator[bool]:
    """Lower ``max_queued_events`` while the block opens an inotify instance.

    The limit is read once, by inotify_init, so it is restored at once. A lock
    file serializes concurrent test runs, so that none restores another's
    lowered value. Yields False (and changes nothing) when the knob is not
    writable here.
    """
    with QUEUE_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            before = QUEUE_KNOB.read_text()
            QUEUE_KNOB.write_text(str(size))
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            QUEUE_KNOB.write_text(before)
            assert QUEUE_KNOB.read_text() == before


def test_queue_overflow_asks_for_a_rescan_and_rewatches(root: Path) -> None:
    async def body() -> None:
        watcher = Watcher(root, quiet=0.02, cap=0.2)
        with tiny_inotify_queue(16) as real:
            watcher.open()
        for i in range(64):  # nobody reads: the queue overflows
            (root / f"f{i}").write_bytes(b"")
        (root / "late").mkdir()  # its CREATE is lost: only a rescan finds it
        if not real:  # no root here: hand the watcher the kernel's overflow event
            watcher._handle(Event(None, Mask.Q_OVERFLOW, 0, None), time.monotonic())
        async with consuming(watcher) as seen:
            await seen.until(lambda: any(rescan for _, rescan in seen.batches), "rescan")
            assert seen.batches[-1] == ([], True)
            assert watcher.watch_count == 2
            seen.mark()
            (root / "late" / "f").write_bytes(b"")
            await seen.expect("late/f")

    run(body)


def enospc_after(calls: int) -> Callable[..., Any]:
    real = Inotify.add_watch
    made = 0

    def add_watch(self: Inotify, path: Any, mask: Mask) -> Any:
        nonlocal made
        if made >= calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        made += 1
        return real(self, path, mask)

    return add_watch


def test_watch_limit_at_start(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in "abc":
        (root / name).mkdir()
    monkeypatch.setattr(Inotify, "add_watch", enospc_after(3))
    fds = open_fds()
    with pytest.raises(WatchLimit) as err:
        Watcher(root).open()
    assert str(err.value) == ("inotify watch limit reached (3 watches): raise it with "
                              "`sysctl -w fs.inotify.max_user_watches=524288`")
    assert open_fds() == fds


def test_watch_limit_while_running(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Inotify, "add_watch", enospc_after(1))

    async def body() -> None:
        watcher = Watcher(root, quiet=0.02, cap=0.2)
        watcher.open()
        task = asyncio.create_task(Seen(watcher).consume())
        (root / "new").mkdir()
        with pytest.raises(WatchLimit, match=r"\(1 watches\)"):
            await asyncio.wait_for(task, WAIT)
        assert watcher.watch_count == 0  # closed on the way out

    run(body)


def test_cancel_closes_the_descriptor(root: Path) -> None:
    (root / "d").mkdir()

    async def body() -> None:
        fds = open_fds()
        watcher = Watcher(root)
        seen = Seen(watcher)
        task = asyncio.create_task(seen.consume())
        await seen.until(lambda: watcher.watch_count == 2, "watching")
        assert open_fds() - fds  # inotify's, and its library's selector
        (root / "d" / "f").write_bytes(b"")
        await seen.expect("d/f")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert open_fds() == fds and watcher.watch_count == 0
        watcher.close()  # idempotent
        with Watcher(root) as again:
            assert again.watch_count == 2
        assert open_fds() == fds

    run(body)



def test_close_ends_an_iteration_in_progress(root: Path) -> None:
    async def body() -> None:
        fds = open_fds()
        watcher = Watcher(root)
        watcher.open()
        seen = Seen(watcher)
        task = asyncio.create_task(seen.consume())
        (root / "f").write_bytes(b"")
        await seen.expect("f")
        watcher.close()  # while the task waits for events
        await asyncio.wait_for(task, WAIT)
        assert open_fds() == fds

    run(body)


def lose(root: Path, how: str) -> None:
    if how == "removed":
        root.rmdir()
    else:
        root.rename(root.with_name("elsewhere"))


@pytest.mark.parametrize("how", ["removed", "moved"])
def test_losing_the_data_root_ends_the_iteration(root: Path, how: str) -> None:
    async def body() -> None:
        watcher = Watcher(root)
        watcher.open()
        task = asyncio.create_task(Seen(watcher).consume())
        lose(root, how)
        with pytest.raises(WatchError, match=f"data root {root} was"):
            await asyncio.wait_for(task, WAIT)
        assert watcher.watch_count == 0

    run(body)
