"""The paths the agent notes for lsyncd to pass over (``mesh.adapters.lsyncd.agentwrites``;
lsyncd reading them: ``tests/integration/test_lsyncd.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.adapters.fs.beneath import FRESH_S, Beneath
from mesh.adapters.lsyncd import agentwrites
from mesh.adapters.lsyncd.agentwrites import AgentWrites
from mesh.core.paths import KEEP_NAME


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_notes_what_lsyncd_would_see_and_nothing_it_excludes(tmp_path: Path) -> None:
    writes = AgentWrites(tmp_path / "notes")
    for rel in ["a", "d/b c", f"{KEEP_NAME}/objects/x", "d/.b.Ab12Cd", "new\nline", "é"]:
        writes.note(rel)
    header, *noted = lines(tmp_path / "notes")
    assert header.startswith("meshsync agent writes ")
    assert noted == ["a", "d/b c", "é"]
    writes.close()


def test_a_full_file_is_replaced_by_a_new_generation(tmp_path: Path) -> None:
    writes = AgentWrites(tmp_path / "notes", rotate_bytes=100)
    writes.note("first")
    first = lines(tmp_path / "notes")[0]
    for i in range(20):
        writes.note(f"path{i:02d}")
    header, *noted = lines(tmp_path / "notes")
    assert header != first and noted[-1] == "path19" and len(noted) < 20
    assert (tmp_path / "notes").stat().st_size <= 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
    writes.close()


def test_beneath_tells_of_each_change_before_it_is_made(tmp_path: Path) -> None:
    """Once per change an inotify watcher sees on the name: a new folder given a mode
    other than the one it is made with is two, a swap two on each name. And for the
    first change of a name, once more for each folder above it made here moments before:
    lsyncd may report it again as it lists each new folder."""
    fs = Beneath(tmp_path)
    told: list[tuple[str, bool]] = []
    fs.changing = lambda rel: told.append((rel, (tmp_path / rel).exists()))
    fs.mkdir("d", 0o755, exist_ok=False)
    fs.mkdir("d", 0o755, exist_ok=True)  # as it is: nothing changes
    fs.write_bytes("d/t", b"x", 0o644)
    fs.rename("d/t", "d/f")
    fs.set_file("d/f", 0o600)
    fs.set_file("d/f", 0o600, mtime_ns=10**18)
    fs.link("d/f", "d/g")
    assert fs.exchange("d/f", "d/g")
    fs.unlink("d/g")
    fs.symlink("f", "d/l")
    fs.unlink("d/l")
    fs.write_bytes("d/e/n/t", b"y", 0o644)  # two folders made on the way
    fs.unlink("d/e/n/t")
    fs.rmdir("d/e/n")
    fs.rmdir("d/e")
    fs.unlink("d/f")
    fs.rmdir("d")
    twice = [("d/t", False)] * 2  # a name's first change, below one folder made just now
    assert told == [("d", False), ("d", True), *twice, ("d/t", True), *[("d/f", False)] * 2,
                    ("d/f", True), ("d/f", True), ("d/f", True), *[("d/g", False)] * 2,
                    ("d/f", True), ("d/f", True), ("d/g", True), ("d/g", True),
                    ("d/g", True), *[("d/l", False)] * 2, ("d/l", True),
                    *[("d/e", False)] * 2, *[("d/e/n", False)] * 3, *[("d/e/n/t", False)] * 4,
                    ("d/e/n/t", True), ("d/e/n", True), ("d/e", True), ("d/f", True),
                    ("d", True)]


def test_a_folder_is_new_to_lsyncd_only_for_a_moment(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fs = Beneath(tmp_path)
    told: list[str] = []
    fs.changing = told.append
    clock = [100.0]
    monkeypatch.setattr("mesh.adapters.fs.beneath.time.monotonic", lambda: clock[0])
    fs.mkdir("d", 0o700, exist_ok=False)
    fs.write_bytes("d/a", b"x", 0o644)
    clock[0] += FRESH_S
    fs.write_bytes("d/b", b"x", 0o644)
    assert told == ["d", "d/a", "d/a", "d/b"]


def test_a_path_counts_as_noted_while_lsyncd_may_hold_its_note(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the pusher asks (``noted``): a path noted less than ``NOTE_S`` ago, whose next
    event lsyncd may drop; at most ``NOTED_KEPT`` paths, the oldest forgotten first."""
    now = [1000.0]
    monkeypatch.setattr(agentwrites.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(agentwrites, "NOTED_KEPT", 3)
    writes = AgentWrites(tmp_path / "notes")
    writes.note("a")
    writes.note(f"{KEEP_NAME}/objects/x")  # excluded: lsyncd never sees it
    assert writes.noted("a") and not writes.noted(f"{KEEP_NAME}/objects/x")
    assert not writes.noted("b")
    now[0] += agentwrites.NOTE_S - 0.5
    writes.note("b")
    assert writes.noted("a") and writes.noted("b")
    now[0] += 1.0
    assert not writes.noted("a") and writes.noted("b")
    for rel in ("c", "d", "e"):
        writes.note(rel)
    assert [writes.noted(r) for r in "bcde"] == [False, True, True, True]
    writes.close()
