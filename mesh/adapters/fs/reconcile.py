"""The start-up reconcile's walk (issue 16): every path under the root, one ``lstat``
each, compared in chunks with what the index knows (``mesh.core.reconcile``); what
is unchanged is not scanned. Blocking throughout (a walk of the whole tree, reads of
the state database): ``mesh.adapters.fs.walker`` runs it off the event loop, with a
reader of its own (``mesh.store.known.open_reader``), so that links, the broker and
the control socket keep being served while it runs.

Each path is ``lstat``'ed relative to its folder, opened without following a
symlink (``listing.stat_tree``): a folder swapped for a symlink during the walk is
not listed, and what the watcher reports of the swap is scanned the careful way
(``Scanner.observe``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mesh.adapters.fs.listing import PERMISSIONS, PREHASH_BYTES, stat_tree
from mesh.core.reconcile import Fingerprint

CHUNK = 2048  # paths per query of the index

Lookup = Callable[[list[str]], Mapping[str, Fingerprint]]  # mesh.store.known


@dataclass
class Reconciled:
    on_disk: int = 0  # paths found under the root
    unchanged: int = 0
    changed: int = 0  # to scan: new, changed, unreadable
    # ... those paths, in runs of up to CHUNK joined by NUL (no path holds one): a first
    # start of a million files held them as a million strings, and a set of every path
    # found besides, 250 MiB of its 432 MiB peak (issue 16)
    runs: list[str] = field(default_factory=list)
    large: list[str] = field(default_factory=list)  # of those, files worth hashing first
    gone: list[str] = field(default_factory=list)  # indexed as held, not found
    peak_rss_kib: int = 0  # of the walk's own process (mesh.adapters.fs.walkproc), if any
    walk_s: float = 0.0  # how long the walk took, as the agent saw it

    def to_scan(self) -> Iterator[list[str]]:
        """The changed paths, a run at a time."""
        for run in self.runs:
            yield run.split("\0")


def shown(st: os.stat_result) -> Fingerprint | None:
    """``mesh.core.reconcile.shown`` of the ``Seen`` of ``st``, without making the
    ``Seen``: once per path of a walk."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return (mode & PERMISSIONS, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if stat.S_ISDIR(mode):
        return (mode & PERMISSIONS,)
    return None


def reconcile(root: Path, ignore: Callable[[str], bool], lookup: Lookup,
              held: Callable[[], Iterable[str]], chunk: int = CHUNK) -> Reconciled:
    """Walk ``root``: each path that does not show what ``lookup`` (the index, in
    chunks) expects of it unchanged (``mesh.core.reconcile``) is to scan; each path
    ``held`` names that the walk did not find is gone
    (nothing is, when the index held nothing as the walk began: no set of the paths
    found is kept then)."""
    out = Reconciled()
    found: set[str] | None = set() if next(iter(held()), None) is not None else None
    batch: list[tuple[str, os.stat_result | None]] = []
    run: list[str] = []

    def compare() -> None:
        expected = lookup([p for p, _ in batch])
        for path, st in batch:
            if st is not None:
                want = expected.get(path)
                if want is not None and want == shown(st):
                    out.unchanged += 1
                    continue
            run.append(path)
            if st is not None and stat.S_ISREG(st.st_mode) and st.st_size >= PREHASH_BYTES:
                out.large.append(path)
        batch.clear()
        if len(run) >= chunk:
            close_run()

    def close_run() -> None:
        out.changed += len(run)
        out.runs.append("\0".join(run))
        run.clear()

    for path, st in stat_tree(root, "", ignore):  # st None: the scan says why
        out.on_disk += 1
        if found is not None:
            found.add(path)
        batch.append((path, st))
        if len(batch) >= chunk:
            compare()
    if batch:
        compare()
    if run:
        close_run()
    out.gone = [] if found is None else [p for p in held() if p not in found]
    return out
