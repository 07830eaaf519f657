"""What the start-up walk reads of the index (``mesh.store.known``, issue 16): the same
records whichever way a chunk is read, by one range or by name."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.adapters.fs.scanner import tree
from mesh.core.resolver import Version
from mesh.store import known as known_mod
from mesh.store.index import Index
from mesh.store.known import KnownPaths
from tests.store.test_index import e

# Names that sort between a folder and what it holds ("a.b" lies between "a" and "a/x")
NAMES = ["a", "a.b", "a-c", "a0", "b", "a b"]


def _indexed(index: Index, paths: list[str]) -> None:
    index.upsert_versions([Version.of(e({"n1": 1}, "n1", i % 200, path=p))
                           for i, p in enumerate(paths)])
    index.db.executemany("INSERT INTO stat_cache VALUES (?, 1, 2, 3, ?, x'00')",
                         [(p, i) for i, p in enumerate(paths)])


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
            found = reader.known(part)
            assert set(found) <= set(part)
            got.update(found)
    finally:
        known_mod.RANGE_AT_MOST = old
    assert sorted(got) == sorted(walked[::2])
    assert {p: k.cached[0][3] for p, k in got.items() if k.cached} == {  # the inode column
        p: i for i, p in enumerate(walked[::2])}
