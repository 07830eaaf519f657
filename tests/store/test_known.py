"""What the start-up walk reads of the index (``mesh.store.known``, issue 16): the same
records whichever way a chunk is read, by one range or by name."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.adapters.fs.listing import tree
from mesh.core.manifest import Entry, Kind
from mesh.core.reconcile import Known, expected
from mesh.core.resolver import Version
from mesh.core.vclock import VersionVector
from mesh.errors import MeshError
from mesh.store import known as known_mod
from mesh.store.index import Index
from mesh.store.known import KnownPaths
from mesh.store.statcache import to_sql_ino
from tests.store.test_index import e

# Names that sort between a folder and what it holds ("a.b" lies between "a" and "a/x")
NAMES = ["a", "a.b", "a-c", "a0", "b", "a b"]


def _indexed(index: Index, paths: list[str]) -> None:
    index.upsert_versions([Version.of(e({"n1": 1}, "n1", i % 200, path=p))
                           for i, p in enumerate(paths)])
    index.db.executemany("INSERT INTO stat_cache VALUES (?, 1, 2, 3, ?, ?)",  # what it hashed
                         [(p, i, bytes([i % 200]) * 32) for i, p in enumerate(paths)])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join),
                min_size=1, max_size=40, unique=True),
       st.integers(1, 7), st.integers(1, 4))
def test_a_chunk_reads_the_records_of_its_paths_and_no_other(
        tmp_path: Path, files: list[str], chunk: int, at_most: int) -> None:
    """Chunks in the walk's order over a tree whose folder names interleave with their
    siblings': each path's own record, whether the range held few enough rows or
    the chunk was read by name."""
    root = tmp_path / f"t{abs(hash((tuple(files), chunk, at_most)))}"
    for f in files:
        (root / f).mkdir(parents=True, exist_ok=True)
    walked = [p for p, _ in tree(root, "", lambda _: False)]
    index = Index(":memory:")
    _indexed(index, walked[::2])  # every other path indexed
    reader = KnownPaths(index.db)
    old = known_mod.RANGE_AT_MOST
    known_mod.RANGE_AT_MOST = at_most
    try:
        got = {}
        for i in range(0, len(walked), chunk):
            part = walked[i:i + chunk]
            found = reader.expected(part)
            assert set(found) <= set(part)
            got.update(found)
    finally:
        known_mod.RANGE_AT_MOST = old
    assert {p: want[-1] for p, want in got.items()} == {  # the inode column
        p: i for i, p in enumerate(walked[::2])}


KINDS = [Kind.FILE, Kind.DIR, Kind.SYMLINK]
HASHES = [None, b"", b"a" * 32, b"b" * 32]  # None: a delete


def entry(path: str, kind: Kind, digest: bytes | None, mode: int) -> Entry:
    return Entry(path, VersionVector.of({"n1": 1}), digest, 0 if digest is None else 3, 7,
                 mode, kind, 11, "n1")


def valid(kind: Kind, digest: bytes | None) -> bool:
    try:
        entry("p", kind, digest, 0o644)
    except MeshError:  # a file's hash is 32 bytes, a folder's empty
        return False
    return True


rows = st.tuples(st.sampled_from(KINDS), st.sampled_from(HASHES), st.sampled_from([0o644, 0o755]),
                 st.none() | st.sampled_from(HASHES[2:]),  # the stat cache's hash, or none
                 st.sampled_from([5, (1 << 64) - 3]),  # an inode; one past SQLite's int64
                 ).filter(lambda r: valid(r[0], r[1]))


@settings(max_examples=60, deadline=None)
@given(st.lists(rows, min_size=1, max_size=12), st.booleans())
def test_what_the_index_expects_is_the_core_s_rule(
        records: list[tuple[Kind, bytes | None, int, bytes | None, int]], hashed: bool) -> None:
    """What the reader expects an unchanged path to show is ``mesh.core.reconcile``'s
    ``expected`` of the disk version and the stat cache's record (the cache left out
    without ``hashed``), whatever the kind, hash and record."""
    index = Index(":memory:")
    paths = [f"p{i:02}" for i in range(len(records))]
    index.upsert_versions([Version.of(entry(p, kind, digest, mode))
                           for p, (kind, digest, mode, _, _) in zip(paths, records, strict=True)])
    ident = (3, 7, 9)
    index.db.executemany("INSERT INTO stat_cache VALUES (?, ?, ?, ?, ?, ?)", [
        (p, *ident, to_sql_ino(ino), cached)
        for p, (_, _, _, cached, ino) in zip(paths, records, strict=True) if cached is not None])
    reference = {}
    for p, (kind, digest, mode, cached, ino) in zip(paths, records, strict=True):
        record = None if cached is None or not hashed else ((*ident, ino), cached)
        want = expected(Known(kind, digest, mode, record))
        if want is not None:
            reference[p] = want
    assert KnownPaths(index.db).expected(paths, hashed) == reference
