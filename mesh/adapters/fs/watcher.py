"""Which paths under the data root changed: a recursive inotify watcher.

A batch of dirty paths is a hint, not a fact: the caller hands each path to
the scanner, which looks at what is there now (absent included). Paths are
relative and normalized; ignored paths (``default_ignore``) never appear.

* Every directory is watched. A directory that is created or moved in is
  watched and then listed, and its whole subtree is reported: whatever was
  made inside it before the watch existed had no events.
* A file is reported when its writer closes it (``CLOSE_WRITE``): DESIGN.md, "hash
  only settled content". ``MODIFY`` only marks it as being written (``being_written``);
  a marked file that is never closed (a hard link, a writer that keeps it open) is
  reported once it has had no event for ``settle`` seconds.
* A directory that disappears (deleted, moved out, renamed) is reported by its own
  path; its children are not listed, since they are no longer there to list (when
  renamed inside the root, the new subtree is reported under both names). Callers
  treat an absent directory as the removal of everything they know under it.
* When the kernel's queue overflows, events are lost: the watcher re-adds its watches
  and yields ``WatchBatch([], rescan=True)``; the caller rescans all.
* ``WatchLimit`` when the kernel refuses a watch, ``WatchError`` when the data root
  itself is removed, moved or unmounted: both end the iteration.

Start the watcher before the start-up scan, so that nothing changed during the scan
goes unseen. Stop it by cancelling the task that iterates ``batches()`` (or
``aclose()`` on it): that closes the inotify descriptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Container
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from asyncinotify import Event, Inotify, Mask, Watch

from mesh.adapters.fs.listing import default_ignore, log_bad_name, tree, utf8_name
from mesh.core.batcher import Batcher
from mesh.core.paths import normalize
from mesh.errors import InvalidPath, LocalProtocolError, MeshError

log = logging.getLogger(__name__)

WATCH_MASK = (
    Mask.CLOSE_WRITE | Mask.MODIFY | Mask.ATTRIB | Mask.CREATE | Mask.DELETE
    | Mask.MOVED_FROM | Mask.MOVED_TO | Mask.DELETE_SELF | Mask.MOVE_SELF
    # Never through a symlink or a file that replaced a directory; no events after unlink.
    | Mask.ONLYDIR | Mask.DONT_FOLLOW | Mask.EXCL_UNLINK
)
DRAIN_LIMIT = 4096  # events handled before batches are looked at again
READ_EVENTS = 256  # full-size events per read(2)
BAD_NAMES_LOGGED = 1024  # names remembered so that each is logged once


class WatchError(MeshError):
    """The data root cannot be watched."""


class WatchLimit(WatchError):
    """The kernel refused another watch (``fs.inotify.max_user_watches``)."""

    def __init__(self, count: int) -> None:
        self.count = count
        super().__init__(
            f"inotify watch limit reached ({count} watches): raise it with "
            "`sysctl -w fs.inotify.max_user_watches=524288`")


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """Paths to scan; with ``rescan``, events were lost and every path must be."""

    paths: list[str] = field(default_factory=list)
    rescan: bool = False
    taken: float = 0.0  # the watcher's clock (monotonic): every event was read before it


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


class Watcher:
    def __init__(
        self,
        root: Path | str,
        *,
        ignore: Callable[[str], bool] = default_ignore,
        quiet: float = 0.05,
        cap: float = 0.5,
        max_paths: int = 4096,
        settle: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if settle < 0:
            raise LocalProtocolError("watcher needs settle >= 0")
        self.root = Path(root).absolute()
        self.ignore = ignore
        self.settle = settle
        self._clock = clock
        self._batcher = Batcher(quiet, cap, max_paths)
        self._inotify: Inotify | None = None
        self._closed = False
        self._watches: dict[str, Watch] = {}  # directory ("" is the root) -> its watch
        self._dirs: dict[int, str] = {}  # watch descriptor -> directory
        # being written -> last event, oldest first (an OrderedDict: its oldest go one by
        # one, and a dict would skip their empty slots to find the next)
        self._writing: OrderedDict[str, float] = OrderedDict()
        self._moves: dict[int, str] = {}  # rename cookie -> directory moved away
        self._bad_names: set[tuple[str, str]] = set()  # logged once (bounded)
        self._rescan = False
        self._waiter: tuple[asyncio.AbstractEventLoop, int, asyncio.Future[None]] | None = None

    @property
    def watch_count(self) -> int:
        return len(self._watches)

    # --- life cycle ------------------------------------------------------------

    def open(self) -> None:
        """Watch the whole tree now (``batches()`` does it if it was not done)."""
        if self._closed:
            raise LocalProtocolError("a closed watcher cannot be reopened")
        if self._inotify is not None:
            return
        try:
            self._inotify = Inotify(cache_size=READ_EVENTS, sync_timeout=0)
        except OSError as err:
            raise WatchError(f"inotify_init for {self.root}: {err}") from err
        try:
            self._watch_all()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop watching; an iteration of ``batches()`` in progress ends. Call it from
        the event loop's thread (or cancel the iterating task)."""
        self._closed = True
        if self._waiter is not None:
            loop, fd, ready = self._waiter
            self._waiter = None
            loop.remove_reader(fd)  # before the descriptor is closed and reused
            _wake(ready)
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._watches.clear()
        self._dirs.clear()

    def __enter__(self) -> Watcher:
        self.open()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    async def batches(self) -> AsyncGenerator[WatchBatch, None]:
        """Batches of dirty paths, forever; closes the watcher when it ends."""
        self.open()
        try:
            while self._inotify is not None:
                self._drain()
                now = self._clock()
                self._settle(now)
                if self._rescan:
                    self._rescan = False
                    self._batcher.flush()
                    yield WatchBatch([], rescan=True)
                    continue
                paths = self._batcher.take(now)
                if not paths:
                    await self._readable(self._deadline(), now)
                step = self._batcher.max_paths
                for i in range(0, len(paths), step):
                    yield WatchBatch(paths[i:i + step], taken=now)
        finally:
            self.close()

    def take_all(self) -> WatchBatch | None:
        """Every change inotify has reported up to now, due or not (the gate's question
        must see them all); None when that cannot be promised (events were lost, or more
        are queued than one drain reads): the caller scans what it needs itself."""
        if self._inotify is None or self._rescan:
            return None
        if not self._drain() or self._rescan:
            return None
        now = self._clock()
        return WatchBatch(self._batcher.flush(), taken=now)

    def being_written(self) -> Container[str]:
        """Files changed and not yet closed by their writer, after reading every event
        inotify holds: a scan may find half a write there (truncated, then written in
        place), so a restore leaves them until they are closed (DESIGN.md §5)."""
        if self._inotify is not None and not self._rescan:
            self._drain()
        return self._writing.keys()

    # --- watches -----------------------------------------------------------------

    def _watch(self, rel: str) -> bool:
        assert self._inotify is not None
        try:
            watch = self._inotify.add_watch(self.root / rel, WATCH_MASK)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise WatchLimit(self.watch_count) from err
            if not rel:
                raise WatchError(f"watch data root {self.root}: {err}") from err
            if err.errno not in (errno.ENOENT, errno.ENOTDIR):  # else gone: its events tell
                log.warning("cannot watch %r: %s", rel, err)
            return False
        old = self._dirs.get(watch.wd)  # the same directory seen under another name
        if old is not None and old != rel and self._watches.get(old) is watch:
            del self._watches[old]
        self._watches[rel] = watch
        self._dirs[watch.wd] = rel
        return True

    def _watch_all(self) -> None:
        """(Re)build every watch from the tree as it is now."""
        before = list(self._watches.values())
        self._watches.clear()
        self._dirs.clear()
        self._watch("")
        for rel, _ in tree(self.root, "", self.ignore, folders_only=True):
            self._watch(rel)
        for watch in before:
            if watch.wd not in self._dirs:
                self._unwatch(watch)

    def _unwatch(self, watch: Watch) -> None:
        assert self._inotify is not None
        with contextlib.suppress(OSError):  # else the kernel dropped it: the dir is gone
            self._inotify.rm_watch(watch)

    def _drop(self, rel: str) -> None:
        """Stop watching ``rel`` and everything under it."""
        prefix = rel + "/"
        for d in [d for d in self._watches if d == rel or d.startswith(prefix)]:
            watch = self._watches.pop(d)
            self._dirs.pop(watch.wd, None)
            self._unwatch(watch)

    def _forget(self, wd: int) -> None:
        """The kernel removed watch ``wd`` (IN_IGNORED)."""
        rel = self._dirs.pop(wd, None)
        if rel is None:
            return
        watch = self._watches.get(rel)
        if watch is not None and watch.wd == wd:
            del self._watches[rel]
        if not rel:
            raise WatchError(f"the data root {self.root} was removed or unmounted")

    # --- events --------------------------------------------------------------------

    def _drain(self) -> bool:
        """Handle the events already queued, without blocking; False if more are left."""
        assert self._inotify is not None
        empty = False
        for _ in range(DRAIN_LIMIT):
            event = self._inotify.sync_get()
            if event is None:
                empty = True
                break
            self._handle(event, self._clock())
        # A rename inside the tree queues MOVED_FROM and MOVED_TO together;
        # a MOVED_FROM still unpaired now was a move out of the tree.
        for rel in self._moves.values():
            self._drop(rel)
            self._mark(rel, self._clock())
        self._moves.clear()
        return empty

    def _handle(self, event: Event, now: float) -> None:
        mask = event.mask
        if Mask.Q_OVERFLOW in mask:
            log.warning("inotify queue overflowed under %s: rescanning everything", self.root)
            self._rescan = True
            self._watch_all()
            return
        watch = event.watch
        if watch is None:
            return
        if Mask.IGNORED in mask:
            self._forget(watch.wd)
            return
        base = self._dirs.get(watch.wd)
        if base == "" and mask & (Mask.DELETE_SELF | Mask.MOVE_SELF):
            # Events would now describe another tree, or none at all.
            raise WatchError(f"the data root {self.root} was removed or moved")
        if base is None or event.name is None:
            return  # a watch we dropped, or an event about a watched directory itself
        rel = self._path(base, str(event.name))
        if rel is None or self.ignore(rel):
            return
        self._dispatch(mask, event.cookie, rel, now)

    def _path(self, base: str, name: str) -> str | None:
        if not utf8_name(name):
            if (base, name) not in self._bad_names:  # one line, not one per event
                if len(self._bad_names) >= BAD_NAMES_LOGGED:
                    self._bad_names.clear()
                self._bad_names.add((base, name))
                log_bad_name(name, base)
            return None
        try:
            return normalize(f"{base}/{name}" if base else name)
        except InvalidPath as err:
            log.warning("skipping %r in %r: %s", name, base or ".", err)
            return None

    def _dispatch(self, mask: Mask, cookie: int, rel: str, now: float) -> None:
        is_dir = Mask.ISDIR in mask
        if Mask.MOVED_FROM in mask and is_dir:
            self._moves[cookie] = rel  # paired with its MOVED_TO, or dropped in _drain
        elif Mask.MOVED_TO in mask and is_dir:
            old = self._moves.pop(cookie, None)
            if old is None:
                self._arrived(rel, now)
            else:
                self._renamed(old, rel, now)
        elif Mask.CREATE in mask and is_dir:
            self._arrived(rel, now)
        elif Mask.CREATE in mask and not (self.root / rel).is_symlink():
            self._writing_now(rel, now)  # a file's content is settled at CLOSE_WRITE
        elif Mask.MODIFY in mask or (Mask.ATTRIB in mask and rel in self._writing):
            self._writing_now(rel, now)
        else:  # CLOSE_WRITE, ATTRIB, DELETE, a file moved, a symlink created
            self._writing.pop(rel, None)
            self._mark(rel, now)

    def _mark(self, rel: str, now: float) -> None:
        self._batcher.add(rel, now)

    def _writing_now(self, rel: str, now: float) -> None:
        self._writing[rel] = now
        self._writing.move_to_end(rel)  # the map stays ordered by time

    def _settle(self, now: float) -> None:
        """Report files written but not closed that have been quiet for ``settle``."""
        while self._writing:
            rel, last = next(iter(self._writing.items()))
            if now < last + self.settle:
                return
            self._writing.popitem(last=False)
            self._mark(rel, now)

    def _arrived(self, rel: str, now: float) -> None:
        """A directory was created or moved in: watch it, then report its subtree."""
        self._mark(rel, now)
        if not self._watch(rel):
            return
        for child, is_dir in tree(self.root, rel, self.ignore):
            if is_dir:
                self._watch(child)
            self._mark(child, now)

    def _renamed(self, old: str, new: str, now: float) -> None:
        """A watched directory was renamed inside the tree: its watches follow it."""
        for d in [d for d in self._watches if d == old or d.startswith(old + "/")]:
            watch = self._watches.pop(d)
            moved = new + d[len(old):]
            self._watches[moved] = watch
            self._dirs[watch.wd] = moved
        self._mark(old, now)
        self._mark(new, now)
        for child, _ in tree(self.root, new, self.ignore):
            self._mark(old + child[len(new):], now)
            self._mark(child, now)

    def _deadline(self) -> float | None:
        due = [t for t in (self._batcher.deadline(),) if t is not None]
        if self._writing:
            due.append(next(iter(self._writing.values())) + self.settle)
        return min(due, default=None)

    async def _readable(self, deadline: float | None, now: float) -> None:
        """Wait until inotify has events or ``deadline`` (on our clock) passes."""
        assert self._inotify is not None
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = self._inotify.fd
        loop.add_reader(fd, _wake, ready)
        self._waiter = (loop, fd, ready)
        try:
            # Only readiness is awaited: events are read by _drain, so a
            # cancellation here can never lose one that was already read.
            await asyncio.wait((ready,), timeout=None if deadline is None
                               else max(0.0, deadline - now))
        finally:
            if self._waiter is not None:  # else close() removed it
                self._waiter = None
                loop.remove_reader(fd)
