"""The node's data folder: scans feed the replica, and the replica's file effects
(conflict copies, restores, deletes) are carried out here.

Effects are processed from a work queue, not by recursion: a restore first
rescans its path (so what it replaces is an indexed version, see
``mesh.core.replica.Restore``), which can produce further effects.

Incoming pushes follow ``mesh.core.landing``: a push begins only once no push
still landing holds one of its paths (``receiving`` waits), its paths are held
until it ended (no scan, restore or conflict copy touches them), and then each
path is settled from what the push displaced (in its backup dir), what is there
now and how rsync ended; the steps it returns are carried out here. A push cut
short by a stop of the agent is noted in the keep area with its announcement and
settled the same way at the next start, before anything else is scanned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from mesh.adapters.scanner import ScanError, Scanner, Unsettled
from mesh.core import manifest
from mesh.core.landing import (
    Landed,
    Landing,
    Landings,
    Outcome,
    Scanned,
    Step,
    Unrecorded,
    settle,
)
from mesh.core.manifest import ContentKey, Kind
from mesh.core.paths import deepest_first
from mesh.core.replica import Effect, Observed, Replica, Restore, Want, WriteCopy, group
from mesh.core.resolver import Version
from mesh.errors import MeshError, RemoteProtocolError
from mesh.keep import KeepArea
from mesh.store.index import Index

LOG = logging.getLogger("mesh.data")

SCAN_BATCH = 500
SCANS_KEPT = 10_000
SCANS_KEPT_S = 10.0  # a scan's mark matters only to watcher events already on their way
BUSY_WAIT_S = 60.0  # a push waits this long for one landing on its paths, then is refused
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
        self.landings = Landings()
        self._landing_ended = asyncio.Condition()
        self._scanned_at: dict[str, float] = {}  # path -> when its last scan began
        self.wants = 0

    def held(self, path: str) -> bool:
        """A push is landing on ``path``: nothing but its end may scan, restore or push it."""
        return self.landings.held(path)

    # --- scanning ---------------------------------------------------------------------

    async def scan(self, paths: Iterable[str], *, events_read: float | None = None) -> None:
        """Observe ``paths`` and feed the replica, in transactions of SCAN_BATCH.
        A path a push is landing on is left to that push's end, which scans it.

        For the watcher's paths (``events_read``: its events were all read from inotify
        before that ``time.monotonic()``), also skipped: a path scanned since (it shows
        the change already), so a burst of pushed files is scanned once.
        """
        now = time.monotonic()
        asked = list(paths)
        paths = [p for p in asked if not self.held(p)]
        if events_read is not None:
            paths = [p for p in paths if self._scanned_at.get(p, -1.0) < events_read]
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
            if self.held(path):  # again: a push may have begun meanwhile
                continue
            batch.append(path)
            if len(batch) >= SCAN_BATCH:
                await self.apply(self._observe(batch))
                batch = []
        if batch:
            await self.apply(self._observe(batch))

    async def startup(self) -> int:
        """Settle the pushes the last stop cut short, then reconcile the index with the
        disk: what changed while we were down becomes local edits (unchanged files are
        not re-hashed); restores that were pending are asked for again."""
        while self.keep.unfinished:
            await self._finish_push(self.keep.unfinished.pop())
        on_disk = list(self.scanner.walk())
        gone = set(self.index.paths()) - set(on_disk)
        await self.scan([*on_disk, *deepest_first(gone)])
        pending = [v.path for v in self.index.targets()]
        with self.index.batch():
            effects = [fx for path in pending for fx in self.replica.reaim(path)]
        await self.apply(effects)
        return len(on_disk)

    def _observe(self, paths: list[str]) -> list[Effect]:
        effects: list[Effect] = []
        queue = deque(paths)
        done: set[str] = set()
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
                if observed is None and path not in done:
                    # A folder moved out of the root is reported alone: what we indexed
                    # inside it is gone too, and its deletes go first (a folder delete
                    # is applied once what it held is gone, see Replica._aim).
                    inside = [p for p in self.index.paths_under(path) if not self.held(p)]
                    if inside:
                        done.update([path, *inside])
                        queue.extendleft(reversed([*deepest_first(inside), path]))
                        continue
                effects += self.replica.local(path, observed, _ms())
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
        if content is None or self.held(fx.path) or dest.exists() or dest.is_symlink():
            return []  # a push landing there brings the same copy (or the next one will)
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
        if self.held(rel):
            return []  # the landing's end asks again (Replica.reaim)
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
        """A push that was landing when the agent stopped: settle it as cut short."""
        LOG.warning("push %s was cut short when the agent stopped: settling it", push_id)
        versions: dict[str, Version] = {}
        header = self.keep.noted(push_id)
        if header is not None:
            try:
                versions = group(manifest.decode(header).entries)
            except RemoteProtocolError as err:
                LOG.warning("push %s: its note is unreadable (%s): only what it displaced "
                            "is put back", push_id, err.reason)
        self.landings.begin(Landing(push_id, "", versions))
        await self.push_ended(push_id, Outcome.CUT_SHORT)

    def _temps_of(self, rel: str) -> list[Path]:
        """rsync's temp files of ``rel``: ``.<name>.XXXXXX`` in its folder, the name cut
        to fit NAME_MAX (rsync's receiver.c, get_tmpname)."""
        folder, _, name = rel.rpartition("/")
        known = self._observed_content(folder) if folder else (Kind.DIR, b"", 0)
        if known is None or known[0] is not Kind.DIR:
            return []  # gone, or a symlink we must not follow
        target = os.fsencode(name)
        found = []
        with contextlib.suppress(OSError):
            for entry in list((self.root / folder).iterdir()):
                raw = os.fsencode(entry.name)
                stem = raw[1:-7]
                ours = stem == target or (len(target) > NAME_MAX - 8 and target.startswith(stem))
                if ours and _RSYNC_TEMP.fullmatch(raw) and not entry.is_symlink():
                    found.append(entry)
        return found

    def _finish_rename(self, rel: str, version: Version) -> None:
        """rsync was killed between keeping a file's old content and renaming the new
        one in: a temp of ``rel`` holding ``version``'s whole content is renamed into
        place (``mesh.core.landing``: "D kept" then means "V was renamed in"). Other
        temps of ``rel`` are partial files of a push cut short: removed."""
        for temp in self._temps_of(rel):
            try:
                observed = self._observe_file(temp)
                if (version.content is not None and observed is not None
                        and observed.content == version.content
                        and not os.path.lexists(self.root / rel)):
                    temp.rename(self.root / rel)
                    LOG.warning("finished the rename of %s that a push cut short", rel)
                    continue
                LOG.warning("removing %s, a partial file of a push cut short", temp)
                temp.unlink()
            except (OSError, ScanError) as err:
                LOG.warning("partial file %s: %s", temp, err)

    async def receiving(self, push_id: str, sender: str, versions: dict[str, Version],
                        header: bytes) -> None:
        """A push of ``versions`` is about to land: wait until no push still landing
        holds one of its paths (one push per path at a time), then hold them and note
        the push on disk. Raises ``MeshError`` if that takes over BUSY_WAIT_S."""
        try:
            async with asyncio.timeout(BUSY_WAIT_S), self._landing_ended:
                await self._landing_ended.wait_for(lambda: not self.landings.busy(versions))
                self.landings.begin(Landing(push_id, sender, versions))
        except TimeoutError:
            busy = sorted(self.landings.busy(versions))
            raise MeshError(f"push {push_id}: its paths are still held by {busy}") from None
        try:
            self.keep.note_push(push_id, header)
        except OSError:
            await self._release(push_id)
            raise

    async def refused(self, push_id: str) -> None:
        """``receiving`` returned, but the push will not run."""
        await self._release(push_id)
        self.keep.forget_push(push_id)

    async def _release(self, push_id: str) -> None:
        self.landings.end(push_id)
        async with self._landing_ended:
            self._landing_ended.notify_all()

    async def push_ended(self, push_id: str, outcome: Outcome) -> None:
        """An incoming push ended: settle each path it held (``mesh.core.landing``), then
        file what it displaced into the keep area and carry out the effects."""
        landing = self.landings.get(push_id)
        versions = {} if landing is None else dict(landing.versions)
        large = self.scanner.to_prehash(versions)
        if large:  # in a thread, as scan() does: a large pushed file must not stall the loop
            with contextlib.suppress(OSError, ScanError):
                await asyncio.to_thread(self.scanner.prehash, large)
        now = time.monotonic()
        for path in versions:
            self._scanned_at[path] = now  # the settle below reads them all after ``now``
        backup = self.keep.push_dir(push_id)
        displaced = _files_under(backup)
        effects: list[Effect] = []
        try:
            with self.index.batch():
                for rel in deepest_first(set(versions) | set(displaced)):
                    effects += self._settle(rel, versions.get(rel), backup, outcome)
                self.index.set_meta("clock", self.replica.clock)
            for rel in displaced:
                self._keep_displaced(backup / rel, push_id)
        finally:
            await self._release(push_id)
        with self.index.batch():
            for rel in versions:
                effects += self.replica.reaim(rel)
        await self.apply(effects)
        if self.unsettled:
            await self.scan(sorted(self.unsettled & set(versions)))
        _remove_empty_dirs(backup)
        self.keep.forget_push(push_id)

    def _settle(self, rel: str, version: Version | None, backup: Path, outcome: Outcome,
                ) -> list[Effect]:
        """Carry out ``mesh.core.landing.settle`` for one path. A path the push did not
        name but displaced (rsync removed it with a folder it deleted) is put back:
        only the user removes what a push did not name (DESIGN.md, "Folders")."""
        displaced = self._observe_displaced(backup / rel)
        if version is not None:
            self._finish_rename(rel, version)  # or drop its partial files
        st = self.index.state(rel)

        def known(content: ContentKey) -> bool:
            return any(v is not None and v.holds(content) for v in (st.disk, st.target))

        if version is None:  # displaced but not named
            effects = ([] if displaced is None or known(displaced.content)
                       else self.replica.unrecorded(rel, displaced, _ms()))
            if displaced is not None and not os.path.lexists(self.root / rel):
                self._put_back(backup / rel, rel)
            return effects + self._observe([rel])
        steps: list[Step]
        try:
            current = self.scanner.observe(rel)
        except (Unsettled, ScanError):
            self.unsettled.add(rel)  # being written: scanned once it settles
            current = None if displaced is None else displaced
            steps = [s for s in settle(version, displaced, current, outcome, known)
                     if not isinstance(s, Scanned)]
        else:
            steps = settle(version, displaced, current, outcome, known)
        out: list[Effect] = []
        for step in steps:
            if isinstance(step, Unrecorded):
                out += self.replica.unrecorded(rel, step.observed, _ms())
            elif isinstance(step, Landed):
                out += self.replica.landed(rel, step.version)
            else:
                out += self.replica.local(rel, step.observed, _ms())
        return out

    def _forget_scans(self) -> None:
        """Scan times matter only against events still on their way: keep them briefly."""
        if len(self._scanned_at) > SCANS_KEPT:
            old = time.monotonic() - SCANS_KEPT_S
            self._scanned_at = {p: t for p, t in self._scanned_at.items() if t > old}

    def _observe_displaced(self, path: Path) -> Observed | None:
        if not os.path.lexists(path):
            return None
        try:
            return self._observe_file(path)
        except (OSError, ScanError) as err:
            LOG.warning("what a push displaced at %s: %s", path, err)
            return None

    def _put_back(self, kept: Path, rel: str) -> None:
        dest = self.root / rel
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            kept.rename(dest)
            LOG.warning("put back %s: a push removed it without naming it", rel)
        except OSError as err:
            LOG.warning("put back %s: %s", rel, err)

    def _keep_displaced(self, path: Path, push_id: str) -> None:
        if not os.path.lexists(path):
            return  # put back
        try:
            observed = self._observe_file(path)
            if observed is not None:
                self.keep.file_away(path, observed.content)
        except (OSError, ScanError) as err:
            LOG.warning("keep %s displaced by push %s: %s", path, push_id, err)

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
