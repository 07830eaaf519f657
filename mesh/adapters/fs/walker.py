"""Where the start-up walks run: off the event loop (issue 16). The reconcile's
(``mesh.adapters.fs.reconcile``) in a process of its own for the agent, the watcher's
listing of every folder in a worker thread.

In a worker thread, the walk released the GIL for every ``lstat`` and every SQLite
step, and took it back from the event loop and the digests' threads each time: a
restart on 100,000 unchanged files walked for 4.3 to 6.2 s where the same walk alone
takes 1.9 s, and spent 8 CPU-seconds. A process shares no GIL; what it found comes
back as one msgpack document on its stdout. The set of every path found (at a
restart, to tell what is gone) lives in that process and goes with it.

The process is ``mesh.adapters.fs.walkproc``'s, stopped by its pid when the agent
stops during the walk; what it says on stderr the agent logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from pathlib import Path

import msgpack

from mesh.adapters.fs import walkproc
from mesh.adapters.fs.listing import default_ignore
from mesh.adapters.fs.reconcile import Reconciled
from mesh.adapters.fs.scanner import Scanner
from mesh.adapters.fs.watcher import Watcher
from mesh.errors import StoreError
from mesh.store.index import Index
from mesh.store.known import KnownPaths, open_reader

LOG = logging.getLogger("mesh.data")

STDERR_TAIL = 2000  # characters of a failed walk's stderr put in the error
SAID_LINES = 50  # lines of what a walk that ended well said (warnings) logged, at most


async def against_index(scanner: Scanner, index: Index) -> Reconciled:
    """``reconcile`` the scanner's tree with ``index``, timed (``walk_s``)."""
    started = time.monotonic()
    found = await _against_index(scanner, index)
    found.walk_s = time.monotonic() - started
    return found


async def _against_index(scanner: Scanner, index: Index) -> Reconciled:
    """With the agent's rules (``default_ignore``), in a process of its own; with
    others, in a worker thread; an index in memory (tests) has one connection, read
    on this thread."""
    hashed = scanner.cache is not None  # no stat cache: every file is scanned
    if index.path is None:
        return walkproc.walk(scanner.root, KnownPaths(index.db), hashed, scanner.ignore)
    if scanner.ignore is default_ignore:
        return await walk_in_process(scanner.root, index.path, hashed)

    def in_thread(db: Path) -> Reconciled:
        with open_reader(db) as known:
            return walkproc.walk(scanner.root, known, hashed, scanner.ignore)
    return await asyncio.to_thread(in_thread, index.path)


async def open_watcher(watcher: Watcher) -> None:
    """``watcher.open()`` in a worker thread: it lists every folder of the tree (1,000
    folders of a million files held the loop 4.4 s). Nothing may use the watcher until
    this returns; cancelled, it waits for the thread and closes the watcher."""
    opening = asyncio.ensure_future(asyncio.to_thread(watcher.open))
    try:
        await asyncio.shield(opening)
    except BaseException:
        await asyncio.wait([opening])
        watcher.close()
        raise


async def walk_in_process(root: Path, db: Path, hashed: bool) -> Reconciled:
    """``walk`` in a child process; raises ``StoreError`` if it fails. Cancelled, the
    child is killed and reaped."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", walkproc.__name__, str(root), str(db), "1" if hashed else "0",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.shield(proc.wait())
        raise
    said = err.decode(errors="replace").strip()
    if proc.returncode != 0:
        raise StoreError(f"the start-up walk of {root} failed (exit {proc.returncode}): "
                         f"{said[-STDERR_TAIL:] or 'no message'}")
    lines = said.splitlines()  # names skipped, folders that could not be listed
    for line in lines[:SAID_LINES]:
        LOG.warning("start-up walk: %s", line)
    if len(lines) > SAID_LINES:
        LOG.warning("start-up walk: %d more such lines", len(lines) - SAID_LINES)
    try:
        return Reconciled(**msgpack.unpackb(out))
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise StoreError(f"the start-up walk of {root} answered garbage: {e}") from e
