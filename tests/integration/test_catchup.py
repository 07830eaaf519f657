"""Catch-up in bulk (issue 16): a receiver adopts a whole push with reads of the index that
do not grow with the push, and a sender sweeps the index for what a peer is behind on a
page at a time, never holding the whole tree. In one process: no network, no rsync."""

from __future__ import annotations

import functools
import hashlib
import re
import time
from pathlib import Path

import pytest

from mesh.core import admit, manifest
from mesh.core.effects import PathState
from mesh.core.manifest import Entry, Kind, Manifest
from mesh.core.replica import Replica
from mesh.core.resolver import Version
from mesh.core.vclock import VersionVector, hlc_pack
from mesh.engine import pushes as pushes_module
from mesh.engine.admission import PushAdmission
from mesh.engine.pushes import Pushes
from mesh.store import bulk
from mesh.store.index import Index
from tests.integration.test_data_faults import Receiver

# The statements that read one path's row (``Index.state``, ``Index.peer_vector``) or
# one content's kept rows: what a push's landing must not issue per path.
PER_PATH = re.compile(r"SELECT \(SELECT heads FROM versions WHERE path = "
                      r"|SELECT vector FROM peer_vectors WHERE peer = .* AND path = "
                      r"|SELECT hash, count\(\*\) FROM kept")


def pushed(n: int) -> list[tuple[Entry, bytes]]:
    now_ms = time.time_ns() // 1_000_000
    out = []
    for i in range(n):
        data = f"file {i}\n".encode()
        out.append((Entry(f"d{i % 7}/f{i:04d}", VersionVector.of({"n1": 1}),
                          hashlib.sha256(data).digest(), len(data), 0, 0o644, Kind.FILE,
                          hlc_pack(now_ms - n + i), "n1"), data))
    return out


async def land_one_push(root: Path, n: int) -> int:
    """An empty receiver learns ``n`` files as announcements (the exchange's catch-up),
    then one push brings them all; the per-path reads its landing issued."""
    r = Receiver(root)
    files = pushed(n)
    with r.index.batch():
        effects = r.replica.remote("n1", [e for e, _ in files], (), 0)
    await r.plane.apply(effects)

    async def applied(_timeout: float) -> bool:
        return True

    admission = PushAdmission(r.sink, announced=functools.partial(bulk.peer_vectors, r.index),
                              wait_applied=applied, limits=admit.Limits())
    statements: list[str] = []
    r.index.db.set_trace_callback(statements.append)
    header = manifest.encode(Manifest("n1", 1, 0, tuple(e for e, _ in files)))
    r.keep.staging_dir("n1-1-1").mkdir(parents=True)
    ticket = await admission.begin("n1", "n1-1-1", header)
    for e, data in files:  # rsync's part
        r.stage("n1-1-1", e.path, data)
    await admission.end(ticket, 0)
    r.index.db.set_trace_callback(None)
    for e, data in files:
        assert (r.root / e.path).read_bytes() == data
        assert r.index.state(e.path) == PathState(Version.of(e), None)
    assert not r.keep.staging_dir("n1-1-1").exists()
    return sum(1 for s in statements if PER_PATH.match(s))


async def test_a_push_is_adopted_with_reads_that_do_not_grow_with_it(tmp_path: Path) -> None:
    small = await land_one_push(tmp_path / "small", 10)
    large = await land_one_push(tmp_path / "large", 60)
    assert large == small, f"per-path reads: {small} for 10 files, {large} for 60"


def test_a_sweep_holds_about_two_pushes_and_sends_each_path_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer behind on every path of a tree larger than the sweep's window: what is
    queued for it stays within the window however large the tree, and every path is
    pushed once, in pushes of PATHS_PER_PUSH."""
    per_push = 8
    monkeypatch.setattr("mesh.core.pushplan.PATHS_PER_PUSH", per_push)
    monkeypatch.setattr(pushes_module, "SWEEP_PAGE", 5)
    monkeypatch.setattr(pushes_module, "SWEEP_AHEAD", 2 * per_push)
    index = Index(tmp_path / "s.db")
    files = [e for e, _ in pushed(200)]
    index.upsert_versions(Version.of(e) for e in files)
    replica = Replica("n1", index)
    p = Pushes(me="n1", epoch=1, index=index, data=_NoData(replica),  # type: ignore[arg-type]
               creds=None, data_dir=tmp_path,  # type: ignore[arg-type]
               endpoint=lambda peer: None, own_grace=0.0)
    p.add_peer("n2")
    p.sweep("n2")
    sent: list[str] = []
    now = time.monotonic()
    for _ in range(1000):
        assert p.plan.pending("n2") <= 2 * per_push + 5, "the sweep queued the whole tree"
        tick = p.plan.tick(now, ["n2"])
        for push in tick.pushes:
            assert len(push.versions) <= per_push
            sent += [path for path, _ in push.versions]
            p.plan.end(push, now, 0)
        p._page()  # what the pusher's loop does after each tick
        if not tick.pushes and "n2" not in p._sweeps and not p.plan.pending("n2"):
            break
        now += 0.01
    assert sorted(sent) == sorted(e.path for e in files)
    assert len(sent) == len(set(sent)), "a path pushed twice"
    index.close()


class _NoData:
    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    async def scan(self, paths: list[str]) -> None:
        pass


async def test_a_pushed_file_moves_once_and_a_content_two_paths_want_lands_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Held where rsync staged it, a pushed file is renamed to its path (the same inode),
    not filed into the keep area and out again; content two paths of the push want is
    copied for one and moved for the other; nothing is left held or staged."""
    r = Receiver(tmp_path / "data")
    now_ms = time.time_ns() // 1_000_000
    same, other = b"the same bytes\n", b"other bytes\n"

    def made(rel: str, data: bytes) -> Entry:
        return Entry(rel, VersionVector.of({"n1": 1}), hashlib.sha256(data).digest(),
                     len(data), 0, 0o644, Kind.FILE, hlc_pack(now_ms), "n1")

    files = {"a": (made("a", same), same), "b": (made("b", same), same),
             "c": (made("c", other), other)}
    ticket = await r.begin("n1-1-1", *(e for e, _ in files.values()))
    for rel, (_, data) in files.items():
        r.stage("n1-1-1", rel, data)
    staged = {rel: (r.keep.staging_dir("n1-1-1") / rel).stat().st_ino for rel in files}
    renames: list[tuple[str, str]] = []
    rename = r.keep.fs.rename

    def counted(src: str, dst: str, *, create: bool = False) -> None:
        renames.append((src, dst))
        rename(src, dst, create=create)

    monkeypatch.setattr(r.keep.fs, "rename", counted)
    await r.sink.end(ticket, 0)
    # At most two per file: to a temp name beside its path, then onto it.
    assert len(renames) <= 2 * len(files), renames
    for rel, (e, data) in files.items():
        assert (r.root / rel).read_bytes() == data
        assert r.index.state(rel) == PathState(Version.of(e), None)
    assert (r.root / "c").stat().st_ino == staged["c"]
    assert {(r.root / "a").stat().st_ino, (r.root / "b").stat().st_ino} & {
        staged["a"], staged["b"]}
    assert not r.keep._held
    assert not r.keep.staging_dir("n1-1-1").exists()


def test_what_a_push_held_and_no_restore_took_is_filed(tmp_path: Path) -> None:
    r = Receiver(tmp_path / "data")
    r.stage("n1-1-1", "x", b"kept\n")
    content = (Kind.FILE, hashlib.sha256(b"kept\n").digest(), 0o644)
    r.keep.hold(r.keep.staging_rel("n1-1-1", "x"), content)
    assert r.keep.has(content)
    assert not r.keep.object_path(content).exists()
    assert r.keep.file_held() == []
    assert r.keep.object_path(content).read_bytes() == b"kept\n"
    assert r.keep.has(content)
