"""The index read in bulk for catch-up and incoming pushes (issue 16, ``mesh.store.bulk``):
the same answers as the per-path reads it replaces, in pages."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.core import wire
from mesh.core.delivery import Outbox
from mesh.core.digest import Digest, bucket_of
from mesh.core.effects import PathState
from mesh.core.manifest import Entry, Kind
from mesh.core.replica import Replica
from mesh.core.resolver import Conflict, Version, resolve
from mesh.core.vclock import VersionVector
from mesh.engine import answers
from mesh.store import bulk
from mesh.store.db import IN_CHUNK
from mesh.store.index import Index

PEER = "n2"
vectors = st.dictionaries(st.sampled_from(["n1", "n2", "n3"]), st.integers(1, 3),
                          min_size=1, max_size=3)
# Per path: our disk version (vector, content or a delete; None: none), a target or
# not, and what the peer announced (None: nothing).
path_states = st.tuples(st.none() | st.tuples(vectors, st.booleans()), st.booleans(),
                        st.none() | vectors)


def entry(path: str, vector: dict[str, int], content: bool, writer: str = "n1") -> Entry:
    return Entry(path, VersionVector.of(vector),
                 bytes([len(path)]) * 32 if content else None, 1, 0, 0o644, Kind.FILE, 1,
                 writer)


def fill(index: Index, states: list[tuple[tuple[dict[str, int], bool] | None, bool,
                                          dict[str, int] | None]]) -> list[str]:
    paths = [f"d/{i:04d}" for i in range(len(states))]
    with index.batch():
        for path, (disk, target, seen) in zip(paths, states, strict=True):
            ours = None if disk is None else Version.of(entry(path, *disk))
            wanted = Version.of(entry(path, {"n3": 9}, True, "n3")) if target else None
            index.set_state(path, PathState(ours, wanted))
            if seen is not None:
                index.set_peer_vector(PEER, path, VersionVector.of(seen))
    return paths


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(path_states, max_size=40), st.integers(1, 7))
def test_a_sweep_finds_what_the_gate_lets_through_page_by_page(
        states: list[tuple[tuple[dict[str, int], bool] | None,
                                                     bool, dict[str, int] | None]],
        limit: int) -> None:
    index = Index(":memory:")
    paths = fill(index, states)
    replica = Replica("n1", index)
    found: list[str] = []
    after: str | None = ""
    pages = 0
    while after is not None:
        page, after = bulk.behind(index, PEER, after, limit)
        found += page
        pages += 1
        assert pages <= len(paths) // limit + 1, "a sweep that never ends"
    assert found == [p for p in paths if replica.may_push(PEER, p)]


def test_peer_vectors_in_bulk_are_what_was_announced(tmp_path: Path) -> None:
    index = Index(tmp_path / "s.db")
    paths = [f"p{i}" for i in range(IN_CHUNK + 5)]  # more than one query's worth
    with index.batch():
        for i, p in enumerate(paths[::3]):
            index.set_peer_vector(PEER, p, VersionVector.of({"n2": i + 1}))
        index.set_peer_vector("n3", paths[1], VersionVector.of({"n3": 1}))
        # Written in this batch and not yet flushed: the bulk read sees them.
        got = bulk.peer_vectors(index, PEER, [*paths, "never"])
    assert got == {p: index.peer_vector(PEER, p) for p in paths[::3]}
    index.close()


def test_a_catch_up_fetches_its_buckets_in_pages_and_replies_in_chunks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What a peer's catch-up fetches (``answers``, EntriesRequest): the versions of the
    wanted buckets, read a page at a time, sent in replies of ENTRIES_PER_REPLY, the
    last one done."""
    index = Index(":memory:")
    paths = fill(index, [(({"n1": 1}, i % 4 != 0), False, None) for i in range(50)])
    wanted = {bucket_of(p) for p in paths[::2]}
    expected = [v for v in index.versions() if bucket_of(v.path) in wanted]
    assert list(bulk.versions_in_buckets(index, wanted, page=3)) == expected
    monkeypatch.setattr(answers, "ENTRIES_PER_REPLY", 4)
    replies = [wire.decode(b) for b in answers.answer(
        "n2", wire.EntriesRequest(7, tuple(sorted(wanted))), index, Outbox("n1", 1), 1)]
    assert all(isinstance(r, wire.EntriesReply) and r.rid == 7 for r in replies)
    assert [r.done for r in replies] == [False] * (len(replies) - 1) + [True]
    assert [e for r in replies for e in r.entries] == [  # type: ignore[union-attr]
        h for v in expected for h in v.heads]
    nothing = list(answers.answer("n2", wire.EntriesRequest(8, ()), index, Outbox("n1", 1), 1))
    assert [wire.decode(b) for b in nothing] == [wire.EntriesReply(8, (), True)]


@settings(max_examples=50, deadline=None)
@given(st.sets(st.integers(0, 63)), st.integers(1, 5))
def test_the_versions_of_any_buckets_are_those_and_only_those(wanted: set[int], page: int
                                                               ) -> None:
    """Any buckets, over pages of any size."""
    index = Index(":memory:")
    fill(index, [(({"n1": 1}, True), False, None) for _ in range(40)])
    buckets = {v.path: bucket_of(v.path) % 64 for v in index.versions()}
    index.db.execute("UPDATE versions SET bucket = bucket % 64")  # 40 paths in 64 buckets
    got = [v.path for v in bulk.versions_in_buckets(index, wanted, page=page)]
    assert got == sorted(p for p, b in buckets.items() if b in wanted)


def test_conflicts_on_many_paths_in_one_query(tmp_path: Path) -> None:
    index = Index(tmp_path / "s.db")
    logged = []
    for path in ("a", "b", "b", "c"):
        n = len(logged) + 1
        theirs = Entry(path, VersionVector.of({"n3": n}), bytes([100 + n]) * 32, 1, 0, 0o644,
                       Kind.FILE, 2, "n3")
        c = resolve(entry(path, {"n1": n}, True), theirs)
        assert isinstance(c, Conflict)
        assert index.log_conflict(c)
        logged.append(c)
    statements: list[str] = []
    index.db.set_trace_callback(statements.append)
    got = index.conflicts_on(["b", "a", "zz", "b"])
    index.db.set_trace_callback(None)
    assert [r.conflict for r in got] == [logged[0], logged[1], logged[2]]
    assert len(statements) == 1
    index.close()


def test_a_digest_in_a_thread_is_the_index_digest(tmp_path: Path) -> None:
    """What a digest request is answered with, and what a resync compares it to, read
    through a connection of their own (to run off the event loop)."""
    index = Index(tmp_path / "s.db")
    fill(index, [(({"n1": i + 1}, i % 3 != 0), False, {"n1": i} if i else None)
                 for i in range(30)])
    assert index.path is not None
    assert bulk.digest_in_thread(index.path) == Digest.of(index.disk_items())
    assert bulk.digest_in_thread(index.path, PEER) == Digest.of(index.peer_items(PEER))
    assert bulk.digest_in_thread(index.path, "n9") == Digest.of(())
    index.close()


async def _two_digests_at_once(index: Index) -> int:
    """How many digests ran at once when two were asked for together."""
    inside, most, lock = 0, 0, threading.Lock()
    two_inside = threading.Event()

    def recording(db: Path, peer: str | None = None) -> Digest:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
            if inside == 2:
                two_inside.set()
        two_inside.wait(1.0)  # holds on a while for a second one to come in beside it
        with lock:
            inside -= 1
        return Digest.of([])

    real = bulk.digest_in_thread
    bulk.digest_in_thread = recording  # type: ignore[assignment]
    try:
        tasks = [asyncio.ensure_future(bulk.digest(index)),
                 asyncio.ensure_future(bulk.digest(index, PEER))]
        await asyncio.gather(*tasks)
    finally:
        bulk.digest_in_thread = real  # type: ignore[assignment]
    return most


def test_digests_run_one_at_a_time(tmp_path: Path) -> None:
    """A peer's digest request and our own catch-up's digest at once (a restart) are
    hashed one after the other, not fighting for the interpreter."""
    assert asyncio.run(_two_digests_at_once(Index(tmp_path / "s.db"))) == 1
