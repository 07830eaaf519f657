"""File operations beneath a root: no symlink is followed on the way, modes carry
permission bits only, and an exchange swaps two names in one step."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from mesh.adapters.fs import beneath
from mesh.adapters.fs.beneath import Beneath, Escape, OpenFolders


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "victim").write_bytes(b"not yours\n")
    (tmp_path / "root" / "lure").symlink_to(tmp_path / "outside")
    return tmp_path / "root"


def test_no_operation_passes_through_a_symlinked_folder(root: Path) -> None:
    fs = Beneath(root)
    outside = root.parent / "outside"
    (root / "real").mkdir()
    (root / "real" / "f").write_bytes(b"ours\n")
    attempts: list[Callable[[], object]] = [
        lambda: fs.write_bytes("lure/new", b"x", 0o644),
        lambda: fs.write_file("lure/new", None, 0o644),
        lambda: fs.set_file("lure/victim", 0o777),
        lambda: fs.symlink("/etc", "lure/link"),
        lambda: fs.mkdir("lure/d", 0o755, exist_ok=True),
        lambda: fs.rename("real/f", "lure/victim"),
        lambda: fs.rename("lure/victim", "real/stolen"),
        lambda: fs.link("real/f", "lure/linked"),
        lambda: fs.exchange("real/f", "lure/victim"),
        lambda: fs.unlink("lure/victim"),
        lambda: fs.rmdir("lure/d"),
        lambda: fs.open_file("lure/victim"),
        lambda: fs.read("lure/victim"),
        lambda: fs.lstat("lure/victim"),
    ]
    for attempt in attempts:
        with pytest.raises(Escape, match="'lure' on the way is a symlink"):
            attempt()
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_bytes() == b"not yours\n"
    assert (root / "real" / "f").read_bytes() == b"ours\n"
    assert not fs.lexists("lure/victim")  # not in the tree: below a symlink


def test_the_last_component_is_never_followed(root: Path) -> None:
    fs = Beneath(root)
    with pytest.raises(OSError):  # ELOOP: a symlink is not opened as a file
        fs.open_file("lure")
    with pytest.raises(FileExistsError):
        fs.write_bytes("lure", b"x", 0o644)
    fs.unlink("lure")  # removes the link, not what it points to
    assert (root.parent / "outside" / "victim").exists()


@pytest.mark.parametrize("rel", ["", "/etc/passwd", "../outside/victim", "a/../../x",
                                 "a//b", "./a"])
def test_paths_that_are_not_plain_relative_paths_are_refused(root: Path, rel: str) -> None:
    with pytest.raises(Escape, match="not a plain relative path"):
        Beneath(root).write_bytes(rel, b"x", 0o644)


def test_modes_carry_permission_bits_only(root: Path) -> None:
    fs = Beneath(root)
    st = fs.write_bytes("d/suid", b"#!/bin/sh\n", 0o4755)
    assert stat.S_IMODE(st.st_mode) == 0o755
    fs.mkdir("d/sticky", 0o3777, exist_ok=False)
    assert stat.S_IMODE((root / "d/sticky").stat().st_mode) == 0o777
    st = fs.set_file("d/suid", 0o6750, mtime_ns=1_000_000_000)
    assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_mtime_ns == 1_000_000_000


def test_exchange_swaps_two_names_in_one_step(root: Path) -> None:
    fs = Beneath(root)
    fs.write_bytes("a", b"new\n", 0o644)
    fs.write_bytes("dir/b", b"old\n", 0o644)
    if not fs.exchange("a", "dir/b"):
        pytest.skip("this filesystem cannot swap two names")
    assert (root / "a").read_bytes() == b"old\n"
    assert (root / "dir/b").read_bytes() == b"new\n"


def test_folders_are_made_on_the_way_and_a_new_file_never_replaces(root: Path) -> None:
    fs = Beneath(root)
    fs.write_bytes("x/y/z", b"1", 0o600)
    assert (root / "x/y/z").read_bytes() == b"1"
    with pytest.raises(FileExistsError):
        fs.write_bytes("x/y/z", b"2", 0o600)
    with pytest.raises(NotADirectoryError):
        fs.write_bytes("x/y/z/w", b"3", 0o600)
    fd = fs.open_file("x/y/z")
    try:
        fs.write_file("copy", fd, 0o640)
    finally:
        os.close(fd)
    assert fs.read("copy") == b"1"


@pytest.mark.parametrize("renameat2", [True, False])
def test_move_new_moves_one_inode_and_never_replaces(
        root: Path, renameat2: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``renameat2(RENAME_NOREPLACE)``, and without (a link, then an unlink)."""
    if not renameat2:
        monkeypatch.setattr(beneath, "_renameat2", None)
    fs = Beneath(root)
    (root / "in" / "a").mkdir(parents=True)
    (root / "out").mkdir()
    (root / "in" / "a" / "f").write_bytes(b"staged\n")
    inode = (root / "in" / "a" / "f").stat().st_ino
    noted: list[str] = []
    fs.changing = noted.append
    with OpenFolders(fs) as folders:
        assert fs.move_new("in/a/f", "out/f", folders)
        (root / "in" / "a" / "g").write_bytes(b"another\n")
        for there in ("out/f", "out"):  # a file, a folder: both stay
            assert not fs.move_new("in/a/g", there, folders)
        (root / "out" / "link").symlink_to("nowhere")
        assert not fs.move_new("in/a/g", "out/link", folders)
    assert (root / "out" / "f").stat().st_ino == inode
    assert (root / "out" / "f").read_bytes() == b"staged\n"
    assert (root / "in" / "a" / "g").read_bytes() == b"another\n"
    assert not (root / "in" / "a" / "f").exists()
    assert str((root / "out" / "link").readlink()) == "nowhere"
    assert noted[0] == "out/f"  # lsyncd is told of the one change it sees


def test_open_folders_reach_each_folder_once_and_never_through_a_symlink(root: Path) -> None:
    fs = Beneath(root)
    (root / "a" / "b").mkdir(parents=True)
    with OpenFolders(fs) as folders:
        fd, name = folders.parent("a/b/x")
        assert name == "x" and os.path.samestat(os.fstat(fd), (root / "a" / "b").stat())
        assert folders.parent("a/b/y")[0] == fd
        assert folders.parent("top")[1] == "top"
        with pytest.raises(Escape):
            folders.parent("lure/victim")
        with pytest.raises(FileNotFoundError):
            folders.parent("missing/x")
        with pytest.raises(Escape):
            folders.parent("a/../lure/victim")
    opened = len(list(Path("/proc/self/fd").iterdir()))
    with OpenFolders(fs) as folders:
        folders.parent("a/b/x")
    assert len(list(Path("/proc/self/fd").iterdir())) == opened  # closed with the batch
