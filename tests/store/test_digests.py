"""The digests the index keeps by trigger (schema 5, ``mesh.store.digests``) are, after
any writes, what hashing every row gives (``Digest.of``): a digest that drifted would
hide a difference from a catch-up for good."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.core.digest import Digest
from mesh.core.effects import PathState
from mesh.core.manifest import Entry, Kind
from mesh.core.resolver import Version
from mesh.core.vclock import VersionVector
from mesh.store import bulk, digests
from mesh.store.index import Index
from mesh.store.rows import pack, version_row

PATHS = [f"d{i % 3}/f{i}" for i in range(12)]
PEERS = ["n2", "n3"]
vectors = st.dictionaries(st.sampled_from(["n1", "n2", "n3"]), st.integers(1, 4),
                          min_size=1, max_size=3)
paths = st.sampled_from(PATHS)
# One write to the index, as the agent makes them.
ops = st.one_of(
    st.tuples(st.just("disk"), paths, vectors, st.booleans()),  # a write or a delete
    st.tuples(st.just("drop"), paths),  # no disk version any more
    st.tuples(st.just("peer"), st.sampled_from(PEERS), paths, vectors),
    st.tuples(st.just("forget"), paths),  # a tombstone every peer acknowledged
    st.tuples(st.just("bulk"), st.lists(st.tuples(paths, vectors), max_size=5)),
    st.tuples(st.just("fail"), paths, vectors),  # a batch rolled back
)


def version(path: str, vector: dict[str, int], content: bool = True) -> Version:
    return Version.of(Entry(path, VersionVector.of(vector),
                            bytes([len(path)]) * 32 if content else None, 1, 0, 0o644,
                            Kind.FILE, 1, "n1"))


def apply(index: Index, op: tuple[object, ...]) -> None:
    kind = op[0]
    if kind == "disk":
        _, path, vector, content = op
        assert isinstance(path, str) and isinstance(vector, dict)
        index.set_state(path, PathState(version(path, vector, bool(content)),
                                        index.state(path).target))
    elif kind == "drop":
        path = str(op[1])
        index.set_state(path, PathState(None, index.state(path).target))
    elif kind == "peer":
        _, peer, path, vector = op
        assert isinstance(vector, dict)
        index.set_peer_vector(str(peer), str(path), VersionVector.of(vector))
    elif kind == "forget":
        index.forget(str(op[1]), PEERS)
    elif kind == "bulk":
        rows = op[1]
        assert isinstance(rows, list)
        index.upsert_versions([version(p, v) for p, v in rows])
    elif kind == "fail":
        _, path, vector = op
        assert isinstance(path, str) and isinstance(vector, dict)
        with pytest.raises(RuntimeError), index.batch():
            index.set_state(path, PathState(version(path, vector), None))
            index.set_peer_vector("n2", path, VersionVector.of(vector))
            index.flush()
            raise RuntimeError("a batch that fails after its writes reached SQLite")


def assert_kept(index: Index) -> None:
    """Each digest the index keeps is the one its rows hash to."""
    index.flush()
    assert digests.read(index.db) == Digest.of(index.disk_items())
    owners = {o for (o,) in index.db.execute("SELECT DISTINCT owner FROM digests")}
    for peer in (owners - {digests.DISK}) | set(index.announcing_peers()):
        assert digests.read(index.db, peer) == Digest.of(index.peer_items(peer)), peer


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(ops, min_size=1, max_size=6), max_size=12))
def test_the_kept_digests_are_the_digests_of_the_rows(batches: list[list[tuple[object, ...]]]
                                                       ) -> None:
    index = Index(":memory:")
    for batch in batches:
        with index.batch():
            for op in batch:
                if op[0] != "fail":
                    apply(index, op)
        for op in batch:
            if op[0] == "fail":
                apply(index, op)
        assert_kept(index)
    index.close()


def test_a_replace_folds_the_row_it_replaced_out(tmp_path: Path) -> None:
    """The index writes by upsert; a REPLACE (recursive_triggers is on) keeps the digests
    right too, through its implicit delete."""
    index = Index(tmp_path / "s.db")
    index.upsert_versions([version("a", {"n1": 1})])
    index.set_peer_vector("n2", "a", VersionVector.of({"n1": 1}))
    row = version_row(version("a", {"n1": 2}))
    index.db.execute(f"INSERT OR REPLACE INTO versions VALUES ({','.join('?' * len(row))})",
                     row)
    index.db.execute("INSERT OR REPLACE INTO peer_vectors VALUES (?, ?, ?)",
                     ("n2", "a", pack({"n1": 2})))
    assert_kept(index)
    assert digests.read(index.db).count == 1
    index.close()


def test_schema_5_digests_the_rows_of_an_older_index(tmp_path: Path) -> None:
    """An index made before schema 5: its rows are digested once when it is opened, and
    the triggers keep that from then on."""
    path = tmp_path / "state.db"
    old = sqlite3.connect(path, isolation_level=None)
    old.create_function("mesh_bucket", 1, lambda p: 0)  # schema 4's migration of no rows
    folder = Path(__file__).parents[2] / "mesh/store/schema"
    for sql in sorted(folder.glob("000[1234]_*.sql")):
        old.executescript(sql.read_text())
    old.execute("PRAGMA user_version = 4")
    for i, p in enumerate(PATHS):
        old.execute("INSERT INTO versions VALUES (?,?,?,?,?,?,?,?)",
                    version_row(version(p, {"n1": i + 1})))
        old.execute("INSERT INTO peer_vectors VALUES (?, ?, ?)",
                    (PEERS[i % 2], p, pack({"n1": i + 1})))
    old.close()
    index = Index(path)
    assert digests.read(index.db).count == len(PATHS)
    assert_kept(index)
    index.upsert_versions([version(PATHS[0], {"n1": 9}), version("new", {"n2": 1})])
    index.forget(PATHS[1], PEERS)
    assert_kept(index)
    index.close()


def test_a_digest_read_in_a_thread_needs_no_function_registered(tmp_path: Path) -> None:
    """A read-only connection (``bulk.digest_in_thread``, the load report's reader) sees
    the kept digests; a connection that writes without the triggers' functions fails
    loudly rather than leave a digest behind its rows."""
    index = Index(tmp_path / "s.db")
    index.upsert_versions([version(p, {"n1": 1}) for p in PATHS])
    assert index.path is not None
    assert bulk.digest_in_thread(index.path) == Digest.of(index.disk_items())
    bare = sqlite3.connect(index.path, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="no such function"):
        bare.execute("DELETE FROM versions WHERE path = ?", (PATHS[0],))
    assert bare.execute("SELECT count(*) FROM versions").fetchone()[0] == len(PATHS)
    bare.close()
    index.close()
