"""The node's data folder: scans feed the replica, and the replica's file effects
(conflict copies, restores, deletes) are carried out here.

Effects are processed from a work queue, not by recursion: a restore first rescans
its path (what it replaces is then an indexed version, ``mesh.core.replica.Restore``).

Incoming pushes follow ``mesh.core.landing``: rsync stages a push's bytes in
the keep area, never in the data folder; at the push's end (or at the next start,
after a kill) the staged bytes that are a version the path converges to are kept,
and the replica's restores put them in place, each after a scan of the path.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Container, Iterable
from pathlib import Path

from mesh.adapters.fs.reconcile import Reconciled
from mesh.adapters.fs.scanner import ScanError, Scanner, Unsettled
from mesh.adapters.fs.walker import against_index
from mesh.clock import now_ms
from mesh.core.effects import Effect, Observed, Restore, Want, WriteCopy
from mesh.core.landing import Staged, StagedFile, staged, to_reaim
from mesh.core.manifest import ContentKey, Kind
from mesh.core.paths import deepest_first, parent
from mesh.core.replica import Replica
from mesh.core.resolver import Version
from mesh.core.retention import Reason
from mesh.engine.keep import KeepArea, chunked, drop_tree, remove_empty_dirs
from mesh.engine.materialize import Materializer, Superseded
from mesh.engine.placed import PlacedFiles
from mesh.engine.scanmarks import ScanMarks
from mesh.engine.staged import Staging
from mesh.errors import MeshError
from mesh.store.index import Index
from mesh.store.kept import KeptLog

LOG = logging.getLogger("mesh.data")

SCAN_BATCH = 500
APPLY_CHUNK = 256  # effects per transaction of an apply; the loop runs others between
APPLY_STEPS = 100_000  # at most, in one apply

Forward = Callable[[list[Effect]], Awaitable[None]]


class DataPlane:
    def __init__(self, *, root: Path, replica: Replica, index: Index, keep: KeepArea,
                 scanner: Scanner, forward: Forward,
                 being_written: Callable[[], Container[str]] = frozenset) -> None:
        """``being_written``: the files a writer has open and changed (the watcher's
        ``being_written``); a restore leaves them until the writer closes them."""
        self.root = root
        self.replica = replica
        self.index = index
        self.keep = keep
        self.scanner = scanner
        self.forward = forward  # announcements and conflicts go to the exchange
        self.being_written = being_written
        self.unsettled: set[str] = set()
        self._deferred: set[str] = set()  # restores left while a writer had the file open
        self._busy: Container[str] = frozenset()  # ``being_written`` as this chunk began
        # One apply (or push's end) at a time: each yields between its chunks, and the
        # keep area's held files and the counts of who takes a kept content are its own.
        self._applying = asyncio.Lock()
        self.marks = ScanMarks()  # when each path's last scan began
        self.fs = keep.fs  # file operations beneath the root, no symlink followed
        self.kept = KeptLog(index)  # what is filed into the keep area, and why (issue 14)
        self.writer = Materializer(index=index, keep=keep, kept=self.kept, scanner=scanner)
        self.placed = PlacedFiles(self.fs, racy_ns=scanner.racy_ns)  # as the agent placed them
        self.staging = Staging(index=index, replica=replica, keep=keep, scanner=scanner,
                               placed=self.placed)
        self.wants = 0
        # Hashes of kept content that a kept row records (or may, once this apply
        # files it away): read once per ``apply``, not per restore.
        self._kept_rows: set[bytes] = set()

    # --- scanning ---------------------------------------------------------------------

    async def scan(self, paths: Iterable[str], *, events_read: float | None = None,
                   prehash: bool = True) -> None:
        """Observe ``paths`` and feed the replica, in transactions of SCAN_BATCH, the
        event loop served between two (issue 16: a scan of the whole tree held it for
        seconds, and the links went silent).

        For the watcher's paths (``events_read``: its events were all read from inotify
        before that ``time.monotonic()``), also skipped: a path scanned since (it shows
        the change already), so a burst of pushed files is scanned once. ``prehash``
        False: the caller hashed the large files among ``paths`` already.
        """
        now = time.monotonic()
        asked = list(paths)
        paths = asked
        if events_read is not None:
            paths = [p for p in paths if self.marks.since(p) < events_read]
            as_placed = self.placed.unchanged(paths)  # their renames' events: no more
            if as_placed:
                for path in as_placed:
                    self.marks.mark(path, now)
                self.marks.forget()  # no _observe may run to (a join's marks held every path)
                paths = [p for p in paths if p not in as_placed]
                asked = [p for p in asked if p not in as_placed]
        kept = set(paths) if len(paths) < len(asked) else None
        skipped = [] if kept is None else [p for p in asked if p not in kept]
        if skipped:  # each is in a scan under way (or over), which this one waits for
            LOG.debug("not scanning now: %d path(s): %s", len(skipped), skipped[:20])
        LOG.debug("scanning %d path(s): %s", len(paths), paths[:3])
        # Each of these is observed after ``now``: a watcher batch of events read before it,
        # arriving while this scan waits (on a hash), need not look again (a received 256
        # MiB file was hashed twice at once, by the push's end and by the watcher).
        large = self.scanner.to_prehash(paths) if prehash else []
        # Not all of a start-up scan's paths: a mark each was a million at once.
        done = self.marks.begin(paths if len(paths) <= self.marks.kept else large, now)
        try:
            if large:  # hashing hundreds of MB would stall every link and push here
                await asyncio.to_thread(self.scanner.prehash, large)
            batch: list[str] = []
            for path in paths:
                batch.append(path)
                if len(batch) >= SCAN_BATCH:
                    await self.apply(self._observe(batch))
                    batch = []
                    await asyncio.sleep(0)  # apply need not yield: links, broker, control
            if batch:
                await self.apply(self._observe(batch))
        finally:
            self.marks.end(done)
        await self.marks.running(skipped)
        # A restore left for its writer: scanned now, so aimed again. (Looked for only
        # while one waits: a start-up scan's million paths need not be gone through.)
        again = self._deferred.intersection(paths) if self._deferred else set()
        if again:
            self._deferred -= again
            await self.apply(await self._reaim(sorted(again)))

    async def startup(self, found: Reconciled | None = None) -> int:
        """Keep what the pushes the last stop cut short had staged, then reconcile the
        index with the disk: what changed while we were down becomes local edits
        (unchanged files are not re-hashed); restores that were pending are asked for
        again. ``found``: a walk begun once the watcher was open, and after the landing
        of any push the last stop cut short (``mesh.engine.startwalk``); what changes
        during it is an event, or recorded by the push that lands it."""
        while self.keep.unfinished:
            push_id = self.keep.unfinished.pop()
            LOG.warning("push %s was cut short when the agent stopped: keeping what it "
                        "staged", push_id)
            await self.push_ended(push_id)
        if found is None:
            found = await against_index(self.scanner, self.index)
        if found.large:  # hashing hundreds of MB would stall every link of this node
            await asyncio.to_thread(self.scanner.prehash, found.large)
        LOG.info("start-up reconcile: %d paths on disk, %d unchanged (not scanned), "
                 "%d to scan, %d gone; walked in %.2f s%s", found.on_disk, found.unchanged,
                 found.changed, len(found.gone), found.walk_s,
                 f" (its process's peak RSS {found.peak_rss_kib / 1024:.0f} MiB)"
                 if found.peak_rss_kib else "")
        for paths in found.to_scan():  # a run at a time (issue 16: a million at once)
            await self.scan(paths, prehash=False)
        await self.scan(deepest_first(found.gone), prehash=False)
        # Every pending target, in transactions of APPLY_CHUNK (a node killed in a join
        # has a target for each path it had not received yet).
        await self.apply(await self._reaim(v.path for v in self.index.targets()))
        return found.on_disk

    def _observe(self, paths: list[str],
                 seen: dict[str, Observed | None] | None = None) -> list[Effect]:
        """Scan ``paths`` and feed the replica; ``seen`` gets what was found at each
        path that could be read."""
        effects: list[Effect] = []
        queue = deque(paths)
        done: set[str] = set()
        self.marks.forget()
        with self.index.batch():
            self.index.prefetch(paths)  # one query per chunk, not a row per path
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
                self.marks.mark(path, started)
                if seen is not None:
                    seen[path] = observed
                if observed is None and path not in done:
                    # A folder moved out of the root is reported alone: what we indexed
                    # inside it is gone too, and its deletes go first (a folder delete
                    # is applied once what it held is gone, see Replica._aim).
                    inside = self.index.paths_under(path)
                    if inside:
                        done.update([path, *inside])
                        queue.extendleft(reversed([*deepest_first(inside), path]))
                        continue
                effects += self.replica.local(path, observed, now_ms())
            self.index.set_meta("clock", self.replica.clock)
        return effects

    # --- effects ----------------------------------------------------------------------

    async def apply(self, effects: list[Effect]) -> None:
        if not effects:
            return
        if any(isinstance(fx, (WriteCopy, Restore)) for fx in effects):
            async with self._applying:
                passed = await self._apply(effects)
        else:
            # No file work: no wait for an apply or a push's end under way. (Issue 16: a
            # push's begin, all wants, waited for the end of the push before it, so a
            # join moved one push at a time: rsync idle while the end ran, and the end
            # idle while rsync did.)
            self.wants += sum(isinstance(fx, Want) for fx in effects)
            passed = [fx for fx in effects if not isinstance(fx, Want)]
        if passed:
            await self.forward(passed)

    async def _apply(self, effects: list[Effect]) -> list[Effect]:
        """The file work among ``effects`` (under ``_applying``); the rest is returned.
        In transactions of ``APPLY_CHUNK``, the loop served between two (issue 16: among
        ten nodes, a push's end of 2,000 restores held each receiver's loop 3 to 5 s)."""
        queue: deque[Effect] = deque(effects)
        passed: list[Effect] = []
        # How many restores want each content: the last one may take it out of the keep.
        needed = Counter(fx.version.content for fx in effects
                         if isinstance(fx, Restore) and fx.version.content is not None)
        # Bounded: every step settles a path or gives up on it.
        for chunk in range(APPLY_STEPS // APPLY_CHUNK):
            if chunk:
                await asyncio.sleep(0)
            # A transaction per chunk: a push's end restores thousands of paths, each
            # scanned and recorded (a commit each was most of a burst's time). What the
            # restores will ask for one by one is read in bulk (issue 16: a query each
            # per state and per kept content was a fifth of the receiver's time).
            with self.index.batch():
                ahead = list(itertools.islice(queue, APPLY_CHUNK))
                restored = [fx.version.path for fx in ahead if isinstance(fx, Restore)]
                self._busy = self.being_written() if restored else frozenset()
                self.index.prefetch([*restored, *filter(None, map(parent, restored))])
                if not chunk:
                    self._kept_rows = set(self.kept.rows_of(c[1] for c in needed))
                for _ in range(APPLY_CHUNK):
                    if not queue:
                        return passed
                    fx = queue.popleft()
                    if isinstance(fx, WriteCopy):
                        queue.extend(self._write_copy(fx))
                    elif isinstance(fx, Restore):
                        queue.extend(self._restore(fx.version, needed))
                    elif isinstance(fx, Want):
                        self.wants += 1
                    else:
                        passed.append(fx)
        LOG.error("an apply gave up after %d steps; %d effects left", APPLY_STEPS, len(queue))
        return passed

    def _write_copy(self, fx: WriteCopy) -> list[Effect]:
        content = fx.source.content
        try:
            if content is None or self.fs.lexists(fx.path):
                return []
            self.writer.materialize(fx.source.path, fx.source.kind, content, fx.source.mode,
                                    fx.path, exclusive=True)
        except FileExistsError:
            return []
        except (OSError, MeshError) as err:
            LOG.warning("conflict copy %s: %s", fx.path, err)
            return []
        LOG.info("kept the losing version of %s as %s", fx.source.path, fx.path)
        return self._observe([fx.path])

    def _restore(self, version: Version, needed: Counter[ContentKey]) -> list[Effect]:
        rel = version.path
        if rel in self._busy:
            # Its writer has it open: a scan now could record half a write (a file
            # truncated, then written in place) as an edit of ours, and a second
            # conflict. Its close brings the scan, and this restore again (``scan``).
            LOG.debug("restore %s: being written; waiting for its writer to close it", rel)
            self._deferred.add(rel)
            return []
        seen: dict[str, Observed | None] = {}
        effects = self._observe([rel], seen)  # record anything unscanned first
        if rel not in seen:  # unreadable or still being written: its next scan aims again
            return effects
        if self.index.state(rel).target != version:
            return effects
        winner = version.winner
        current = seen[rel]  # what the index now records there, and what we file away
        if current is not None:
            # Filed away below and maybe recorded as kept: a later restore of this apply
            # must not take that object out of the keep area (it copies it instead).
            self._kept_rows.add(current.content[1])
        try:
            if version.content is not None:
                needed[version.content] -= 1
                # A loser's content replaced by the winner is kept as the conflict's.
                why = (Reason.LOST if current is not None and version.holds(current.content)
                       else Reason.REPLACED)
                self.writer.materialize(rel, winner.kind, version.content, winner.mode, rel,
                                        exclusive=False, mtime_ns=winner.mtime_ns,
                                        replacing=current, why=why,
                                        at_source=current is not None
                                        and current.content == version.content,
                                        take=needed[version.content] <= 0
                                        and version.content[1] not in self._kept_rows)
            else:
                if current is not None:
                    self.writer.file_away(rel, rel, current.content, Reason.DELETED)
                    self._kept_rows.add(current.content[1])
                if self.fs.lexists(rel):  # a folder still holding entries: the replica
                    return effects + self._observe([rel])  # decides (DESIGN.md, Folders)
        except Superseded:
            LOG.info("restore %s: it was edited since its scan; the edit is scanned first",
                     rel)
            return effects + self._observe([rel])
        except (OSError, MeshError) as err:
            LOG.warning("restore %s: %s", rel, err)
            return effects + self._observe([rel])
        # On disk from now on: a change made right after is an edit on top of it.
        return effects + self.replica.restored(rel, version)

    def write_back(self, source_rel: str, kind: Kind, content: ContentKey, mode: int,
                   dest_rel: str, replacing: Observed | None = None) -> None:
        """Put kept ``content`` (from ``source_rel`` if it holds it, else the keep area)
        at ``dest_rel``, as the data plane writes: a temp name the watcher ignores,
        renamed into place, so the watcher sees one finished local edit (an operator's
        restore). ``replacing``: what ``dest_rel`` holds (as scanned), kept as a
        replaced version."""
        self.writer.materialize(source_rel, kind, content, mode, dest_rel, exclusive=False,
                                replacing=replacing)

    # --- pushes -----------------------------------------------------------------------

    async def push_ended(self, push_id: str, announced: Iterable[str] = ()) -> None:
        """An incoming push ended, however rsync exited (``mesh.core.landing``): keep the
        staged bytes that are a version we converge to, drop the rest, and ask again
        for what each path converges to; the restores that follow put them in place.
        A staged file whose path holds nothing here is adopted instead
        (``mesh.engine.staged``), after the restores (they make its folder)."""

        def converged_to(rel: str, found: Observed) -> bool:
            st = self.index.state(rel)
            goal = st.target or st.disk
            return goal is not None and staged(
                {rel: goal}, StagedFile(rel, found.content)) is Staged.KEEP

        staging = self.keep.staging_dir(push_id)
        passed: list[Effect] = []
        try:
            async with self._applying:  # held files are this push's until file_held
                try:
                    # Held where rsync staged them: a restore moves each to its path in
                    # one rename (``KeepArea.hold``); what is left is filed away below.
                    found = await self.staging.sort(
                        staging, lambda rel: self.keep.staging_rel(push_id, rel),
                        converged_to, prefetch=True, hold=True, adopt=True)
                    # A push that landed the way releases before issue 11 did (in place,
                    # what it replaced in ``<keep>/<push id>``), cut short by a stop:
                    # keep what it displaced.
                    backup = self.keep.push_dir(push_id)
                    await self.staging.sort(
                        backup, lambda rel: self.keep.push_rel(push_id, rel),
                        lambda _rel, _found: True)
                    remove_empty_dirs(backup)
                    adopting = {f.rel for f in found.adoptable}
                    passed = await self._apply(await self._reaim(
                        p for p in to_reaim(announced, found.kept) if p not in adopting))
                    effects, left = await self.staging.adopt(found.adoptable)
                    for f in left:  # held now, so that its restore takes it
                        self.keep.hold(f.staged, f.found.content)
                    passed += await self._apply(
                        effects + await self._reaim(f.rel for f in left))
                finally:
                    for rel, err in self.keep.file_held():
                        LOG.warning("keep %s: %s", rel, err)
        finally:
            await asyncio.to_thread(drop_tree, staging)  # the rest: not the version
        if passed:
            await self.forward(passed)

    async def _reaim(self, paths: Iterable[str]) -> list[Effect]:
        """What each of ``paths`` converges to, asked again, a transaction per chunk (the
        states read in bulk), the loop served between two."""
        effects: list[Effect] = []
        for part in chunked(list(paths), APPLY_CHUNK):
            with self.index.batch():
                self.index.prefetch(part)
                effects += [fx for rel in part for fx in self.replica.reaim(rel)]
            await asyncio.sleep(0)
        return effects
