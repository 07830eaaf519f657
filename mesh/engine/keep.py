"""The keep area: content nothing may destroy, inside the data folder.

``<data>/.mesh-keep`` sits on the same filesystem as the data (DESIGN.md: a
push keeps what it replaces), so keeping is a rename, never a copy. It holds

* ``objects/<sha256 hex>``: content by hash (a file's bytes, a symlink's
  target), for restores and conflict copies;
* ``in/<push id>/``: the staging dir of one incoming push: rsync lands the
  push there (the daemon may write nowhere else: ``mesh.adapters.rsync.rsyncd``).
  At the push's end the agent keeps, into ``objects``, each staged file that
  is a version the path converges to, and removes the dir; its restores then
  put the content in place (``mesh.core.landing``). The tunnel creates it
  exclusively;
* ``<push id>/``: rsync's ``--backup-dir`` of one push, from releases that
  landed pushes in the live tree: found after an upgrade only, and filed.

A staging dir found when the agent starts belongs to a push that was landing
when the agent stopped (the tunnel makes one only while the agent runs): it is
in ``unfinished`` until the data plane has kept what it staged.

The watcher and the scanner ignore the whole area.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from mesh.adapters.fs.beneath import Beneath
from mesh.core.manifest import ContentKey, Kind
from mesh.core.paths import KEEP_NAME
from mesh.errors import MeshError

_T = TypeVar("_T")


def _subdirs(parent: Path) -> list[Path]:
    """The directories directly in ``parent`` (no symlinks)."""
    return [p for p in parent.iterdir() if p.is_dir() and not p.is_symlink()]


class KeepArea:
    """The keep area of the data folder ``data_dir``. Its operations name paths relative
    to the data folder and never follow a symlink (``mesh.adapters.fs.beneath``): staged
    and live paths are named by peers."""

    def __init__(self, data_dir: Path) -> None:
        self.fs = Beneath(data_dir)
        self.root = data_dir / KEEP_NAME
        self.objects = self.root / "objects"
        self._objects = str(self.objects)
        self.tmp = self.root / "tmp"
        self.incoming = self.root / "in"
        for d in (self.objects, self.tmp, self.incoming):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The staging dirs, and the backup dirs of an older release (directly under the
        # keep area: every dir there but ours).
        ours = {self.objects.name, self.tmp.name, self.incoming.name}
        self.unfinished = sorted(
            {p.name for p in _subdirs(self.incoming)}
            | {p.name for p in _subdirs(self.root) if p.name not in ours})
        # Files of a push's staging dir kept where rsync staged them while its end puts
        # them in place (``hold``), by hash: a file taken to its path moves once, not
        # into the objects and out again (issue 16: three renames per pushed file were a
        # third of a push's end). What no restore took is filed (``file_held``).
        self._held: dict[bytes, str] = {}

    def staging_dir(self, push_id: str) -> Path:
        """Where rsync lands push ``push_id`` (``mesh.core.landing``)."""
        return self.incoming / push_id

    def staging_rel(self, push_id: str, rel: str) -> str:
        """``rel`` in the staging dir of ``push_id``, relative to the data folder."""
        return f"{KEEP_NAME}/{self.incoming.name}/{push_id}/{rel}"

    def push_rel(self, push_id: str, rel: str) -> str:
        """``rel`` in the backup dir of an older release's push, relative to the data
        folder."""
        return f"{KEEP_NAME}/{push_id}/{rel}"

    def object_path(self, content: ContentKey) -> Path:
        return self.objects / content[1].hex()

    def object_rel(self, content: ContentKey) -> str:
        return f"{KEEP_NAME}/{self.objects.name}/{content[1].hex()}"

    def has(self, content: ContentKey) -> bool:
        if content[0] is Kind.DIR:
            return True  # a directory has no content to keep
        # A string, not a Path joined (2.4 against 1 µs): a catch-up asks for each path.
        return content[1] in self._held or os.path.exists(  # noqa: PTH110
            f"{self._objects}/{content[1].hex()}")

    def hold(self, rel: str, content: ContentKey) -> None:
        """Keep the staged file ``rel`` (``content``) where it is until ``file_held``:
        ``take_out`` moves it straight to its path. Links and folders are filed now."""
        if content[0] is not Kind.FILE:
            self.file_away(rel, content)
        elif self.has(content):
            self.fs.unlink(rel)  # same content is kept already
        else:
            self._held[content[1]] = rel

    def file_held(self) -> list[tuple[str, OSError | MeshError]]:
        """File into the objects what ``hold`` kept and no restore took; what could not
        be, and why."""
        failed: list[tuple[str, OSError | MeshError]] = []
        while self._held:
            digest, rel = self._held.popitem()
            try:
                self.fs.rename(rel, f"{KEEP_NAME}/{self.objects.name}/{digest.hex()}")
            except (OSError, MeshError) as err:
                failed.append((rel, err))
        return failed

    def _source(self, content: ContentKey) -> str:
        """Where the kept content is now, relative to the data folder."""
        return self._held.get(content[1]) or self.object_rel(content)

    def file_away(self, rel: str, content: ContentKey) -> None:
        """Move ``rel`` (whose content is ``content``) into the objects."""
        if content[0] is Kind.DIR:
            with contextlib.suppress(OSError):
                self.fs.rmdir(rel)
            return
        target = self.object_rel(content)
        if content[0] is Kind.SYMLINK:
            if not self.has(content):
                self._write_atomic(target, os.fsencode(self.fs.readlink(rel)))
            self.fs.unlink(rel)
            return
        if self.has(content):
            self.fs.unlink(rel)  # same content is kept already
        else:
            self.fs.rename(rel, target)

    def read_link(self, content: ContentKey) -> str:
        return os.fsdecode(self.fs.read(self.object_rel(content)))

    def copy_out(self, content: ContentKey, dest: str, mode: int,
                 mtime_ns: int = 0) -> os.stat_result:
        """Write the kept content as the new file ``dest`` (a temp name); its ``lstat``."""
        fd = self.fs.open_file(self._source(content))
        try:
            return self.fs.write_file(dest, fd, mode, mtime_ns)
        finally:
            os.close(fd)

    def take_out(self, content: ContentKey, dest: str) -> None:
        """Move the kept content to ``dest`` (a temp name; ``put_back`` undoes it)."""
        self.fs.rename(self._source(content), dest, create=True)
        self._held.pop(content[1], None)

    def put_back(self, content: ContentKey, source: str) -> None:
        self.fs.rename(source, self.object_rel(content))

    def objects_held(self) -> dict[bytes, tuple[int, int]]:
        """Every object: hash -> (bytes, ctime in ms: when it was filed, a rename being
        a change of its inode). What vanishes meanwhile is left out."""
        out: dict[bytes, tuple[int, int]] = {}
        with os.scandir(self.objects) as entries:
            for entry in entries:
                if len(entry.name) != 64:
                    continue  # not an object (a temp name)
                try:
                    digest = bytes.fromhex(entry.name)
                    st = entry.stat(follow_symlinks=False)
                except (ValueError, OSError):
                    continue
                out[digest] = (st.st_size, st.st_ctime_ns // 1_000_000)
        return out

    def remove(self, digest: bytes) -> None:
        """Remove the object of hash ``digest`` (the collector: nothing keeps it)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.unlink(f"{KEEP_NAME}/{self.objects.name}/{digest.hex()}")

    def push_dir(self, push_id: str) -> Path:
        """The backup dir of a push landed by an older release (see the module doc)."""
        return self.root / push_id

    def _write_atomic(self, target: str, data: bytes) -> None:
        tmp = self.fs.temp_name(target)
        self.fs.write_bytes(tmp, data, 0o600)
        self.fs.rename(tmp, target)


def files_under(root: Path) -> list[str]:
    """Every file and symlink under ``root`` (a staging or backup dir), relative, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath).relative_to(root)
        for name in [*filenames, *(d for d in dirnames if (Path(dirpath) / d).is_symlink())]:
            out.append(str(base / name) if str(base) != "." else name)
    return sorted(out)


def remove_empty_dirs(root: Path) -> None:
    """Remove ``root`` and the directories under it, deepest first. What could not be
    filed keeps its directory, and the next start files it (``KeepArea.unfinished``)."""
    for dirpath, _, _ in os.walk(root, topdown=False):
        with contextlib.suppress(OSError):  # not empty
            Path(dirpath).rmdir()


def drop_tree(folder: Path) -> None:
    """Remove ``folder`` and all under it, if it is there. Run it in a thread: a
    staging folder of 2,000 paths a peer already had held the loop for seconds."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(folder)


def chunked(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    """``items`` in runs of ``size`` (an apply's transactions, a push's end's)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]
