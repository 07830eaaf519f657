"""The keep area: content nothing may destroy, inside the data folder.

``<data>/.mesh-keep`` sits on the same filesystem as the data (DESIGN.md: a
push keeps what it replaces), so keeping is a rename, never a copy. It holds

* ``objects/<sha256 hex>``: content by hash (a file's bytes, a symlink's
  target), for restores and conflict copies;
* ``in/<push id>/``: the staging dir of one incoming push: rsync lands the
  push there (the daemon may write nowhere else: ``mesh.adapters.rsyncd``).
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
import secrets
import shutil
from pathlib import Path

from mesh.core.manifest import ContentKey, Kind

KEEP_NAME = ".mesh-keep"


def _subdirs(parent: Path) -> list[Path]:
    """The directories directly in ``parent`` (no symlinks)."""
    return [p for p in parent.iterdir() if p.is_dir() and not p.is_symlink()]


class KeepArea:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / KEEP_NAME
        self.objects = self.root / "objects"
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

    def staging_dir(self, push_id: str) -> Path:
        """Where rsync lands push ``push_id`` (``mesh.core.landing``)."""
        return self.incoming / push_id

    def object_path(self, content: ContentKey) -> Path:
        return self.objects / content[1].hex()

    def has(self, content: ContentKey) -> bool:
        if content[0] is Kind.DIR:
            return True  # a directory has no content to keep
        return self.object_path(content).exists()

    def file_away(self, path: Path, content: ContentKey) -> None:
        """Move ``path`` (whose content is ``content``) into the objects."""
        if content[0] is Kind.DIR:
            with contextlib.suppress(OSError):
                path.rmdir()
            return
        target = self.object_path(content)
        if content[0] is Kind.SYMLINK:
            if not target.exists():
                self._write_atomic(target, os.fsencode(path.readlink()))
            path.unlink()
            return
        if target.exists():
            path.unlink()  # same content is kept already
        else:
            path.replace(target)

    def read_link(self, content: ContentKey) -> str:
        return os.fsdecode(self.object_path(content).read_bytes())

    def copy_out(self, content: ContentKey, dest: Path) -> None:
        """Write the kept content as a new file at ``dest`` (a temp name)."""
        shutil.copyfile(self.object_path(content), dest)

    def push_dir(self, push_id: str) -> Path:
        """The backup dir of a push landed by an older release (see the module doc)."""
        return self.root / push_id

    def temp_name(self, near: Path) -> Path:
        """A temp name next to ``near`` (same directory, so rename is atomic),
        shaped like rsync's so the watcher ignores it."""
        return near.with_name(f".{near.name}.{secrets.token_hex(3)}")

    @staticmethod
    def _write_atomic(target: Path, data: bytes) -> None:
        tmp = target.with_name(target.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(target)
