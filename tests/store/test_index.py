"""The SQLite state database."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.core.digest import bucket_of
from mesh.core.effects import PathState
from mesh.core.manifest import ContentKey, Entry, Kind
from mesh.core.resolver import Conflict, Version, resolve
from mesh.core.vclock import VersionVector
from mesh.store.index import Index
from mesh.store.rows import version_row
from tests.core.sim import Cluster
from tests.core.test_simulation import actions, check_invariants, run
from tests.store.test_digests import assert_kept


def e(vector: dict[str, int], writer: str, content: int | None, path: str = "a/b") -> Entry:
    digest = None if content is None else bytes([content]) * 32
    return Entry(path, VersionVector.of(vector), digest, 3, 7, 0o640, Kind.FILE, 11, writer)


LATEST = max(int(p.name.split("_")[0]) for p in
             (Path(__file__).parents[2] / "mesh/store/schema").glob("*.sql"))


def test_schema_is_strict_wal_and_numbered(tmp_path: Path) -> None:
    idx = Index(tmp_path / "state.db")
    assert _user_version(idx) == LATEST
    assert idx.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for (sql,) in idx.db.execute("SELECT sql FROM sqlite_master WHERE type = 'table'"):
        assert "STRICT" in sql
    idx.close()
    assert _user_version(Index(tmp_path / "state.db")) == LATEST  # reopening migrates nothing


def test_schema_4_gives_the_rows_of_an_older_index_their_buckets(tmp_path: Path) -> None:
    """An index made by a release before schema 4: its versions get the bucket a peer's
    catch-up reads them by, and new rows are written with theirs."""
    path = tmp_path / "state.db"
    old = sqlite3.connect(path, isolation_level=None)
    folder = Path(__file__).parents[2] / "mesh/store/schema"
    for sql in sorted(folder.glob("000[123]_*.sql")):
        old.executescript(sql.read_text())
    old.execute("PRAGMA user_version = 3")
    v = Version.of(e({"n1": 1}, "n1", 1, path="old/file"))
    old.execute("INSERT INTO versions VALUES (?,?,?,?,?,?,?)", version_row(v)[:7])
    old.close()
    idx = Index(path)
    assert _user_version(idx) == LATEST
    assert idx.state("old/file") == PathState(v, None)
    idx.upsert_versions([Version.of(e({"n1": 1}, "n1", 2, path="new/file"))])
    assert dict(idx.db.execute("SELECT path, bucket FROM versions")) == {
        "old/file": bucket_of("old/file"), "new/file": bucket_of("new/file")}
    idx.close()


def test_state_round_trip_with_several_heads(tmp_path: Path) -> None:
    idx = Index(tmp_path / "s.db")
    disk = Version.of(e({"n1": 1}, "n1", 1), e({"n2": 1}, "n2", 2))
    target = Version.of(e({"n1": 2, "n2": 1}, "n1", 3))
    idx.set_state("a/b", PathState(disk, target))
    assert idx.state("a/b") == PathState(disk, target)
    idx.set_state("a/b", PathState(target, None))
    assert idx.state("a/b") == PathState(target, None)
    assert idx.state("nope") == PathState()
    idx.close()
    again = Index(tmp_path / "s.db")
    assert again.state("a/b") == PathState(target, None)
    assert again.count() == 1


def test_conflicts_are_logged_once_and_queried(tmp_path: Path) -> None:
    idx = Index(tmp_path / "s.db")
    c = resolve(e({"n1": 1}, "n1", 1), e({"n2": 1}, "n2", 2))
    assert isinstance(c, Conflict)
    assert idx.log_conflict(c, now_ms=1000)
    assert not idx.log_conflict(c, now_ms=2000)
    (row,) = idx.conflicts()
    assert row.conflict == c and row.logged_ms == 1000
    assert idx.conflicts(since_ms=1001) == []
    assert idx.conflict(c.id) == row and idx.conflict("0" * 24) is None


def test_a_failed_batch_leaves_nothing(tmp_path: Path) -> None:
    idx = Index(tmp_path / "s.db")
    v = Version.of(e({"n1": 1}, "n1", 1))
    with pytest.raises(RuntimeError), idx.batch():
        idx.set_state("a/b", PathState(v, None))
        idx.set_peer_vector("n2", "a/b", v.vector)
        raise RuntimeError("crash in the middle of a batch")
    assert idx.state("a/b") == PathState()
    assert idx.peer_vector("n2", "a/b") is None


def test_a_killed_writer_loses_only_the_open_batch(tmp_path: Path) -> None:
    """A transaction never committed (the process died) is not visible on reopen."""
    path = tmp_path / "s.db"
    idx = Index(path)
    v = Version.of(e({"n1": 1}, "n1", 1))
    idx.set_state("kept", PathState(v, None))
    idx.db.execute("BEGIN IMMEDIATE")
    idx.db.execute("DELETE FROM versions")
    # Simulate death: open a second connection while the first never commits.
    other = sqlite3.connect(str(path))
    assert other.execute("SELECT count(*) FROM versions").fetchone()[0] == 1
    other.close()


def test_bulk_upsert(tmp_path: Path) -> None:
    idx = Index(tmp_path / "s.db")
    versions = [Version.of(e({"n1": i + 1}, "n1", i % 200, path=f"d/f{i}")) for i in range(500)]
    idx.upsert_versions(versions)
    assert idx.count() == 500
    assert next(iter(idx.versions())) == versions[0]


def test_the_targets_naming_a_hash_are_every_one_a_head_of_which_holds_it(
        tmp_path: Path) -> None:
    idx = Index(tmp_path / "s.db")
    two = Version.of(e({"n1": 1}, "n1", 1, path="a"), e({"n2": 1}, "n2", 2, path="a"))
    idx.set_state("a", PathState(None, two))  # 2 is the loser's content: a head, not the winner
    idx.set_state("b", PathState(None, Version.of(e({"n1": 1}, "n1", 3, path="b"))))
    idx.set_state("c", PathState(Version.of(e({"n1": 1}, "n1", 2, path="c")), None))
    assert list(idx.targets_naming([bytes([2]) * 32])) == [two]
    assert [v.path for v in idx.targets_naming([bytes([3]) * 32, bytes([9]) * 32])] == ["b"]
    assert list(idx.targets_naming([])) == []
    many = [bytes([n]) * 32 for n in range(100, 200)]  # too many to look for: every target
    assert [v.path for v in idx.targets_naming(many)] == ["a", "b"]


def test_writes_held_back_in_a_batch_are_seen_by_every_query(tmp_path: Path) -> None:
    idx = Index(tmp_path / "s.db")
    old = Version.of(e({"n1": 1}, "n1", 1, path="d/a"))
    idx.set_state("d/a", PathState(old, None))
    new = Version.of(e({"n1": 2}, "n1", 2, path="d/a"))
    target = Version.of(e({"n2": 1}, "n2", 3, path="d/b"))
    with idx.batch():
        idx.set_state("d/a", PathState(new, None))
        idx.set_state("d/b", PathState(None, target))
        idx.set_peer_vector("n2", "d/a", new.vector)
        assert idx.state("d/a") == PathState(new, None)
        assert idx.count() == 1 and list(idx.paths()) == ["d/a"]
        assert list(idx.versions()) == [new] and list(idx.targets()) == [target]
        assert idx.paths_under("d") == ["d/a"]
        assert dict(idx.disk_items()) == {"d/a": new.vector}
        assert dict(idx.peer_items("n2")) == {"d/a": new.vector}
        assert list(idx.versions_in(["d/a", "d/b"])) == [new]
        # a bulk upsert after a held-back write of the same path is the later write
        idx.set_state("d/a", PathState(old, None))
        idx.upsert_versions([new])
        assert idx.state("d/a") == PathState(new, None)
        idx.set_state("d/b", PathState())
        assert idx.state("d/b") == PathState()
    idx.close()
    again = Index(tmp_path / "s.db")
    assert again.state("d/a") == PathState(new, None) and again.state("d/b") == PathState()
    assert again.peer_vector("n2", "d/a") == new.vector
    again.close()


def test_prefetch_reads_what_point_reads_would(tmp_path: Path) -> None:
    idx = Index(tmp_path / "s.db")
    for i in range(40):
        v = Version.of(e({"n1": i + 1}, "n1", i, path=f"d/f{i}"))
        idx.set_state(v.path, PathState(v if i % 3 else None, None if i % 2 else v))
        if i % 5:
            idx.set_peer_vector("n2", v.path, v.vector)
    wanted = [f"d/f{i}" for i in range(0, 50, 2)] + ["d/f4", "nope"]
    expected = {p: (idx.state(p), idx.peer_vector("n2", p)) for p in wanted}
    with idx.batch():
        idx.prefetch(wanted, "n2")
        assert {p: (idx.state(p), idx.peer_vector("n2", p)) for p in wanted} == expected
    idx.prefetch(wanted, "n2")  # outside a batch: nothing to cache, nothing fails
    idx.close()


def test_checkpoints_run_on_a_thread_of_their_own(tmp_path: Path) -> None:
    path = tmp_path / "checkpointed.db"
    idx = Index(path)
    assert idx.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] > 1000  # a backstop
    before = path.stat().st_size
    for batch in range(10):
        with idx.batch():
            for i in range(100):
                v = Version.of(e({"n1": 1}, "n1", 1, path=f"d{batch}/f{i}"))
                idx.set_state(v.path, PathState(v, None))
    deadline = time.monotonic() + 10
    while path.stat().st_size == before:  # the WAL's pages reached the database file
        assert time.monotonic() < deadline, "no checkpoint ran"
        time.sleep(0.01)
    idx.close()
    assert not [t for t in threading.enumerate() if t.name == "checkpoint checkpointed.db"]


def test_unopenable_database_is_a_store_error(tmp_path: Path) -> None:
    from mesh.errors import StoreError

    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StoreError, match="open state database"):
        Index(tmp_path / "dir.db")


def test_a_database_of_a_later_release_is_refused_untouched(tmp_path: Path) -> None:
    """A state database migrated by a later release (its triggers call functions this
    release does not register) is not opened: this release says so and writes nothing."""
    from mesh.errors import StoreError

    path = tmp_path / "state.db"
    Index(path).close()
    later = sqlite3.connect(path, isolation_level=None)
    later.execute(f"PRAGMA user_version = {LATEST + 1}")
    later.close()
    with pytest.raises(StoreError, match=f"schema {LATEST + 1}, from a later release"):
        Index(path)
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == LATEST + 1
    check.close()


class SqlSimStore(Index):
    """The real store under the simulation: the replica's laws hold over SQLite."""

    def __init__(self) -> None:
        self.keep: dict[ContentKey, bytes] = {}
        # As KeepArea.has: a folder has no content to keep, a restore makes it.
        super().__init__(":memory:", keep=lambda c: c[0] is Kind.DIR or c in self.keep)

    def conflict_map(self) -> dict[str, Conflict]:
        return {r.conflict.id: r.conflict for r in self.conflicts()}

    def all_states(self) -> dict[str, PathState]:
        paths = [v.path for v in self.versions()] + [v.path for v in self.targets()]
        return {p: self.state(p) for p in paths}


class BatchedSqlSimStore(SqlSimStore):
    """The same inside long transactions, committed every few reads: the replica then
    works on the batch's caches and held-back writes, as it does in the agent."""

    def __init__(self) -> None:
        super().__init__()
        self._open = contextlib.ExitStack()
        self._open.enter_context(self.batch())
        self._reads = 0

    def state(self, path: str) -> PathState:
        self._reads += 1
        if self._reads % 7 == 0:
            self._open.close()
            self._open.enter_context(self.batch())
        return super().state(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(3, 4), script=st.lists(actions, min_size=20, max_size=60),
       batched=st.booleans())
def test_simulation_over_sqlite(n: int, script: list[tuple[object, ...]], batched: bool) -> None:
    cluster = Cluster(n, [0, 300, -300], store=BatchedSqlSimStore if batched else SqlSimStore)
    run(cluster, script)
    cluster.quiesce()
    check_invariants(cluster)
    for node in cluster.nodes.values():  # the digests a catch-up reads are the rows' (schema 5)
        assert isinstance(node.store, Index)
        assert_kept(node.store)


def test_purge_forgets_what_a_peer_may_no_longer_send_and_stands_in_for_our_counters() -> None:
    """Issue 13: an index poisoned before the bounds (a keep-area path, {n2: 2**63-1} on
    disk and in a target) made the agent exit at every start; the rest stays."""
    idx = Index(":memory:")
    big = 2**63 - 1

    def version(vector: dict[str, int], writer: str, content: int | None, path: str) -> Version:
        return Version((e(vector, writer, content, path=path),))

    keep = ".mesh-keep/objects/x"
    with idx.batch():
        idx.set_state("p.txt", PathState(version({"n2": big}, "n9", None, "p.txt"), None))
        idx.set_state("q.txt", PathState(version({"n2": 1}, "n2", 2, "q.txt"),
                                         version({"n9": big}, "n9", 3, "q.txt")))
        idx.set_state(keep, PathState(version({"n9": 1}, "n9", 4, keep), None))
        idx.set_peer_vector("n1", "p.txt", VersionVector.of({"n2": 1}))
        idx.set_peer_vector("n9", "p.txt", VersionVector.of({"n2": big}))
    counts = idx.purge("n2", lambda p: p.startswith(".mesh-keep"),
                       lambda w: any(c > 2**62 for _, c in w.vector.items()),
                       lambda v: any(c > 2**62 for _, c in v.items()))
    assert counts == {"peer_vectors": 1, "versions": 2, "targets": 1, "conflicts": 0}
    stand_in = idx.state("p.txt").disk  # what n1 announced, as a delete of ours
    assert stand_in is not None and stand_in.vector == VersionVector.of({"n2": 1})
    assert stand_in.content is None and stand_in.winner.writer == "n2"
    assert idx.state("q.txt") == PathState(version({"n2": 1}, "n2", 2, "q.txt"), None)
    assert idx.state(keep) == PathState()
    assert idx.peer_vector("n9", "p.txt") is None
    assert_kept(idx)
    idx.close()


def _user_version(idx: Index) -> int:
    return int(idx.db.execute("PRAGMA user_version").fetchone()[0])
