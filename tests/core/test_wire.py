"""Control messages and digests."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.core import wire
from mesh.core.digest import BUCKETS, Digest, bucket_of, in_requests
from mesh.core.manifest import Entry, Manifest
from mesh.core.vclock import VersionVector
from mesh.errors import LocalProtocolError, RemoteProtocolError
from tests.core.strategies import entries

D = Digest.of([("a", VersionVector.of({"n1": 1})), ("b/c", VersionVector.of({"n2": 3}))])
SAMPLES: list[wire.Message] = [
    wire.Head("n1", 3, 99, 1_700_000_000_000),
    wire.Hello("n1", 3, "0.1.0", 8873, 5),
    wire.ReplayRequest(1, 3, 40),
    wire.ReplayGone(1, 3),
    wire.DigestRequest(2),
    wire.DigestReply(2, 3, 99, D, 12345, 2),
    wire.EntriesRequest(4, (0, 17, BUCKETS - 1)),
    wire.ConflictIdsRequest(5),
    wire.ConflictIdsReply(5, ("0123456789abcdef01234567",), True),
    wire.ConflictsRequest(6, ("0123456789abcdef01234567",)),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: wire.Message) -> None:
    assert wire.decode(wire.encode(message)) == message


@given(st.lists(entries(), max_size=10), st.booleans())
def test_entries_round_trip(items: list[object], done: bool) -> None:
    msg = wire.EntriesReply(7, tuple(items), done)  # type: ignore[arg-type]
    assert wire.decode(wire.encode(msg)) == msg


@pytest.mark.parametrize("path", [".mesh-keep/objects/ab", ".mesh-keep", "d/.f.Ab12cd"])
def test_replies_naming_a_reserved_path_are_refused(path: str) -> None:
    entry = manifest_entry(path)
    for message in (wire.EntriesReply(7, (entry,), True),
                    wire.ConflictsReply(8, ((entry, entry),), True)):
        with pytest.raises(RemoteProtocolError, match="reserved path"):
            wire.decode(wire.encode(message))
    with pytest.raises(RemoteProtocolError, match="reserved folder"):
        wire.decode(wire.encode(wire.TreeReply(9, ((path, 1, 1),), True)))


def manifest_entry(path: str) -> Entry:
    return Entry(path, VersionVector.of({"n9": 1}), None, hlc=1, writer="n9")


def test_a_manifest_passes_through() -> None:
    from mesh.core import manifest

    m = Manifest("n2", 1, 5)
    assert wire.decode(manifest.encode(m)) == m


@pytest.mark.parametrize(
    "doc",
    [
        {"t": "nope"},
        {"t": 5},
        {"t": "head", "origin": "n1", "epoch": 1, "seq": 1},
        {"t": "head", "origin": "n1", "epoch": 1, "seq": -1, "at_ms": 0},
        {"t": "head", "origin": "../x", "epoch": 1, "seq": 1, "at_ms": 0},
        {"t": "entries?", "rid": 1, "buckets": [BUCKETS]},
        {"t": "cids", "rid": 1, "ids": ["zz"], "done": True},
        {"t": "cids", "rid": 1, "ids": [], "done": 1},
        {"t": "digest", "rid": 1, "epoch": 1, "seq": 1, "digest": [[0] * 3, 0],
         "conflicts": 0, "conflict_count": 0},
    ],
)
def test_refuses(doc: dict[str, object]) -> None:
    with pytest.raises(RemoteProtocolError):
        wire.decode(msgpack.packb(doc))


@settings(max_examples=500)
@given(st.binary(max_size=512))
def test_fuzz(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        wire.decode(data)


def test_digest_finds_the_buckets_that_differ() -> None:
    base = [(f"d{i}/f", VersionVector.of({"n1": i + 1})) for i in range(2000)]
    changed = dict(base)
    changed["d7/f"] = VersionVector.of({"n1": 99})
    changed["new"] = VersionVector.of({"n2": 1})
    a, b = Digest.of(base), Digest.of(changed.items())
    diff = a.differing(b)
    assert set(diff) == {bucket_of("d7/f"), bucket_of("new")}
    assert {p for p in changed if bucket_of(p) in set(diff)} >= {"d7/f", "new"}
    assert Digest.of(reversed(base)) == a  # order does not matter


@given(st.lists(st.integers(0, BUCKETS - 1), unique=True).map(sorted),
       st.integers(0, 10_000_000), st.integers(1, 100_000))
def test_a_catch_up_asks_for_its_buckets_in_groups_of_about_per_request(
        buckets: list[int], count: int, per_request: int) -> None:
    groups = in_requests(buckets, count, per_request)
    assert [b for g in groups for b in g] == buckets
    assert all(groups)
    # A group's expected entries (count / BUCKETS each) stay within per_request, unless
    # one bucket alone holds more.
    for group in groups:
        assert len(group) == 1 or len(group) * count <= per_request * BUCKETS


def test_an_empty_node_asks_for_a_million_entries_in_about_fifty_requests() -> None:
    groups = in_requests(list(range(BUCKETS)), 1_000_000, 20_000)
    assert len(groups) == 51 and len(groups[0]) == 81  # 81 buckets: 19,775 entries
    assert in_requests(list(range(BUCKETS)), 100, 20_000) == [list(range(BUCKETS))]
    with pytest.raises(LocalProtocolError):
        in_requests([1], 1, 0)
