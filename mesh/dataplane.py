"""The node's data folder: scans feed the replica, and the replica's file effects
(conflict copies, restores, deletes) are carried out here.

Effects are processed from a work queue, not by recursion: a restore first
rescans its path (so what it replaces is an indexed version, see
``mesh.core.replica.Restore``), which can produce further effects.

What a push displaced arrives in the push's backup directory; ``push_ended``
files it into the keep area and tells the replica (``displaced``), which turns
an edit the push overwrote before it was scanned into a write like any other.
A path that a push still landing has displaced is not scanned before that
push ended, and pushed bytes are recognised by the intent of the push that
wrote them (``receiving``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import stat
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from mesh.adapters.scanner import ScanError, Scanner, Unsettled
from mesh.core.manifest import Kind
from mesh.core.replica import Effect, Observed, Replica, Restore, Want, WriteCopy
from mesh.core.resolver import Version
from mesh.keep import KeepArea
from mesh.store.index import Index

LOG = logging.getLogger("mesh.data")

SCAN_BATCH = 500
DEFER_S = 10.0
SCANS_KEPT = 10_000
_RSYNC_TEMP = re.compile(rb"\..+\.[A-Za-z0-9]{6}", re.DOTALL)
NAME_MAX = 255

Forward = Callable[[list[Effect]], Awaitable[None]]


def _ms() -> int:
    return time.time_ns() // 1_000_000


class DataPlane:
    def __init__(self, *, root: Path, replica: Replica, index: Index, keep: KeepArea,
                 scanner: Scanner, forward: Forward) -> None:
        self.root = root
        self.replica = replica
        self.index = index
        self.keep = keep
        self.scanner = scanner
        self.forward = forward  # announcements and conflicts go to the exchange
        self.unsettled: set[str] = set()
        self.landing: dict[str, set[str]] = {}  # path -> the pushes landing on it now
        # path -> push -> the version it announced, until the path is scanned
        self.landed: dict[str, dict[str, Version]] = {}
        self._began: dict[str, float] = {}  # push id -> when it began landing
        self._scanned_at: dict[str, float] = {}  # path -> when its last scan began
        # push id -> path -> our disk version when the push began (what it displaces,
        # unless we changed it meanwhile)
        self._disk_before: dict[str, dict[str, Version | None]] = {}
        self.wants = 0

    # --- scanning ---------------------------------------------------------------------

    async def scan(self, paths: Iterable[str], *, events_read: float | None = None) -> None:
        """Observe ``paths`` and feed the replica, in transactions of SCAN_BATCH.
        A path displaced by a push still landing is left to that push's end.

        For the watcher's paths (``events_read``: its events were all read from inotify
        before that ``time.monotonic()``), also skipped: a path scanned since (it shows
        the change already), and a path a push began landing less than ``DEFER_S`` ago
        (that push's end scans it; a stalled push holds it up no longer than that). A
        burst of pushed files is so scanned once, not on each event and again at the end.
        """
        now = time.monotonic()
        asked = list(paths)
        paths = [p for p in asked if not self._displaced_by_landing(p)]
        if events_read is not None:
            paths = [p for p in paths if self._scanned_at.get(p, -1.0) < events_read
                     and not self._young_landing(p, now)]
        if len(paths) < len(asked) and LOG.isEnabledFor(logging.DEBUG):
            kept = set(paths)
            skipped = [p for p in asked if p not in kept]
            LOG.debug("not scanning now: %d path(s): %s", len(skipped), skipped[:20])
        LOG.debug("scanning %d path(s): %s", len(paths), paths[:3])
        # Each of these is observed after ``now``: a watcher batch of events read before
        # it, arriving while this scan waits (on a hash, say), need not look again. A
        # received 256 MiB file was otherwise hashed twice at once, by the push's end and
        # by the watcher.
        for path in paths:
            self._scanned_at[path] = now  # no mark is later: all were taken before ``now``
        large = self.scanner.to_prehash(paths)
        if large:  # hashing hundreds of MB would stall every link and push of this node
            await asyncio.to_thread(self.scanner.prehash, large)
        batch: list[str] = []
        for path in paths:
            if self._displaced_by_landing(path):  # again: a push may have begun meanwhile
                continue
            batch.append(path)
            if len(batch) >= SCAN_BATCH:
                await self.apply(self._observe(batch))
                batch = []
        if batch:
            await self.apply(self._observe(batch))

    async def startup(self) -> int:
        """Reconcile the index with the disk: what changed while we were down
        becomes local edits (unchanged files are not re-hashed)."""
        while self.keep.unfinished:
            await self._finish_push(self.keep.unfinished.pop())
        on_disk = list(self.scanner.walk())
        gone = set(self.index.paths()) - set(on_disk)
        await self.scan([*on_disk, *sorted(gone)])
        return len(on_disk)

    def _observe(self, paths: list[str]) -> list[Effect]:
        effects: list[Effect] = []
        queue = deque(paths)
        self._forget_scans()
        with self.index.batch():
            while queue:
                path = queue.popleft()
                started = time.monotonic()
                try:
                    observed = self.scanner.observe(path)
                except Unsettled:
                    self.unsettled.add(path)  # still being written: the next event rescans it
                    continue
                except ScanError as err:
                    LOG.warning("scan %s: %s", path, err)
                    continue
                self.unsettled.discard(path)
                self._scanned_at[path] = started
                if observed is None:
                    # A folder moved out of the root is reported alone: what we
                    # indexed inside it is gone too.
                    queue.extend(self.index.paths_under(path))
                self._pick_intent(path, observed)
                effects += self.replica.local(path, observed, _ms())
                self._forget_landed(path)
            self.index.set_meta("clock", self.replica.clock)
        return effects

    # --- effects ----------------------------------------------------------------------

    async def apply(self, effects: list[Effect]) -> None:
        queue: deque[Effect] = deque(effects)
        passed: list[Effect] = []
        for _ in range(100_000):  # bounded: every step settles a path or gives up on it
            if not queue:
                break
            fx = queue.popleft()
            if isinstance(fx, WriteCopy):
                queue.extend(self._write_copy(fx))
            elif isinstance(fx, Restore):
                queue.extend(self._restore(fx.version))
            elif isinstance(fx, Want):
                self.wants += 1
            else:
                passed.append(fx)
        if passed:
            await self.forward(passed)

    def _write_copy(self, fx: WriteCopy) -> list[Effect]:
        dest = self.root / fx.path
        content = fx.source.content
        if content is None or dest.exists() or dest.is_symlink():
            return []
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._materialize(fx.source.path, fx.source.kind, content, fx.source.mode, dest,
                              exclusive=True)
        except FileExistsError:
            return []
        except OSError as err:
            LOG.warning("conflict copy %s: %s", fx.path, err)
            return []
        LOG.info("kept the losing version of %s as %s", fx.source.path, fx.path)
        return self._observe([fx.path])

    def _restore(self, version: Version) -> list[Effect]:
        rel = version.path
        effects = self._observe([rel])  # record anything unscanned first
        if self.index.state(rel).target != version:
            return effects
        path = self.root / rel
        try:
            current = self.scanner.observe(rel)
            if current is not None:
                self.keep.file_away(path, current.content)
            winner = version.winner
            if version.content is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._materialize(rel, winner.kind, version.content, winner.mode, path,
                                  exclusive=False)
        except (OSError, ScanError) as err:
            LOG.warning("restore %s: %s", rel, err)
            return effects
        return effects + self._observe([rel])

    def _materialize(self, source_rel: str, kind: Kind, content: tuple[Kind, bytes, int],
                     mode: int, dest: Path, *, exclusive: bool) -> None:
        """Write content (from the data folder if it is there, else the keep
        area) at ``dest``, atomically; never over an existing file if exclusive."""
        if kind is Kind.DIR:
            dest.mkdir(mode=mode or 0o755, exist_ok=not exclusive)
            dest.chmod(mode)
            return
        tmp = self.keep.temp_name(dest)
        at_source = self._observed_content(source_rel) == content
        if kind is Kind.SYMLINK:
            target = (str((self.root / source_rel).readlink()) if at_source
                      else self.keep.read_link(content))
            tmp.symlink_to(target)
        else:
            if at_source:
                _copy(self.root / source_rel, tmp)
            else:
                self.keep.copy_out(content, tmp)
            tmp.chmod(mode)
        try:
            if exclusive:
                os.link(tmp, dest, follow_symlinks=False)  # fails if dest exists
                tmp.unlink()
            else:
                tmp.replace(dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _observed_content(self, rel: str) -> tuple[Kind, bytes, int] | None:
        try:
            observed = self.scanner.observe(rel)
        except ScanError:
            return None
        return None if observed is None else observed.content

    # --- pushes -----------------------------------------------------------------------

    async def _finish_push(self, push_id: str) -> None:
        """A push that was landing when the agent stopped: drop rsync's partial files
        of its paths, file what it displaced (``push_ended``)."""
        paths = self.keep.noted_paths(push_id)
        LOG.warning("push %s was cut short when the agent stopped: finishing it", push_id)
        for rel in paths:
            self._drop_partial(rel)
        await self.push_ended(push_id, paths)

    def _drop_partial(self, rel: str) -> None:
        """Remove rsync's temp files of ``rel``: ``.<name>.XXXXXX`` in its folder, the
        name cut to fit NAME_MAX (rsync's receiver.c, get_tmpname)."""
        folder, _, name = rel.rpartition("/")
        known = self._observed_content(folder) if folder else (Kind.DIR, b"", 0)
        if known is None or known[0] is not Kind.DIR:
            return  # gone, or a symlink we must not follow
        target = os.fsencode(name)
        with contextlib.suppress(OSError):
            for entry in list((self.root / folder).iterdir()):
                raw = os.fsencode(entry.name)
                stem = raw[1:-7]
                ours = stem == target or (len(target) > NAME_MAX - 8 and target.startswith(stem))
                if ours and _RSYNC_TEMP.fullmatch(raw) and not entry.is_symlink():
                    LOG.warning("removing %s, a partial file of a push cut short", entry)
                    entry.unlink()

    def receiving(self, push_id: str, versions: dict[str, Version]) -> None:
        """A push of ``versions`` is about to land.

        rsync moves what a push replaces into the push's backup dir, then renames
        the new bytes into place. Scanned before the push ended, those bytes would
        be adopted (they match the push's intent) before the replica heard what was
        displaced; the intent spent, it would take the displaced content, an older
        version it held, for an edit made on top of the pushed one and write it
        back as a new write that beats both (DESIGN.md, "the race to design for").
        So a path waits while a push still landing has displaced it — and only
        then: a push that stalls before touching it holds nothing up. The replica
        keeps one intent per path; with several pushes on one path, each gets its
        own for what it displaced, and a scan the one whose bytes are there.
        """
        self.keep.note_push(push_id, sorted(versions))
        self._began[push_id] = time.monotonic()
        self._disk_before[push_id] = {p: self.index.state(p).disk for p in versions}
        for path, version in versions.items():
            self.landing.setdefault(path, set()).add(push_id)
            self.landed.setdefault(path, {})[push_id] = version

    def refused(self, push_id: str, paths: list[str]) -> None:
        """``receiving`` was called, but the push will not run."""
        self._release(push_id, paths)
        for path in paths:
            self.landed.get(path, {}).pop(push_id, None)
            self._forget_landed(path)
        self.keep.forget_push(push_id)

    def _release(self, push_id: str, paths: list[str]) -> None:
        self._began.pop(push_id, None)
        self._disk_before.pop(push_id, None)
        for path in paths:
            pushes = self.landing.get(path, set())
            pushes.discard(push_id)
            if not pushes:
                self.landing.pop(path, None)

    def _forget_scans(self) -> None:
        """Scan times matter only against events still on their way: keep them briefly."""
        if len(self._scanned_at) > SCANS_KEPT:
            old = time.monotonic() - DEFER_S
            self._scanned_at = {p: t for p, t in self._scanned_at.items() if t > old}

    def _young_landing(self, path: str, now: float) -> bool:
        return any(now - self._began.get(push_id, now) < DEFER_S
                   for push_id in self.landing.get(path, ()))

    def _displaced_by_landing(self, path: str) -> bool:
        return any(os.path.lexists(self.keep.push_dir(push_id) / path)
                   for push_id in self.landing.get(path, ()))

    def _intend(self, path: str, version: Version | None) -> None:
        if version is not None:
            self.replica.intents[path] = version

    def _pick_intent(self, path: str, observed: Observed | None) -> None:
        """The intent of the push whose bytes are at ``path``, if a push put them there."""
        seen = None if observed is None else observed.content
        pushed = self.landed.get(path, {}).values()
        self._intend(path, next((v for v in pushed if v.content == seen), None))

    def _forget_landed(self, path: str) -> None:
        """``path`` was scanned: pushes that ended left their bytes there, or none."""
        pushed = self.landed.get(path)
        if pushed is None:
            return
        landing = self.landing.get(path, set())
        for push_id in [p for p in pushed if p not in landing]:
            del pushed[push_id]
        if not pushed:
            del self.landed[path]
            self.replica.clear_intents([path])

    async def push_ended(self, push_id: str, paths: list[str], *, complete: bool = False,
                         ) -> None:
        """An incoming push finished: file what it displaced, then scan what it wrote.
        ``complete``: rsync succeeded, so every version the push announced was at its
        path when it ended (see ``_took_in``)."""
        backup = self.keep.push_dir(push_id)
        effects: list[Effect] = []
        try:
            with self.index.batch():
                for rel in _files_under(backup):
                    displaced = backup / rel
                    try:
                        observed = self._observe_file(displaced)
                        if observed is not None:
                            self.keep.file_away(displaced, observed.content)
                    except (OSError, ScanError) as err:
                        LOG.warning("keep %s displaced by push %s: %s", rel, push_id, err)
                        continue  # left in the push's dir, filed at the next start
                    effects += self._took_in_earlier(rel, push_id, observed)
                    self._intend(rel, self.landed.get(rel, {}).get(push_id))
                    known = self._disk_before.get(push_id, {}).get(rel)
                    effects += self.replica.displaced(rel, observed, _ms(), known=known)
            if complete:  # before the release: until then no scan forgets what landed
                effects += self._took_in(push_id, paths)
        finally:
            self._release(push_id, paths)
        await self.apply(effects)
        await self.scan(paths)
        _remove_empty_dirs(backup)
        self.keep.forget_push(push_id)

    def _took_in(self, push_id: str, paths: list[str]) -> list[Effect]:
        """Take in, as if scanned the moment the push ended, each version it landed on a
        path that has changed since — before any scan of ours saw it there.

        Without this, a change made right after the bytes landed (a delete of a file
        the moment it appears, an edit) would be scanned as a write that never saw the
        pushed version: concurrent with it, so a conflict, and a delete undone (an edit
        beats a delete). A change made *before* rsync replaced the file is not one of
        these: rsync moved it into the keep area, and ``displaced`` saw it there.

        Only for paths that no other push is landing on, whose pushed version is newer
        than what we hold, and that look changed (kind, size or mtime, which rsync sets,
        differ from the version's); the scan that follows confirms the rest."""
        effects: list[Effect] = []
        with self.index.batch():
            for path in paths:
                version = self.landed.get(path, {}).get(push_id)
                if version is None or self.landing.get(path, set()) - {push_id}:
                    continue
                disk = self.index.state(path).disk
                if disk is not None and (disk == version or not version.vector.dominates(
                        disk.vector)):
                    continue
                if not self._changed_since_landing(path, version):
                    continue
                w = version.winner
                observed = None if w.hash is None else Observed(w.kind, w.hash, w.size,
                                                                 w.mtime_ns, w.mode)
                self._intend(path, version)
                effects += self.replica.local(path, observed, _ms())
        return effects

    def _took_in_earlier(self, path: str, push_id: str, observed: Observed | None,
                         ) -> list[Effect]:
        """What this push displaced is what another push landed there, unscanned (two
        pushes overlapped: a version, then its delete, say): take that version in first,
        as scanned before it was displaced, so that it is not mistaken for an edit of
        ours — one that would bring a deleted file back as a new write."""
        seen = None if observed is None else observed.content
        earlier = next((v for pid, v in self.landed.get(path, {}).items()
                        if pid != push_id and v.content == seen), None)
        if earlier is None or seen is None or self.index.state(path).disk == earlier:
            return []
        self._intend(path, earlier)
        return self.replica.local(path, observed, _ms())

    def _changed_since_landing(self, path: str, version: Version) -> bool:
        w = version.winner
        try:
            st = os.lstat(self.root / path)
        except (FileNotFoundError, NotADirectoryError):
            return w.hash is not None
        if w.hash is None:
            return True
        kind = (Kind.DIR if stat.S_ISDIR(st.st_mode) else Kind.SYMLINK
                if stat.S_ISLNK(st.st_mode) else Kind.FILE)
        if kind is not w.kind:
            return True
        return kind is Kind.FILE and (st.st_size, st.st_mtime_ns) != (w.size, w.mtime_ns)

    def _observe_file(self, path: Path) -> Observed | None:
        scanner = Scanner(path.parent, ignore=lambda _: False)
        return scanner.observe(path.name)


def _copy(src: Path, dst: Path) -> None:
    with src.open("rb") as a, dst.open("xb") as b:
        while chunk := a.read(1 << 20):
            b.write(chunk)


def _files_under(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath).relative_to(root)
        for name in [*filenames, *(d for d in dirnames if (Path(dirpath) / d).is_symlink())]:
            out.append(str(base / name) if str(base) != "." else name)
    return sorted(out)


def _remove_empty_dirs(root: Path) -> None:
    """Remove ``root`` and the directories under it, deepest first. What could not be
    filed keeps its directory, and the next start files it (``KeepArea.unfinished``)."""
    for dirpath, _, _ in os.walk(root, topdown=False):
        with contextlib.suppress(OSError):  # not empty
            Path(dirpath).rmdir()
