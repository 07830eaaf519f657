"""A push's end adopts the staged files whose paths hold nothing here (issue 16,
``mesh.engine.staged``): one rename each, into place, recorded in bulk; anything that
came to such a path meanwhile is never replaced, and a symlinked folder on the way is
never written through. The receiving side in one process, as in ``test_data_faults``."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from mesh.core.effects import Effect, PathState
from mesh.core.manifest import Entry, Kind
from mesh.core.resolver import Version
from mesh.core.vclock import VersionVector, hlc_pack
from mesh.engine.staged import Adoptable
from tests.integration.test_data_faults import NOW_MS, Receiver

OLD_NS = (int(time.time()) - 3600) * 1_000_000_000  # outside the scanner's racy window


def new_file(rel: str, data: bytes, mtime_ns: int = OLD_NS) -> Entry:
    return Entry(rel, VersionVector.of({"n1": 1}), hashlib.sha256(data).digest(), len(data),
                 mtime_ns, 0o644, Kind.FILE, hlc_pack(NOW_MS), "n1")


def before_adoption(r: Receiver, monkeypatch: pytest.MonkeyPatch,
                    act: Callable[[], object] = lambda: None) -> list[list[str]]:
    """``act`` runs when the push's end adopts (after it sorted what was staged); the
    paths each adoption was given."""
    real = r.plane.staging.adopt
    calls: list[list[str]] = []

    async def adopt(found: Sequence[Adoptable]) -> tuple[list[Effect], list[Adoptable]]:
        calls.append([f.rel for f in found])
        act()
        return await real(found)

    monkeypatch.setattr(r.plane.staging, "adopt", adopt)
    return calls


def folder(rel: str) -> Entry:
    return Entry(rel, VersionVector.of({"n1": 1}), b"", 0, 0, 0o755, Kind.DIR,
                 hlc_pack(NOW_MS), "n1")


async def test_new_files_are_moved_into_place_and_recorded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty node's join, in small: a folder and the files in it, new here. Each
    file is the very inode rsync staged, with the version's mtime (rsync's was other),
    recorded as on disk with nothing pending, known to the stat cache (its scan hashes
    nothing), and nothing went through the keep area."""
    r = Receiver(tmp_path / "data")
    files = {f"d/f{i}": f"file {i}\n".encode() for i in range(5)}
    entries = [folder("d"), *(new_file(rel, data) for rel, data in files.items())]
    ticket = await r.begin("n1-1-1", *entries)
    inodes = {}
    for rel, data in files.items():
        r.stage("n1-1-1", rel, data)
        inodes[rel] = (r.keep.staging_dir("n1-1-1") / rel).stat().st_ino
    adopted = before_adoption(r, monkeypatch)
    await r.sink.end(ticket, 0)
    assert adopted == [sorted(files)]
    for entry in entries[1:]:
        at = r.root / entry.path
        assert at.read_bytes() == files[entry.path]
        assert at.stat().st_ino == inodes[entry.path]
        assert at.stat().st_mtime_ns == OLD_NS
        assert r.index.state(entry.path) == PathState(Version.of(entry), None)
        cached = r.plane.scanner.cache.get(entry.path) if r.plane.scanner.cache else None
        assert r.plane.scanner.cache is None or (cached is not None
                                                 and cached.hash == entry.hash)
    assert r.index.state("d") == PathState(Version.of(entries[0]), None)
    assert r.keep.objects_held() == {}
    assert not r.keep.staging_dir("n1-1-1").exists()


@pytest.mark.parametrize("there", ["file", "folder", "symlink"])
async def test_what_came_to_the_path_meanwhile_is_never_replaced(
        tmp_path: Path, there: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our user makes the path in the instant between the push's end sorting what it
    staged and the adoption: the rename must not replace it. The path then takes the
    restore's way: it is scanned (our write) and resolved against the pushed version,
    both kept."""
    r = Receiver(tmp_path / "data")
    pushed = b"n1's new file\n"
    e1 = new_file("p", pushed)
    ticket = await r.begin("n1-1-1", e1)
    r.stage("n1-1-1", "p", pushed)

    def user_first() -> None:
        if there == "file":
            (r.root / "p").write_bytes(b"n3's own file, not yet scanned\n")
        elif there == "folder":
            (r.root / "p").mkdir()
            (r.root / "p" / "inside").write_bytes(b"n3's file in it\n")
        else:
            (r.root / "p").symlink_to("elsewhere")

    assert before_adoption(r, monkeypatch, user_first) is not None
    await r.sink.end(ticket, 0)
    if there == "file":
        contents = {f.read_bytes() for f in r.root.iterdir() if f.is_file()}
        assert contents == {pushed, b"n3's own file, not yet scanned\n"}
    elif there == "folder":
        assert (r.root / "p" / "inside").read_bytes() == b"n3's file in it\n"
    else:
        links = [f for f in r.root.iterdir() if f.is_symlink()]
        assert [str(f.readlink()) for f in links] == ["elsewhere"]
    assert len(list(r.index.conflicts_on({"p"}))) == 1
    assert pushed in {f.read_bytes() for f in r.root.rglob("*")
                      if f.is_file() and not f.is_symlink() and ".mesh-keep" not in f.parts}


async def test_a_version_that_changed_meanwhile_is_not_adopted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulation's case: a newer version of the path arrives while the push's end
    waits for the loop; the older staged file must not land (a scan would record it as
    a write of ours, concurrent with the newer one)."""
    r = Receiver(tmp_path / "data")
    e1 = new_file("p", b"first\n")
    ticket = await r.begin("n1-1-1", e1)
    r.stage("n1-1-1", "p", b"first\n")
    e2 = Entry("p", VersionVector.of({"n1": 2}), hashlib.sha256(b"second\n").digest(), 7,
               OLD_NS, 0o644, Kind.FILE, hlc_pack(NOW_MS + 1), "n1")
    later: list[Effect] = []

    def newer_first() -> None:
        # n1's announcement, applied by the exchange (its effects wait for this end)
        with r.index.batch():
            later.extend(r.replica.remote("n1", [e2], (), NOW_MS))

    assert before_adoption(r, monkeypatch, newer_first) is not None
    await r.sink.end(ticket, 0)
    await r.plane.apply(later)
    assert not (r.root / "p").exists()
    assert r.index.state("p").target == Version.of(e2)
    assert r.writes_of_mine("p") == []
    assert list(r.index.conflicts_on({"p"})) == []


async def test_an_adoption_never_writes_through_a_symlinked_folder(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 13's attack on a path new here: ``lure`` is a symlink to a folder outside
    the root. The adoption refuses it, the restore refuses it too, and says why."""
    outside = tmp_path / "outside"
    outside.mkdir()
    r = Receiver(tmp_path / "data")
    (r.root / "lure").symlink_to(outside)
    e1 = new_file("lure/x", b"pwned\n")
    ticket = await r.begin("n1-1-1", e1)
    r.stage("n1-1-1", "lure/x", b"pwned\n")
    await r.sink.end(ticket, 0)
    assert list(outside.iterdir()) == []
    assert (r.root / "lure").is_symlink()
    assert "'lure' on the way is a symlink" in caplog.text


async def test_an_empty_file_and_a_file_rsync_gave_another_mtime(tmp_path: Path) -> None:
    r = Receiver(tmp_path / "data")
    empty, other = new_file("empty", b""), new_file("later", b"x\n", OLD_NS + 5)
    ticket = await r.begin("n1-1-1", empty, other)
    r.stage("n1-1-1", "empty", b"")
    r.stage("n1-1-1", "later", b"x\n")
    os.utime(r.keep.staging_dir("n1-1-1") / "later", ns=(OLD_NS, OLD_NS))
    await r.sink.end(ticket, 0)
    assert (r.root / "empty").read_bytes() == b""
    assert (r.root / "later").stat().st_mtime_ns == OLD_NS + 5
    assert r.index.state("later") == PathState(Version.of(other), None)


async def test_the_watcher_s_scan_of_an_adopted_file_is_one_stat_and_a_later_write_shows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The renames' events: the watcher's scan of each adopted file reads no row. A user
    write after that (same size, so only the mtime tells) is scanned and recorded, and
    so is a file a user moves over an adopted one (another inode, the same mtime)."""
    r = Receiver(tmp_path / "data")
    files = {f"d/f{i}": f"file {i}\n".encode() for i in range(4)}
    entries = [folder("d"), *(new_file(rel, data) for rel, data in files.items())]
    ticket = await r.begin("n1-1-1", *entries)
    for rel, data in files.items():
        r.stage("n1-1-1", rel, data)
    await r.sink.end(ticket, 0)
    assert len(r.plane.placed) == 4
    read: list[list[str]] = []
    real_prefetch = r.index.prefetch

    def prefetch(paths: list[str]) -> None:
        if paths:
            read.append(list(paths))
        real_prefetch(paths)

    monkeypatch.setattr(r.index, "prefetch", prefetch)
    await r.plane.scan(sorted(files), events_read=time.monotonic())
    assert read == [] and len(r.plane.placed) == 0
    assert all(r.plane.marks.since(rel) > 0 for rel in files)
    # Placed again (as a push's end would) and then changed by our user:
    r.plane.placed.recorded([(rel, (r.root / rel).lstat()) for rel in files])
    (r.root / "d/f0").write_bytes(b"FILE 0\n")
    other = tmp_path / "other"
    other.write_bytes(b"file 1\n")  # f1's content and mtime, another inode
    os.utime(other, ns=(OLD_NS, OLD_NS))
    other.replace(r.root / "d/f1")
    await r.plane.scan(["d/f0", "d/f1", "d/f2"], events_read=time.monotonic())
    assert read == [["d/f0", "d/f1"]]
    assert r.writes_of_mine("d/f0") != []
    disk = r.index.state("d/f0").disk
    assert disk is not None and disk.content is not None
    assert disk.content[1] == hashlib.sha256(b"FILE 0\n").digest()


async def test_the_scan_marks_of_adopted_files_stay_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A join's watcher scans are all of adopted files: none reaches ``_observe``, which
    drops old marks. Each such scan drops them too (at a million files the receiver's
    marks held a path each: 140 MiB more at its peak)."""
    r = Receiver(tmp_path / "data")
    monkeypatch.setattr(r.plane.marks, "kept", 3)
    monkeypatch.setattr(r.plane.marks, "kept_s", 0.0)
    files = {f"f{i}": f"file {i}\n".encode() for i in range(8)}
    ticket = await r.begin("n1-1-1", *(new_file(rel, data) for rel, data in files.items()))
    for rel, data in files.items():
        r.stage("n1-1-1", rel, data)
    await r.sink.end(ticket, 0)
    for rel in sorted(files):
        await r.plane.scan([rel], events_read=time.monotonic())
    assert len(r.plane.placed) == 0  # every scan was one stat
    assert len(r.plane.marks) <= 3


async def test_a_push_begins_while_the_one_before_it_lands(tmp_path: Path) -> None:
    """A join's pushes overlap (issue 16): the next push's begin, which only learns what
    that push brings (a want each), does not wait for the end of the push before it,
    which holds the data plane's applies while it lands (so rsync moves the next push's
    bytes meanwhile). Each push still lands whole."""
    r = Receiver(tmp_path / "data")
    first = {f"f{i}": f"first {i}\n".encode() for i in range(3)}
    second = {"g": b"second\n"}
    ticket = await r.begin("n1-1-1", *(new_file(rel, data) for rel, data in first.items()))
    for rel, data in first.items():
        r.stage("n1-1-1", rel, data)
    ending = asyncio.create_task(r.sink.end(ticket, 0))
    await asyncio.sleep(0)  # the end holds the applies, its staged files listed in a thread
    after = await r.begin("n1-1-2", *(new_file(rel, data) for rel, data in second.items()))
    assert not any((r.root / rel).exists() for rel in first), \
        "the next push's begin waited for the push before it to land"
    await ending
    r.stage("n1-1-2", "g", second["g"])
    await r.sink.end(after, 0)
    for rel, data in {**first, **second}.items():
        assert (r.root / rel).read_bytes() == data
        assert r.index.state(rel) == PathState(Version.of(new_file(rel, data)), None)
