"""Stat and hash what is on disk: the scanner turns a path into an ``Observed``.

DESIGN.md, data plane: "hash only settled content". A regular file is hashed
and then stat'ed again; if it changed while it was read, it is read again, and
after ``RETRIES`` attempts the scanner gives up with ``Unsettled`` so that the
caller scans it later (the watcher reports it again when its writer closes it).

``observe`` blocks (it reads whole files): run it in a worker thread.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mesh.adapters.fs.listing import PERMISSIONS, PREHASH_BYTES, default_ignore, tree
from mesh.core.effects import Observed
from mesh.core.manifest import Kind
from mesh.core.paths import normalize
from mesh.errors import InvalidPath, MeshError
from mesh.store.statcache import CachedStat, StatCache

log = logging.getLogger(__name__)

CHUNK = 1 << 20
RETRIES = 5
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Above or at the path: missing, a file, or a symlink we do not follow.
_ABSENT = frozenset((errno.ENOENT, errno.ENOTDIR, errno.ELOOP))


class ScanError(MeshError):
    """A path could not be read (permissions, I/O error)."""


class Unsettled(ScanError):
    """A file kept changing while it was hashed; scan it again later."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"{path!r} changed while it was hashed {RETRIES} times")


_buffers = threading.local()  # each thread's read buffer for ``hash_fd``


def hash_fd(fd: int) -> tuple[bytes, int]:
    """SHA-256 of an open file from where it stands, and the bytes read.

    hashlib releases the GIL for large updates, so scans in worker threads
    overlap with the event loop.
    """
    h = hashlib.sha256()
    buf = getattr(_buffers, "chunk", None)
    if buf is None:  # one per thread, kept: a new zeroed MiB per file cost more than
        buf = _buffers.chunk = bytearray(CHUNK)  # hashing a small file (issue 16)
    view = memoryview(buf)
    total = 0
    while n := os.readv(fd, [buf]):
        h.update(view[:n])
        total += n
    return h.digest(), total


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_size, a.st_mtime_ns, a.st_ctime_ns, stat.S_IFMT(a.st_mode)) == (
        b.st_ino, b.st_size, b.st_mtime_ns, b.st_ctime_ns, stat.S_IFMT(b.st_mode))


class Scanner:
    """Observes paths under ``root``; ``cache`` spares re-hashing unchanged files.

    ``racy_window``: a file whose ctime is that close to the start of its scan
    is hashed but not cached. Timestamps are coarse (a clock tick, or worse on
    some filesystems), so a write in the same tick as the one we saw could
    leave size, mtime and ctime unchanged; a cache entry must not outlive it
    (git's "racily clean" entries).
    """

    def __init__(
        self,
        root: Path | str,
        *,
        ignore: Callable[[str], bool] = default_ignore,
        cache: StatCache | None = None,
        racy_window: float = 1.0,
    ) -> None:
        self.root = Path(root).absolute()
        self.ignore = ignore
        self.cache = cache
        self.racy_ns = int(racy_window * 1e9)
        # Hashes that ``prehash`` made in a worker thread, each used at most once and only
        # for the very file (size, mtime, ctime, inode) it hashed.
        self._fresh: dict[str, tuple[tuple[int, int, int, int], bytes]] = {}

    def to_prehash(self, rels: Iterable[str]) -> list[str]:
        """Of ``rels``, the regular files of at least ``PREHASH_BYTES`` that the cache does
        not know as they are now: worth hashing off the event loop first."""
        out = []
        root = str(self.root)  # (a Path joined per path was most of this, issue 16)
        for rel in rels:
            try:
                st = os.lstat(f"{root}/{rel}")
            except (OSError, ValueError):
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_size < PREHASH_BYTES:
                continue
            known = self.cache.get(rel) if self.cache is not None else None
            if known is None or not known.same_file(st.st_size, st.st_mtime_ns,
                                                    st.st_ctime_ns, st.st_ino):
                out.append(rel)
        return out

    def prehash(self, rels: Iterable[str]) -> None:
        """Hash ``rels`` for the next ``observe`` of each. Meant for a worker thread
        (hashlib releases the GIL; no SQLite here); a file that changes meanwhile is
        simply hashed again by ``observe``."""
        for rel in rels:
            try:
                rel = normalize(rel)
                parent = self._open_parent(rel)
                try:
                    at = _At(parent, rel.rpartition("/")[2])
                    st = at.lstat()
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    digest = self._hash_settled(at, st)
                finally:
                    os.close(parent)
            except (OSError, InvalidPath, _Changed):
                continue
            self._fresh[rel] = ((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino), digest)

    def placed(self, rel: str, prepared: os.stat_result, digest: bytes) -> None:
        """The agent just renamed a file it prepared (``prepared``: its ``lstat`` then)
        with content ``digest`` to ``rel``: cache it, so the scan that the rename sets
        off reads a ``stat`` and hashes nothing.

        Only when it is the very file (inode, size, mtime) and its mtime is older than
        the racy window: any write after the rename sets the mtime to now, so the entry
        cannot outlive it. The ctime is read now (a rename may change it)."""
        if self.cache is None:
            return
        try:
            rel = normalize(rel)
            parent = self._open_parent(rel)
            try:
                st = _At(parent, rel.rpartition("/")[2]).lstat()
            finally:
                os.close(parent)
        except (OSError, InvalidPath):
            return
        if (st.st_ino, st.st_size, st.st_mtime_ns) == (
                prepared.st_ino, prepared.st_size, prepared.st_mtime_ns):
            self.remember([(rel, st, digest)])

    def remember(self, files: Iterable[tuple[str, os.stat_result, bytes]]) -> None:
        """Cache each ``(rel, its lstat now, its content's hash)`` the agent itself put
        in place (``placed``, a push's adoption), so the scans their renames set off
        read a ``stat`` and hash nothing: only regular files whose mtime is older than
        the racy window, which any later write moves to now."""
        if self.cache is None:
            return
        now = time.time_ns()
        self.cache.put_many(
            (rel, CachedStat(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest))
            for rel, st, digest in files
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime_ns > self.racy_ns)

    def walk(self) -> Iterator[str]:
        """Every path under the root, directories included, sorted per directory."""
        for rel, _ in tree(self.root, "", self.ignore):
            yield rel

    def observe(self, rel: str) -> Observed | None:
        """What is at ``rel`` now, or None when there is nothing to sync there.

        No symlink is followed, at ``rel`` or above it: a path below a
        symlinked directory is not in the tree, so it is absent.
        """
        rel = normalize(rel)
        if self.ignore(rel):
            return None
        for _ in range(RETRIES):
            try:
                found = self._look(rel, time.time_ns())
            except _Changed:
                continue
            except OSError as err:
                if err.errno not in _ABSENT:
                    raise ScanError(f"scan {rel!r}: {err}") from err
                found = None
            if (found is None or found.kind is not Kind.FILE) and self.cache is not None:
                self.cache.delete(rel)
            return found
        raise Unsettled(rel)

    def _look(self, rel: str, started_ns: int) -> Observed | None:
        parent = self._open_parent(rel)
        try:
            at = _At(parent, rel.rpartition("/")[2])
            return self._observe(rel, at, at.lstat(), started_ns)
        finally:
            os.close(parent)

    def _open_parent(self, rel: str) -> int:
        """A descriptor of ``rel``'s directory, reached without following symlinks."""
        fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        for part in rel.split("/")[:-1]:
            try:
                below = os.open(part, _DIR_FLAGS, dir_fd=fd)
            finally:
                os.close(fd)
            fd = below
        return fd

    def _observe(
        self, rel: str, at: _At, st: os.stat_result, started_ns: int
    ) -> Observed | None:
        mode = stat.S_IMODE(st.st_mode) & PERMISSIONS  # setuid, setgid, sticky: not synced
        if stat.S_ISDIR(st.st_mode):
            return Observed(Kind.DIR, b"", 0, st.st_mtime_ns, mode)
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.fsencode(os.readlink(at.name, dir_fd=at.dir_fd))
            except OSError as err:
                if err.errno == errno.EINVAL:  # no longer a symlink
                    raise _Changed from None
                raise
            if not _same(st, at.lstat()):
                raise _Changed
            return Observed(Kind.SYMLINK, hashlib.sha256(target).digest(), len(target),
                            st.st_mtime_ns, 0)
        if stat.S_ISREG(st.st_mode):
            digest = self._content(rel, at, st, started_ns)
            return Observed(Kind.FILE, digest, st.st_size, st.st_mtime_ns, mode)
        log.info("not syncing %r: not a regular file, directory or symlink (mode %o)",
                 rel, stat.S_IFMT(st.st_mode))
        return None

    def _content(self, rel: str, at: _At, st: os.stat_result, started_ns: int) -> bytes:
        key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        if self.cache is not None:
            known = self.cache.get(rel)
            if known is not None and known.same_file(*key):
                return known.hash
        fresh = self._fresh.pop(rel, None)
        hit = fresh is not None and fresh[0] == key
        digest = fresh[1] if fresh is not None and hit else self._hash_settled(at, st)
        if self.cache is not None and started_ns - st.st_ctime_ns > self.racy_ns:
            self.cache.put(rel, CachedStat(*key, digest))
        return digest

    def _hash_settled(self, at: _At, st: os.stat_result) -> bytes:
        """The hash of the file ``st`` describes; ``_Changed`` if it changed meanwhile."""
        try:
            # O_NOFOLLOW: it may have become a symlink since; O_NONBLOCK: or a fifo.
            fd = os.open(at.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=at.dir_fd)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise _Changed from None
            raise
        try:
            if not _same(st, os.fstat(fd)):
                raise _Changed
            digest, length = hash_fd(fd)
        finally:
            os.close(fd)
        if length != st.st_size or not _same(st, at.lstat()):
            raise _Changed
        return digest


@dataclass(frozen=True, slots=True)
class _At:
    """A name in a directory open as a descriptor (the *at() system calls)."""

    dir_fd: int
    name: str

    def lstat(self) -> os.stat_result:
        return os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)


class _Changed(Exception):
    """The path changed under us: look again."""
