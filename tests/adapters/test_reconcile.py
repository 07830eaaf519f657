"""The start-up reconcile's walk (``mesh.adapters.fs.reconcile``) on a real tree: what
it hands the scan, in runs, and what it finds gone."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from mesh.adapters.fs.listing import PERMISSIONS
from mesh.adapters.fs.reconcile import reconcile, shown
from mesh.core.manifest import Kind
from mesh.core.reconcile import Fingerprint, Seen
from mesh.core.reconcile import shown as core_shown


def tree(root: Path) -> list[str]:
    """Two folders of three files each, and a file at the top: the walk's order."""
    paths = []
    for folder in ("a", "b"):
        (root / folder).mkdir()
        paths.append(folder)
        for i in range(3):
            (root / folder / f"f{i}").write_bytes(b"x" * i)
            paths.append(f"{folder}/f{i}")
    (root / "top").write_bytes(b"top")
    return [*paths, "top"]


def nothing_known(paths: list[str]) -> Mapping[str, Fingerprint]:
    return {}


def test_a_first_start_hands_every_path_on_in_runs_in_walk_order(tmp_path: Path) -> None:
    """Issue 16: a million paths held as strings, and a set of them, were most of a
    first start's 432 MiB. They go on in runs of ``chunk`` joined into one string each,
    and with nothing indexed no set of the paths found is kept: nothing can be gone."""
    walked = tree(tmp_path)
    out = reconcile(tmp_path, lambda _: False, nothing_known, lambda: iter(()), chunk=3)
    assert (out.on_disk, out.changed, out.unchanged, out.gone) == (9, 9, 0, [])
    assert [len(run) for run in out.to_scan()] == [3, 3, 3]
    assert [p for run in out.to_scan() for p in run] == walked
    assert all(isinstance(run, str) for run in out.runs)


def test_a_held_path_the_walk_did_not_find_is_gone(tmp_path: Path) -> None:
    walked = tree(tmp_path)
    held = ["a/f1", "gone/file", "top"]
    out = reconcile(tmp_path, lambda _: False, nothing_known, lambda: iter(held), chunk=4)
    assert out.gone == ["gone/file"]
    assert [p for run in out.to_scan() for p in run] == walked
    assert [len(run) for run in out.to_scan()] == [4, 4, 1]


def seen(st: os.stat_result) -> Seen:
    """What one ``lstat`` says, as the core takes it: the reference for ``shown``."""
    kind = (Kind.DIR if stat.S_ISDIR(st.st_mode) else
            Kind.FILE if stat.S_ISREG(st.st_mode) else None)
    return Seen(kind, stat.S_IMODE(st.st_mode) & PERMISSIONS,
                (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))


def test_what_a_stat_shows_is_the_core_s_fingerprint(tmp_path: Path) -> None:
    """The walk's ``shown`` of an ``lstat`` is ``mesh.core.reconcile.shown`` of its
    ``Seen``: a file, a folder, a symlink, a fifo, with setuid and sticky bits that
    are never synced."""
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "file").chmod(0o4751)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir").chmod(0o1755)
    (tmp_path / "link").symlink_to("file")
    os.mkfifo(tmp_path / "fifo")
    for name in ("file", "dir", "link", "fifo"):
        st = (tmp_path / name).lstat()
        assert shown(st) == core_shown(seen(st)), name
    assert shown((tmp_path / "file").lstat()) == (0o751, 1, *(
        getattr((tmp_path / "file").lstat(), a) for a in ("st_mtime_ns", "st_ctime_ns", "st_ino")))
