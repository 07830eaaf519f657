"""Files the agent put in place and recorded: the watcher's scan that each one's rename
sets off needs no more than a ``stat`` of it (issue 16).

A push's adoption renames thousands of files into place and records each as on our
disk. inotify then reports every rename, and the watcher's scan of the path used to
read its row, look up the stat cache and compare: a fifth of an empty node's join.

``PlacedFiles`` remembers, for each file whose record is committed, its identity as it
was placed: inode, size, file type and permissions, mtime and ctime. A watcher's scan
of that path looks once: when the path still holds that very file, unchanged, the
record says what is there and the scan goes no further. Any change since makes a
difference: a write sets the mtime to now, and this only remembers files whose mtime
(the version's, set before the rename) is older than the scanner's racy window; a
write, chmod, truncate, link or rename sets the ctime; another file there has another
inode. A mismatch, or a path this does not know, is scanned as always. Each identity
is looked at once and then forgotten; at most ``limit`` are remembered, the oldest
forgotten first, and a forgotten one only costs the full scan.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from mesh.adapters.fs.beneath import Beneath, OpenFolders
from mesh.engine.keep import chunked
from mesh.errors import MeshError

LIMIT = 16_384  # identities remembered (about 250 bytes each): eight pushes behind
CHUNK = 256  # paths looked at with one set of open folders

Identity = tuple[int, int, int, int, int]


def identity(st: os.stat_result) -> Identity:
    return st.st_ino, st.st_size, st.st_mode, st.st_mtime_ns, st.st_ctime_ns


class PlacedFiles:
    def __init__(self, fs: Beneath, *, racy_ns: int, limit: int = LIMIT) -> None:
        """``racy_ns``: the scanner's racy window (``Scanner.racy_ns``), which its stat
        cache keeps to as well: a later write moves the mtime past it."""
        self.fs = fs
        self.racy_ns = racy_ns
        self.limit = limit
        # Oldest first. An OrderedDict: its oldest go one by one, and a dict would skip
        # the empty slots its deleted front leaves at every look for the next oldest.
        self._placed: OrderedDict[str, Identity] = OrderedDict()

    def __len__(self) -> int:
        return len(self._placed)

    def recorded(self, files: Iterable[tuple[str, os.stat_result]]) -> None:
        """Each ``(path, its lstat once in place)``: a file the agent placed there whose
        record (the very content it placed) is committed. Call it after the commit."""
        now = time.time_ns()
        for rel, st in files:
            self._placed.pop(rel, None)  # (re-inserted last: the newest)
            if now - st.st_mtime_ns > self.racy_ns:  # else a write in its tick would not show
                self._placed[rel] = identity(st)
        while len(self._placed) > self.limit:
            self._placed.popitem(last=False)

    def unchanged(self, rels: Sequence[str]) -> set[str]:
        """Of ``rels``, the paths that hold the very file placed there, unchanged since;
        each path's identity is forgotten once looked at."""
        if not self._placed:
            return set()
        wanted = [(rel, want) for rel in rels
                  if (want := self._placed.pop(rel, None)) is not None]
        out: set[str] = set()
        for part in chunked(wanted, CHUNK):
            with OpenFolders(self.fs) as folders:
                for rel, want in part:
                    try:
                        fd, name = folders.parent(rel)
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except (OSError, MeshError):
                        continue  # gone, or a folder above it is: the scan sees what
                    if identity(st) == want:
                        out.add(rel)
        return out
