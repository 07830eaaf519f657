"""PlacedFiles (issue 16): a file the agent placed and recorded is taken as unchanged
only while it is the very file, as placed; any change a user can make shows."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mesh.adapters.fs.beneath import Beneath
from mesh.adapters.fs.scanner import Scanner
from mesh.engine.placed import LIMIT, PlacedFiles

OLD_NS = (int(time.time()) - 3600) * 1_000_000_000


def placed_files(root: Path, limit: int = LIMIT) -> PlacedFiles:
    return PlacedFiles(Beneath(root), racy_ns=Scanner(root).racy_ns, limit=limit)


def placed(root: Path, rel: str, data: bytes = b"placed\n") -> os.stat_result:
    at = root / rel
    at.parent.mkdir(parents=True, exist_ok=True)
    at.write_bytes(data)
    os.utime(at, ns=(OLD_NS, OLD_NS))  # the version's mtime, older than the racy window
    return at.lstat()


def test_the_very_file_as_placed_is_unchanged_and_looked_at_once(tmp_path: Path) -> None:
    files = placed_files(tmp_path)
    files.recorded([(f"d/f{i}", placed(tmp_path, f"d/f{i}")) for i in range(3)])
    assert files.unchanged(["d/f0", "d/f2", "elsewhere"]) == {"d/f0", "d/f2"}
    assert files.unchanged(["d/f0"]) == set()  # forgotten once looked at
    assert len(files) == 1


def test_every_change_a_user_can_make_shows(tmp_path: Path) -> None:
    files = placed_files(tmp_path)
    # (What changes the ctime alone, a touch back to the same mtime or a link, changes
    # no content; timestamps are coarse, so a test of it would fail now and then.)
    names = ["same-size", "chmod", "replaced", "removed", "truncated"]
    files.recorded([(n, placed(tmp_path, n)) for n in names])
    (tmp_path / "same-size").write_bytes(b"PLACED\n")  # same size, mtime now
    (tmp_path / "chmod").chmod(0o600)
    other = tmp_path / "other"
    other.write_bytes(b"placed\n")
    os.utime(other, ns=(OLD_NS, OLD_NS))  # the same content and mtime, another inode
    other.replace(tmp_path / "replaced")
    (tmp_path / "removed").unlink()
    os.truncate(tmp_path / "truncated", 0)
    os.utime(tmp_path / "truncated", ns=(OLD_NS, OLD_NS))  # and its mtime put back
    assert files.unchanged(names) == set()


def test_a_file_written_in_the_racy_window_is_not_remembered(tmp_path: Path) -> None:
    files = placed_files(tmp_path)
    (tmp_path / "fresh").write_bytes(b"just written\n")
    files.recorded([("fresh", (tmp_path / "fresh").lstat())])
    assert len(files) == 0 and files.unchanged(["fresh"]) == set()


def test_a_symlinked_folder_on_the_way_is_not_looked_through(tmp_path: Path) -> None:
    root = tmp_path / "root"
    files = placed_files(root)
    files.recorded([("d/f", placed(root, "d/f"))])
    (root / "d").rename(tmp_path / "moved")  # the same inode, reached through a symlink
    (root / "d").symlink_to(tmp_path / "moved")
    assert files.unchanged(["d/f"]) == set()


def test_at_most_limit_are_remembered_the_oldest_forgotten_first(tmp_path: Path) -> None:
    files = placed_files(tmp_path, limit=2)
    files.recorded([(n, placed(tmp_path, n)) for n in ("a", "b", "c")])
    assert files.unchanged(["a", "b", "c"]) == {"b", "c"}
