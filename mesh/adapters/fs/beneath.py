"""File operations beneath a root that never follow a symlink (issue 13).

Every path the data plane writes, renames, links or removes is a path a peer
named, and a peer may be compromised: a push that turns ``lure`` into a
symlink to ``/etc`` must not make a later restore of ``lure/x`` write
``/etc/x``. So every operation here reaches a path's parent folder one
component at a time from a descriptor of the root, with ``O_NOFOLLOW``
(``openat``, as the scanner walks), and acts on the last component through
that descriptor (the ``*at`` calls act on a symlink itself, never on what it
points to). A symlink met on the way is refused with ``Escape``; so is a path
that is not a plain relative path.

Modes from a peer carry permission bits only: ``PERMISSIONS`` masks out
setuid, setgid and sticky bits.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mesh.adapters.fs.listing import PERMISSIONS
from mesh.core.paths import TEMP_CHARS, temp_name
from mesh.errors import MeshError

_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RENAME_NOREPLACE = 1
FRESH_S = 2.0  # a folder made here is new to lsyncd for this long (``Beneath._note``)
MADE_KEPT = 4096  # folders remembered before the older ones are dropped
_RENAME_EXCHANGE = 2
_COPY_CHUNK = 1 << 20


class Escape(MeshError):
    """A path would leave the root or pass through a symlink: refused."""


def _parts(rel: str) -> list[str]:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise Escape(f"not a plain relative path: {rel!r}")
    return parts


def _libc_renameat2() -> ctypes._NamedFuncPointer | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                   ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc_renameat2()


class Beneath:
    """Operations on relative paths beneath ``root`` (see the module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Told each path this object is about to change, before it does, once for each
        # change an inotify watcher of the folder will see on that name (a new folder
        # given a mode: two; a swap: two on each name, moved out and moved in): the agent
        # tells lsyncd to pass over its own writes (mesh.adapters.lsyncd.agentwrites).
        self.changing: Callable[[str], None] = _nobody
        # Folders this object made: when (``time.monotonic``), and the names below each
        # told of once more. lsyncd 2.2.3 watches a new folder, then lists it (and what
        # is in it) and reports what it finds as made: a name made below it meanwhile is
        # reported by the kernel and by the listing of each new folder above it. Under
        # load that was seen (1 run in 8); so the first change of a name is noted once
        # more for each new folder above it (a note no event takes lapses after 10 s:
        # mesh.adapters.lsyncd.agentwrites).
        self._made: dict[str, tuple[float, set[str]]] = {}

    @contextlib.contextmanager
    def parent(self, rel: str, *, create: bool = False) -> Iterator[tuple[int, str]]:
        """``(fd of rel's folder, rel's last name)``; with ``create``, missing folders
        on the way are made (mode 0755). ``Escape`` on a symlink; ``FileNotFoundError``
        or ``NotADirectoryError`` when a folder on the way is missing or a file."""
        *folders, name = _parts(rel)
        fd = os.open(self.root, _DIR)
        try:
            for depth, part in enumerate(folders, 1):
                try:
                    below = os.open(part, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    self._note("/".join(folders[:depth]), made=True)
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                    below = self._enter(fd, part, rel)
                except OSError as err:
                    raise self._refused(fd, part, rel, err) from None
                os.close(fd)
                fd = below
            yield fd, name
        finally:
            os.close(fd)

    def _note(self, rel: str, *, made: bool = False) -> None:
        """Tell ``changing`` of one change lsyncd will see at ``rel``, and for the first
        change of a name, once more for each folder above it made here in the last
        ``FRESH_S`` (see ``_made``). ``made``: ``rel`` is a folder about to be made."""
        now = time.monotonic()
        folder = rel
        while folder:
            folder = folder.rpartition("/")[0]
            entry = self._made.get(folder)  # (no set made for each folder not in it)
            if entry is not None and now - entry[0] < FRESH_S and rel not in entry[1]:
                entry[1].add(rel)
                self.changing(rel)
        self.changing(rel)
        if made:
            if len(self._made) >= MADE_KEPT:  # the old ones are of no more use
                self._made = {f: v for f, v in self._made.items() if now - v[0] < FRESH_S}
            self._made[rel] = (now, set())

    def _enter(self, fd: int, part: str, rel: str) -> int:
        try:
            return os.open(part, _DIR, dir_fd=fd)
        except OSError as err:
            raise self._refused(fd, part, rel, err) from None

    @staticmethod
    def _refused(fd: int, part: str, rel: str, err: OSError) -> OSError | Escape:
        """What to raise for a folder on the way that would not open: ``Escape`` for a
        symlink, else the error itself."""
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            with contextlib.suppress(OSError):
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    return Escape(f"{rel!r}: {part!r} on the way is a symlink")
        return err

    # --- looking ----------------------------------------------------------------------

    def lstat(self, rel: str) -> os.stat_result:
        with self.parent(rel) as (fd, name):
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def lexists(self, rel: str) -> bool:
        """Whether something is at ``rel`` in the tree (a path below a symlink is not)."""
        try:
            self.lstat(rel)
        except (FileNotFoundError, NotADirectoryError, Escape):
            return False
        return True

    def readlink(self, rel: str) -> str:
        with self.parent(rel) as (fd, name):
            return os.readlink(name, dir_fd=fd)

    def read(self, rel: str) -> bytes:
        fd = self.open_file(rel)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def open_file(self, rel: str) -> int:
        """A read descriptor of the regular file at ``rel`` (not through a symlink)."""
        with self.parent(rel) as (fd, name):
            return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)

    # --- making -----------------------------------------------------------------------

    def mkdir(self, rel: str, mode: int, *, exist_ok: bool) -> None:
        """The folder ``rel`` with ``mode`` (permission bits only), its parent made."""
        mode = (mode or 0o755) & PERMISSIONS
        with self.parent(rel, create=True) as (fd, name):
            try:
                os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                self._note(rel, made=True)
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                except FileExistsError:  # made meanwhile, by someone else
                    if not exist_ok:
                        raise
            else:
                if not exist_ok:
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), rel)
            dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
            try:
                if stat.S_IMODE(os.fstat(dfd).st_mode) != mode:
                    self._note(rel)  # a second change: its mode
                    os.fchmod(dfd, mode)
            finally:
                os.close(dfd)

    def temp_name(self, rel: str) -> str:
        """A free-looking temp name next to ``rel`` (same folder: renames are atomic),
        shaped like rsync's so the watcher and the scanner ignore it."""
        head, _, name = rel.rpartition("/")
        temp = temp_name(name, secrets.token_hex(TEMP_CHARS // 2))
        return f"{head}/{temp}" if head else temp

    def write_file(self, rel: str, source_fd: int | None, mode: int,
                   mtime_ns: int = 0) -> os.stat_result:
        """Create the new file ``rel`` (never over anything) holding what ``source_fd``
        reads (empty for None), with ``mode`` (permission bits only) and ``mtime_ns``
        (when > 0); its ``lstat``."""
        with self._new_file(rel) as out:
            if source_fd is not None:
                while chunk := os.read(source_fd, _COPY_CHUNK):
                    os.write(out, chunk)
            return self._finish(out, mode, mtime_ns)

    def write_bytes(self, rel: str, data: bytes, mode: int) -> os.stat_result:
        """Create the new file ``rel`` (never over anything) holding ``data``."""
        with self._new_file(rel) as out:
            view = memoryview(data)
            while view:
                view = view[os.write(out, view):]
            return self._finish(out, mode, 0)

    @contextlib.contextmanager
    def _new_file(self, rel: str) -> Iterator[int]:
        """A write descriptor of ``rel``, created here (folders on the way made)."""
        with self.parent(rel, create=True) as (fd, name):
            self._note(rel)
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600, dir_fd=fd)
            try:
                yield out
            finally:
                os.close(out)

    def set_file(self, rel: str, mode: int, mtime_ns: int = 0) -> os.stat_result:
        """Give the regular file ``rel`` ``mode`` (permission bits only) and ``mtime_ns``
        (when > 0); its ``lstat``."""
        with self.parent(rel) as (fd, name):
            out = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            for _ in range(2 if mtime_ns > 0 else 1):  # its mode, its time
                self._note(rel)
            try:
                return self._finish(out, mode, mtime_ns)
            finally:
                os.close(out)

    @staticmethod
    def _finish(fd: int, mode: int, mtime_ns: int) -> os.stat_result:
        os.fchmod(fd, mode & PERMISSIONS)
        if mtime_ns > 0:
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        return os.fstat(fd)

    def symlink(self, target: str, rel: str) -> os.stat_result:
        """A new symlink ``rel`` pointing at ``target`` (never followed by this module)."""
        with self.parent(rel, create=True) as (fd, name):
            self._note(rel)
            os.symlink(target, name, dir_fd=fd)
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    # --- moving and removing ----------------------------------------------------------

    def rename(self, src: str, dst: str, *, create: bool = False) -> None:
        """Rename ``src`` to ``dst``, replacing what is there (not a folder)."""
        with self.parent(src) as (sfd, sname), \
                self.parent(dst, create=create) as (dfd, dname):
            self._note(src)
            self._note(dst)
            os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)

    def link(self, src: str, dst: str) -> None:
        """Hard-link ``src`` as the new name ``dst`` (fails if ``dst`` exists)."""
        with self.parent(src) as (sfd, sname), self.parent(dst) as (dfd, dname):
            self._note(dst)
            os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)

    def exchange(self, a: str, b: str) -> bool:
        """Swap ``a`` and ``b`` in one step (``renameat2(RENAME_EXCHANGE)``); False where
        the system or the filesystem cannot (the caller renames instead)."""
        if _renameat2 is None:
            return False
        with self.parent(a) as (afd, aname), self.parent(b) as (bfd, bname):
            for rel in (a, a, b, b):  # each name is moved out and moved in: two changes
                self._note(rel)
            if _renameat2(afd, os.fsencode(aname), bfd, os.fsencode(bname),
                          _RENAME_EXCHANGE) == 0:
                return True
            err = ctypes.get_errno()
            if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                return False
            raise OSError(err, os.strerror(err), f"{a} <-> {b}")

    def move_new(self, src: str, dst: str, folders: OpenFolders) -> bool:
        """Move the file ``src`` to the new name ``dst`` in one step, never over anything
        (``renameat2(RENAME_NOREPLACE)``, else a hard link and an unlink): False when
        something is at ``dst``. Both folders through ``folders``."""
        sfd, sname = folders.parent(src)
        dfd, dname = folders.parent(dst)
        self._note(dst)  # one change lsyncd sees: the name made (``src`` is excluded)
        if _renameat2 is not None:
            if _renameat2(sfd, os.fsencode(sname), dfd, os.fsencode(dname),
                          _RENAME_NOREPLACE) == 0:
                return True
            err = ctypes.get_errno()
            if err == errno.EEXIST:
                return False
            if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise OSError(err, os.strerror(err), f"{src} -> {dst}")
        try:
            os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
        except FileExistsError:
            return False
        os.unlink(sname, dir_fd=sfd)
        return True

    def unlink(self, rel: str) -> None:
        with self.parent(rel) as (fd, name):
            self._note(rel)
            os.unlink(name, dir_fd=fd)

    def rmdir(self, rel: str) -> None:
        with self.parent(rel) as (fd, name):
            self._note(rel)
            os.rmdir(name, dir_fd=fd)


class OpenFolders:
    """Folders beneath a root, each reached once as ``Beneath.parent`` reaches one (a
    component at a time, no symlink followed) and kept open for many operations on
    the names in them: a push's end moves thousands of files into a few folders
    (issue 16: walking down from the root for each was a fifth of it). Hold it for one
    batch of operations only, and close it."""

    def __init__(self, fs: Beneath) -> None:
        self.fs = fs
        self._fds: dict[str, int] = {}

    def parent(self, rel: str) -> tuple[int, str]:
        """``(fd of rel's folder, rel's last name)``, as ``Beneath.parent`` without
        ``create``."""
        folder, _, name = rel.rpartition("/")
        _parts(rel)
        return self._folder(folder, rel), name

    def _folder(self, folder: str, rel: str) -> int:
        fd = self._fds.get(folder)
        if fd is not None:
            return fd
        if not folder:
            fd = os.open(self.fs.root, _DIR)
        else:
            up, _, part = folder.rpartition("/")
            above = self._folder(up, rel)
            try:
                fd = os.open(part, _DIR, dir_fd=above)
            except OSError as err:
                raise Beneath._refused(above, part, rel, err) from None
        self._fds[folder] = fd
        return fd

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> OpenFolders:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _nobody(rel: str) -> None:
    """No one is told of changes."""
