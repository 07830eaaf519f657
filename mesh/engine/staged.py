"""What a push staged (``mesh.core.landing``), at its end: each file filed into the keep
area, or held there for its restore, or *adopted*.

Adoption (issue 16) is how a push fills paths that hold nothing here: an empty node's
join, a new folder's files. A staged file whose path has no version on our disk and
converges to exactly the staged content is moved from the staging dir to its path in
one rename that never replaces anything, and recorded as on disk, in transactions of
many paths. The restore's other steps are for what it replaces, and there is nothing
to replace: no scan of the path first (anything that came there meanwhile makes the
rename fail, and that path then takes the restore's way), no temp name, no second
rename, no walk down from the root per file.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mesh.adapters.fs.beneath import Beneath, OpenFolders
from mesh.adapters.fs.scanner import Scanner
from mesh.core.effects import Effect, Observed
from mesh.core.landing import adoptable
from mesh.core.paths import parent
from mesh.core.replica import Replica
from mesh.core.resolver import Version
from mesh.engine.keep import KeepArea, chunked, files_under
from mesh.engine.placed import PlacedFiles
from mesh.errors import MeshError
from mesh.store.index import Index

LOG = logging.getLogger("mesh.data")

# Staged files per transaction; the loop runs other tasks between two. Among them is the
# relay of the next push's bytes, which moves what one read brings each time it runs
# (issue 16: with 256, a join's next push waited on this one's end).
CHUNK = 64

_Seen = Observed | OSError | MeshError | None  # a staged file as scanned, or why not


@dataclass(frozen=True, slots=True)
class Adoptable:
    """A staged file (``staged``, relative to the data folder) that its path ``rel``
    may take as it is: ``version`` is what ``rel`` converges to, with no disk version."""

    rel: str
    staged: str
    found: Observed
    version: Version


@dataclass
class Sorted:
    kept: list[str]  # filed or held, by their path in the folder
    adoptable: list[Adoptable]  # neither: left where they are for ``Staging.adopt``


class Staging:
    def __init__(self, *, index: Index, replica: Replica, keep: KeepArea,
                 scanner: Scanner, placed: PlacedFiles) -> None:
        self.index = index
        self.replica = replica
        self.keep = keep
        self.fs: Beneath = keep.fs
        self.scanner = scanner  # of the data folder: its stat cache learns adopted files
        self.placed = placed  # and the watcher's scan of each looks no further than a stat

    async def sort(self, folder: Path, rel_of: Callable[[str], str],
                   wanted: Callable[[str, Observed], bool], *, prefetch: bool = False,
                   hold: bool = False, adopt: bool = False) -> Sorted:
        """File into the keep area's objects each file under ``folder`` (a staging or
        backup dir; ``rel_of`` names it from the data folder) that is ``wanted``.
        ``prefetch``: the states of the files' paths, which ``wanted`` reads,
        are read in bulk first. ``hold``: files stay where they are until
        ``KeepArea.file_held``. ``adopt``: a file its path may adopt (``adoptable``)
        is left where it is, neither filed nor held."""
        # Listed and hashed in a worker thread: a push's end of 2,000 files spent half
        # its time there, on the loop that also relays the next push (issue 16).
        found = await asyncio.to_thread(_observe_all, folder)
        out = Sorted([], [])
        for part in chunked(found, CHUNK):
            # A transaction each, no await inside: another task's batch must not join it.
            with self.index.batch():
                self.index.prefetch([rel for rel, _ in part] if prefetch else ())
                for rel, seen in part:
                    try:
                        if isinstance(seen, Exception):
                            raise seen
                        if seen is None or not wanted(rel, seen):
                            continue
                        version = adoptable(self.index.state(rel), seen) if adopt else None
                        if version is not None:
                            out.adoptable.append(Adoptable(rel, rel_of(rel), seen, version))
                            continue
                        (self.keep.hold if hold else self.keep.file_away)(rel_of(rel),
                                                                           seen.content)
                        out.kept.append(rel)
                    except (OSError, MeshError) as err:
                        LOG.warning("keep %s: %s", rel_of(rel), err)
            await asyncio.sleep(0)  # the loop is served between two (issue 16)
        return out

    async def adopt(self, files: Sequence[Adoptable]
                    ) -> tuple[list[Effect], list[Adoptable]]:
        """Move each of ``files`` to its path and record it there, if its path still
        holds nothing and converges to it; the replica's effects, and the files left
        (each still staged, for the restore's way)."""
        effects: list[Effect] = []
        left: list[Adoptable] = []
        for part in chunked(files, CHUNK):
            with self.index.batch(), OpenFolders(self.fs) as folders:
                self.index.prefetch([*(f.rel for f in part),
                                     *filter(None, (parent(f.rel) for f in part))])
                placed: list[tuple[str, os.stat_result, bytes]] = []
                for f in part:
                    if adoptable(self.index.state(f.rel), f.found) != f.version:
                        left.append(f)  # changed since it was sorted
                        continue
                    try:
                        staged = self._set_mtime(f, folders)
                        if not self.fs.move_new(f.staged, f.rel, folders):
                            left.append(f)  # something came there: a restore scans it
                            continue
                        fd, name = folders.parent(f.rel)
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except (OSError, MeshError) as err:
                        LOG.debug("adopt %s: %s; restoring it instead", f.rel, err)
                        left.append(f)
                        continue
                    # On disk from now on: a change made right after is an edit on top.
                    effects += self.replica.restored(f.rel, f.version)
                    if st.st_ino == staged.st_ino:  # not a file put there since the rename
                        placed.append((f.rel, st, f.found.hash))
                self.scanner.remember(placed)
            self.placed.recorded((rel, st) for rel, st, _ in placed)  # committed
            await asyncio.sleep(0)
        return effects, left

    def _set_mtime(self, f: Adoptable, folders: OpenFolders) -> os.stat_result:
        """The version's mtime on the staged file, if rsync left another (its mode is
        the version's: it is part of the content); the staged file's ``lstat`` then."""
        fd, name = folders.parent(f.staged)
        mtime_ns = f.version.winner.mtime_ns
        if mtime_ns <= 0 or mtime_ns == f.found.mtime_ns:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        out = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        try:
            os.utime(out, ns=(mtime_ns, mtime_ns))
            return os.fstat(out)
        finally:
            os.close(out)


def _observe_all(folder: Path) -> list[tuple[str, _Seen]]:
    """Each file and link under ``folder`` (a staging or backup dir, which no one but
    the agent touches once its push is over) as the scanner sees it, or why not. For a
    worker thread: no SQLite here, and hashlib releases the GIL on large files."""
    scanner = Scanner(folder, ignore=lambda _: False)
    out: list[tuple[str, _Seen]] = []
    for rel in files_under(folder):
        try:
            out.append((rel, scanner.observe(rel)))
        except (OSError, MeshError) as err:
            out.append((rel, err))
    return out
