"""Content put in place beneath the data folder, and what it replaces filed into the keep
area (``mesh.engine.keep``) and recorded as a kept version (issue 14): the data plane's
writes (``mesh.engine.dataplane``: restores, conflict copies, an operator's restore).

Every write goes to a temp name the watcher ignores and is renamed (or swapped) into
place, so a kill never leaves a path half written or empty, and a path edited since its
scan is never overwritten (``Superseded``)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat

from mesh.adapters.fs.scanner import ScanError, Scanner
from mesh.clock import now_ms
from mesh.core.effects import Observed
from mesh.core.manifest import ContentKey, Kind
from mesh.core.retention import Reason
from mesh.engine.keep import KeepArea
from mesh.errors import MeshError
from mesh.store.index import Index
from mesh.store.kept import KeptLog


class Superseded(MeshError):
    """The path a restore was about to replace changed since the restore scanned it: the
    change is a write to record first, not content to file away."""


class Materializer:
    """Writes beneath the root through the keep area's ``Beneath`` (no symlink followed)."""

    def __init__(self, *, index: Index, keep: KeepArea, kept: KeptLog, scanner: Scanner
                 ) -> None:
        self.index = index
        self.keep = keep
        self.kept = kept
        self.scanner = scanner
        self.fs = keep.fs

    def file_away(self, rel: str, path: str, content: ContentKey, why: Reason) -> None:
        """File ``rel`` (``path``'s content as last scanned, maybe under a temp name) into
        the keep area and record it as a kept version of ``path``: the head of the
        path's disk version holding that content (the scan that came first recorded
        it). A folder is only removed: it has no content to keep."""
        self.keep.file_away(rel, content)
        disk = self.index.state(path).disk
        head = None if disk is None else next(
            (h for h in disk.heads if h.content == content), None)
        if disk is None or head is None or content[0] is Kind.DIR:
            return  # not recorded: an orphan, collected by its age (mesh.core.retention)
        self.kept.add(head, disk.vector, why, now_ms())

    def materialize(self, source_rel: str, kind: Kind, content: ContentKey, mode: int,
                     dest_rel: str, *, exclusive: bool, mtime_ns: int = 0,
                     replacing: Observed | None = None, at_source: bool | None = None,
                     take: bool = False, why: Reason = Reason.REPLACED) -> None:
        """Write content (from ``source_rel`` if it holds it, else the keep area) at
        ``dest_rel``, atomically, beneath the root (``mesh.adapters.fs.beneath``); never over
        an existing file if ``exclusive``. ``replacing``: what ``dest_rel`` holds, filed
        into the keep area as the new content takes its place (in one step where the
        filesystem can swap two names, so a kill never leaves the path empty).
        ``at_source``: whether ``source_rel`` holds the content (looked at when None).

        With ``take`` (no other restore of this apply needs the content), the kept file
        is moved out of the keep area, not copied (a pushed file is not written twice);
        it goes back if it cannot take its place, and is filed again whenever it is
        replaced. A file put in place is recorded in the stat cache, so the scan its own
        rename sets off does not hash it again."""
        if kind is Kind.DIR:
            if replacing is not None:
                self.file_away(dest_rel, dest_rel, replacing.content, why)
            self.fs.mkdir(dest_rel, mode, exist_ok=not exclusive)
            return
        tmp = self.fs.temp_name(dest_rel)
        taken = moved = False  # moved: renamed into place, nothing left at ``tmp``
        if at_source is None:
            at_source = self._observed_content(source_rel) == content
        try:
            if kind is Kind.SYMLINK:
                target = (self.fs.readlink(source_rel) if at_source
                          else self.keep.read_link(content))
                placed = self.fs.symlink(target, tmp)
            elif at_source:
                fd = self.fs.open_file(source_rel)
                try:
                    placed = self.fs.write_file(tmp, fd, mode, mtime_ns)
                finally:
                    os.close(fd)
            elif take and not exclusive:
                self.keep.take_out(content, tmp)
                taken = True
                placed = self.fs.set_file(tmp, mode, mtime_ns)
            else:
                placed = self.keep.copy_out(content, tmp, mode, mtime_ns)
            if exclusive:
                self.fs.link(tmp, dest_rel)  # fails if something is there
            elif replacing is not None and replacing.kind is not Kind.DIR \
                    and self.fs.exchange(tmp, dest_rel):
                if not self._unchanged(tmp, replacing):
                    self.fs.exchange(tmp, dest_rel)  # an edit came since the scan: back
                    raise Superseded(dest_rel)
                taken = False
                self.file_away(tmp, dest_rel, replacing.content, why)  # swapped out
            else:
                if replacing is not None:
                    if not self._unchanged(dest_rel, replacing):
                        raise Superseded(dest_rel)
                    self.file_away(dest_rel, dest_rel, replacing.content, why)
                self.fs.rename(tmp, dest_rel)
                taken, moved = False, True
            if kind is Kind.FILE:
                self.scanner.placed(dest_rel, placed, content[1])
        finally:
            if taken and self.fs.lexists(tmp):
                with contextlib.suppress(OSError, MeshError):
                    self.keep.put_back(content, tmp)  # it did not take its place
            if not moved:  # (a walk down to its folder per file, to find nothing there)
                with contextlib.suppress(FileNotFoundError, MeshError):
                    self.fs.unlink(tmp)

    def _unchanged(self, rel: str, seen: Observed) -> bool:
        """Whether ``rel`` still looks as the scan ``seen`` it: kind, and a file's size
        and mtime (a write sets the mtime to now), a link's target."""
        st = self.fs.lstat(rel)
        if seen.kind is Kind.FILE:
            return stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (
                seen.size, seen.mtime_ns)
        if seen.kind is Kind.SYMLINK:
            return stat.S_ISLNK(st.st_mode) and hashlib.sha256(
                os.fsencode(self.fs.readlink(rel))).digest() == seen.hash
        return stat.S_ISDIR(st.st_mode)

    def _observed_content(self, rel: str) -> tuple[Kind, bytes, int] | None:
        try:
            observed = self.scanner.observe(rel)
        except ScanError:
            return None
        return None if observed is None else observed.content
