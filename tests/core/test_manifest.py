"""The manifest codec: round trips, and a decoder that only ever raises
RemoteProtocolError on hostile input (random bytes, mutations, wrong types)."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.core import manifest
from mesh.core.manifest import MAX_MESSAGE_BYTES, Entry, Kind, Manifest
from mesh.core.vclock import VersionVector
from mesh.errors import LocalProtocolError, RemoteProtocolError
from tests.core.strategies import entries

manifests = st.builds(
    Manifest,
    origin=st.sampled_from(["n1", "node-2", "a.b_c"]),
    epoch=st.integers(0, 2**40),
    seq=st.integers(0, 2**62),
    entries=st.lists(entries(), max_size=20).map(tuple),
    conflicts=st.just(()),
)


@given(manifests)
def test_round_trip(m: Manifest) -> None:
    assert manifest.decode(manifest.encode(m)) == m


def _valid() -> bytes:
    e = Entry("dir/f.txt", VersionVector.of({"n1": 2}), b"\x07" * 32, 10, 5, 0o644,
              Kind.FILE, 99, "n1")
    return manifest.encode(Manifest("n1", 1, 7, (e,)))


def _doc() -> dict[str, object]:
    doc: dict[str, object] = msgpack.unpackb(_valid())
    return doc


def _with(**changes: object) -> bytes:
    doc = _doc()
    doc.update(changes)
    return bytes(msgpack.packb(doc))


def _entry_with(index: int, value: object) -> bytes:
    doc = _doc()
    entry = list(doc["n"][0])  # type: ignore[index]
    entry[index] = value
    doc["n"] = [entry]
    return bytes(msgpack.packb(doc))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "undecodable"),
        (b"\xc1", "undecodable"),
        (_valid()[:-3], "undecodable"),
        (_valid() + b"\x00", "undecodable"),
        (msgpack.packb([1, 2]), "not a map"),
        (_with(v=2), "schema version"),
        (_with(v="1"), "schema version"),
        (_with(x=1), "unknown fields"),
        (_with(o="../n1"), "bad origin"),
        (_with(s=-1), "bad seq"),
        (_with(n={}), "not an array"),
        (_entry_with(0, "/etc/passwd"), "bad path"),
        (_entry_with(0, "a/../../b"), "bad path"),
        (_entry_with(0, "a\x00b"), "bad path"),
        (_entry_with(0, "x" * 5000), "bad path"),
        (_entry_with(0, ".mesh-keep"), "reserved path '.mesh-keep'"),
        (_entry_with(0, ".mesh-keep/objects/" + "ab" * 32), "reserved path"),
        (_entry_with(0, ".mesh-state/state.db"), "reserved path"),
        (_entry_with(0, "dir/.f.txt.Ab12cd"), "rsync temp name"),
        (_entry_with(1, {}), "vector"),
        (_entry_with(1, {"n1": 0}), "counter"),
        (_entry_with(1, {"n1": 2**64 - 1}), "counter"),
        (_entry_with(1, {f"n{i}": 1 for i in range(300)}), "undecodable"),
        (_entry_with(2, "abc"), "hash is not bytes"),
        (_entry_with(2, b"short"), "bad hash"),
        (_entry_with(3, -5), "bad size"),
        (_entry_with(5, 0o170000), "bad mode"),
        (_entry_with(6, 9), "unknown kind"),
        (_entry_with(7, 1.5), "bad hlc"),
        (_entry_with(8, 7), "bad writer"),
        (b"\x00" * (MAX_MESSAGE_BYTES + 1), "exceeds"),
    ],
)
def test_refuses_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as err:
        manifest.decode(payload)
    assert reason in err.value.reason


def test_a_conflict_on_a_reserved_path_is_refused() -> None:
    doc = _doc()
    e = list(doc["n"][0])  # type: ignore[index]
    w, lo = [".mesh-keep", *e[1:]], [".mesh-keep", *e[1:]]
    w[1], lo[1] = {"n1": 2}, {"n2": 1}
    doc["c"] = [[w, lo]]
    with pytest.raises(RemoteProtocolError, match="reserved path"):
        manifest.decode(bytes(msgpack.packb(doc)))


def test_the_index_reads_its_own_rows_without_the_reserved_check() -> None:
    raw = list(msgpack.unpackb(_valid())["n"][0])
    raw[0] = ".mesh-keep/x"
    assert manifest.entry_from_wire(raw).path == ".mesh-keep/x"
    with pytest.raises(RemoteProtocolError):
        manifest.entry_from_peer(raw)


@given(entries())
def test_a_stored_entry_reads_back_as_it_was_checked(entry: Entry) -> None:
    # The index's rows skip the checks (entry_from_row): what they give back must be
    # the entry that passed them, with the same vector object the checked path caches.
    raw = msgpack.unpackb(msgpack.packb(manifest.entry_to_wire(entry), use_bin_type=True))
    row = manifest.entry_from_row(raw)
    assert row == entry == manifest.entry_from_wire(raw)
    assert repr(row) == repr(entry) and hash(row) == hash(entry)
    assert row.vector is manifest.entry_from_wire(raw).vector


def test_a_stored_vector_not_seen_yet_is_checked() -> None:
    raw = list(msgpack.unpackb(_valid())["n"][0])
    raw[1] = {"n1": 0}  # never passed a check, so never cached
    with pytest.raises(RemoteProtocolError, match="bad counter"):
        manifest.entry_from_row(raw)


def test_the_envelope_of_a_refused_manifest() -> None:
    raw = list(msgpack.unpackb(_valid())["n"][0])
    raw[0] = ".mesh-keep"
    doc = _doc()
    doc["n"] = [raw]
    refused = bytes(msgpack.packb(doc))
    with pytest.raises(RemoteProtocolError):
        manifest.decode(refused)
    assert manifest.envelope(refused) == ("n1", 1, 7)
    for bad in (_with(o="../x"), _with(s=0), _with(v=2), b"\xc1", bytes(msgpack.packb([1]))):
        assert manifest.envelope(bad) is None


def test_too_many_heads_for_one_path() -> None:
    e = msgpack.unpackb(_valid())["n"][0]
    heads = []
    for i in range(manifest.MAX_HEADS + 1):
        h = list(e)
        h[1] = {f"w{i}": 1}
        heads.append(h)
    doc = _doc()
    doc["n"] = heads
    with pytest.raises(RemoteProtocolError, match="heads"):
        manifest.decode(bytes(msgpack.packb(doc)))


def test_encoder_refuses_what_the_decoder_would() -> None:
    e = msgpack.unpackb(_valid())["n"][0]
    big = tuple(
        manifest.entry_from_wire([f"f{i}", *e[1:]]) for i in range(manifest.MAX_ENTRIES + 1)
    )
    with pytest.raises(LocalProtocolError):
        manifest.encode(Manifest("n1", 1, 1, big))


@settings(max_examples=1000)
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        manifest.decode(data)


@settings(max_examples=1000)
@given(st.data())
def test_fuzz_mutated_valid_manifests(data: st.DataObject) -> None:
    raw = bytearray(_valid())
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[at] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[at:at + data.draw(st.integers(1, 8))]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    with contextlib.suppress(RemoteProtocolError):
        manifest.decode(bytes(raw))


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=10)
    | st.dictionaries(st.text(max_size=5), inner, max_size=10),
    max_leaves=40,
)


@settings(max_examples=1000)
@given(json_like, st.data())
def test_fuzz_wrong_types_in_every_field(value: object, data: st.DataObject) -> None:
    """Replace a random field (top level or entry) with a random msgpack value."""
    doc = _doc()
    if data.draw(st.booleans()):
        doc[data.draw(st.sampled_from(["v", "o", "e", "s", "n", "c"]))] = value
    else:
        entry = list(doc["n"][0])  # type: ignore[index]
        entry[data.draw(st.integers(0, 8))] = value
        doc["n"] = [entry]
    try:
        payload = msgpack.packb(doc)
    except (OverflowError, TypeError, ValueError):
        return  # not representable in msgpack at all
    with contextlib.suppress(RemoteProtocolError):
        manifest.decode(payload)


_path_text = st.text(st.sampled_from("ab.-_ /\x00é~+ 9"), max_size=12) | st.text(max_size=12)


@given(st.one_of(_path_text, st.builds(lambda n: "x" * n, st.integers(250, 4200)),
                 st.builds(lambda n: "d/" * n, st.integers(2040, 2060))))
def test_the_fast_path_check_agrees_with_is_normalized(path: str) -> None:
    from mesh.core.paths import is_normalized

    assert manifest._path_ok(path) == is_normalized(path)


def test_the_node_id_cache_stays_bounded() -> None:
    for i in range(manifest._CACHE_LIMIT + 10):
        assert manifest._node_ok(f"node-{i}")
    assert len(manifest._NODE_IDS) <= manifest._CACHE_LIMIT
    assert not manifest._node_ok("bad id") and not manifest._node_ok(["n1"])
    assert manifest._node_ok("n1") and manifest._node_ok("n1")
