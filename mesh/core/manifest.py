"""Manifest entries and the strict msgpack codec (wire protocol version 1).

A manifest is one msgpack map::

    {"v": 1, "o": origin, "e": epoch, "s": seq, "n": [entry...], "c": [[winner, loser]...]}

and an entry is an array, which is smaller and faster to decode than a map::

    [path, {node: counter}, hash | nil, size, mtime_ns, mode, kind, hlc, writer]

A path may appear more than once: one entry per head (concurrent write) of
its version, see ``mesh.core.resolver.Version``.

``hash`` is nil for a delete (a tombstone), 32 bytes for a file or a
symlink (the hash of its target), empty for a directory. Conflict records
carry the two concurrent versions only; receivers re-derive the rest
(id, rule, copy name) with the resolver, so a peer cannot assert a verdict.

Decoding is strict (DESIGN.md, wire protocol): anything malformed raises
``RemoteProtocolError`` naming the reason, never another exception and never
a partial result. What a peer sends may not name a path the agent keeps for
itself (``mesh.core.paths.reserved``: the keep area, the state dir, temp names;
issue 13); the index is not held to that. The index's own rows, written from
entries that passed every check, are read back with ``entry_from_row``, which
does not check them again (only a vector not seen yet); ``mesh.store.purge``,
which judges rows a newer release may refuse, reads them with ``entry_from_wire``.
"""

from __future__ import annotations

import enum
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import msgpack

from mesh.core.paths import MAX_NAME_BYTES, MAX_PATH_BYTES, is_normalized, reserved
from mesh.core.vclock import MAX_COUNTER, MAX_HLC, NODE_ID_RE, VersionVector
from mesh.errors import LocalProtocolError, RemoteProtocolError

SCHEMA_VERSION = 1
HASH_BYTES = 32
MAX_MESSAGE_BYTES = 1 << 20
MAX_ENTRIES = 8192
MAX_CONFLICTS = 1024
MAX_VECTOR_NODES = 256
MAX_HEADS = 64  # concurrent heads of one path in one manifest
MAX_INT64 = 2**63 - 1
MAX_MODE = 0o7777


class Kind(enum.IntEnum):
    FILE = 0
    DIR = 1
    SYMLINK = 2


ContentKey = tuple[Kind, bytes, int]
"""What makes two versions "the same content": kind, hash and permission bits."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One version of one path, as announced on the wire and kept in the index."""

    path: str
    vector: VersionVector
    hash: bytes | None
    size: int = 0
    mtime_ns: int = 0
    mode: int = 0
    kind: Kind = Kind.FILE
    hlc: int = 0
    writer: str = field(default="")

    def __post_init__(self) -> None:
        # Every entry of every manifest passes here (and through entry_from_wire):
        # checks written out, and the cheap one first, see _path_ok and _node_ok.
        if self.path is not _checked.path and not _path_ok(self.path):
            raise LocalProtocolError(f"path not normalized: {self.path[:80]!r}")
        if not isinstance(self.vector, VersionVector) or not self.vector:
            raise LocalProtocolError(f"{self.path}: empty or invalid vector")
        if self.hash is not None:
            expected = 0 if self.kind is Kind.DIR else HASH_BYTES
            if not isinstance(self.hash, bytes) or len(self.hash) != expected:
                raise LocalProtocolError(f"{self.path}: bad hash for {self.kind.name}")
        size, mode, hlc = self.size, self.mode, self.hlc
        if type(size) is not int or not 0 <= size <= MAX_INT64:
            raise LocalProtocolError(f"{self.path}: bad size {size!r}")
        if type(mode) is not int or not 0 <= mode <= MAX_MODE:
            raise LocalProtocolError(f"{self.path}: bad mode {mode!r}")
        if type(hlc) is not int or not 0 <= hlc <= MAX_HLC:
            raise LocalProtocolError(f"{self.path}: bad hlc {hlc!r}")
        if type(self.mtime_ns) is not int or abs(self.mtime_ns) > MAX_INT64:
            raise LocalProtocolError(f"{self.path}: bad mtime {self.mtime_ns!r}")
        writer = self.writer
        if (writer.__class__ is not str or writer not in _NODE_IDS) and not _node_ok(writer):
            raise LocalProtocolError(f"{self.path}: bad writer {writer!r}")

    @property
    def deleted(self) -> bool:
        return self.hash is None

    @property
    def content(self) -> ContentKey | None:
        """Identity of the content, or None for a delete."""
        if self.hash is None:
            return None
        mode = 0 if self.kind is Kind.SYMLINK else self.mode
        return (self.kind, self.hash, mode)

    def with_vector(self, vector: VersionVector) -> Entry:
        return Entry(
            self.path, vector, self.hash, self.size, self.mtime_ns,
            self.mode, self.kind, self.hlc, self.writer,
        )


@dataclass(frozen=True, slots=True)
class Manifest:
    origin: str
    epoch: int
    seq: int
    entries: tuple[Entry, ...] = ()
    conflicts: tuple[tuple[Entry, Entry], ...] = ()


def entry_to_wire(e: Entry) -> list[Any]:
    return [e.path, e.vector.to_dict(), e.hash, e.size, e.mtime_ns, e.mode,
            int(e.kind), e.hlc, e.writer]


def encode(m: Manifest) -> bytes:
    """Serialize a manifest; raises ``LocalProtocolError`` if it is too big."""
    if len(m.entries) > MAX_ENTRIES or len(m.conflicts) > MAX_CONFLICTS:
        raise LocalProtocolError("manifest has too many entries; batch smaller")
    doc = {
        "v": SCHEMA_VERSION,
        "o": m.origin,
        "e": m.epoch,
        "s": m.seq,
        "n": [entry_to_wire(e) for e in m.entries],
        "c": [[entry_to_wire(w), entry_to_wire(lo)] for w, lo in m.conflicts],
    }
    data: bytes = msgpack.packb(doc, use_bin_type=True)
    if len(data) > MAX_MESSAGE_BYTES:
        raise LocalProtocolError(f"manifest is {len(data)} bytes; batch smaller")
    return data


def decode_push(header: bytes, peer: str, push_id: str) -> Manifest:
    """A push header from ``peer``: a manifest whose origin is ``peer``, or
    ``RemoteProtocolError`` naming the push."""
    try:
        m = decode(header)
    except RemoteProtocolError as err:
        raise RemoteProtocolError(f"push {push_id}: {err.reason}", peer=peer) from None
    if m.origin != peer:
        raise RemoteProtocolError(f"push {push_id} announced by {m.origin}", peer=peer)
    return m


def decode(data: bytes) -> Manifest:
    """Parse and validate one manifest, or raise ``RemoteProtocolError``."""
    doc = unpack(data)
    if not isinstance(doc, dict):
        raise RemoteProtocolError("manifest is not a map")
    if doc.keys() != {"v", "o", "e", "s", "n", "c"}:
        if doc.get("v") != SCHEMA_VERSION:
            raise RemoteProtocolError(f"unknown schema version {doc.get('v')!r}")
        raise RemoteProtocolError("manifest has missing or unknown fields")
    if doc["v"] != SCHEMA_VERSION or type(doc["v"]) is not int:
        raise RemoteProtocolError(f"unknown schema version {doc['v']!r}")
    origin = _node(doc["o"], "origin")
    epoch = _uint(doc["e"], "epoch")
    seq = _uint(doc["s"], "seq")
    raw_entries = _list(doc["n"], "entries", MAX_ENTRIES)
    raw_conflicts = _list(doc["c"], "conflicts", MAX_CONFLICTS)
    entries = tuple([entry_from_peer(x) for x in raw_entries])
    if len(entries) > MAX_HEADS and len({e.path for e in entries}) < len(entries):
        heads = Counter(e.path for e in entries)
        if max(heads.values()) > MAX_HEADS:
            raise RemoteProtocolError(f"a path lists more than {MAX_HEADS} heads")
    conflicts = tuple(_conflict(x) for x in raw_conflicts)
    return Manifest(origin, epoch, seq, entries, conflicts)


def envelope(data: bytes) -> tuple[str, int, int] | None:
    """``(origin, epoch, seq)`` of a manifest that ``decode`` refuses, when those three
    are sound: the receiver counts the manifest as delivered, empty, so that one refused
    manifest does not stall the origin's stream behind it (issue 13). None otherwise."""
    try:
        doc = unpack(data)
    except RemoteProtocolError:
        return None
    if not isinstance(doc, dict) or "t" in doc or doc.get("v") != SCHEMA_VERSION:
        return None
    origin, epoch, seq = doc.get("o"), doc.get("e"), doc.get("s")
    if not _node_ok(origin) or type(epoch) is not int or type(seq) is not int:
        return None
    if not (0 <= epoch <= MAX_INT64 and 0 < seq <= MAX_INT64):
        return None
    return str(origin), epoch, seq


def unpack(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    """msgpack with every size limit on; library errors become ours."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RemoteProtocolError("payload is not bytes")
    if len(data) > max_bytes:
        raise RemoteProtocolError(f"payload of {len(data)} bytes exceeds {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=MAX_ENTRIES,
            max_map_len=MAX_VECTOR_NODES,
            max_ext_len=0,
        )
    except Exception as err:
        # msgpack raises ValueError, ExtraData, FormatError, StackError,
        # UnicodeDecodeError, TypeError...: one boundary, one error type.
        raise RemoteProtocolError(f"undecodable msgpack ({type(err).__name__})") from None


def entry_from_peer(raw: Any) -> Entry:
    """An entry a peer sent: ``entry_from_wire``, and not on a reserved path."""
    entry = entry_from_wire(raw)
    path = entry.path
    if path[0] == "." or "/." in path:  # every reserved name starts with a dot
        why = reserved(path)
        if why is not None:
            raise RemoteProtocolError(f"reserved path {path[:80]!r}: {why}")
    return entry


def entry_from_wire(raw: Any) -> Entry:
    if not isinstance(raw, list) or len(raw) != 9:
        raise RemoteProtocolError("entry is not a 9-item array")
    path, vector, digest, size, mtime_ns, mode, kind, hlc, writer = raw
    if not _path_ok(path):
        raise RemoteProtocolError(f"bad path {str(path)[:80]!r}")
    _checked.path = path  # Entry need not check it again
    if digest is not None and not isinstance(digest, bytes):
        raise RemoteProtocolError(f"{path}: hash is not bytes")
    if type(kind) is not int or kind not in _KINDS:
        raise RemoteProtocolError(f"{path}: unknown kind {kind!r}")
    try:
        return Entry(
            path, vector_from_wire(vector), digest, size, mtime_ns, mode,
            _KINDS[kind], hlc, writer if isinstance(writer, str) else "",
        )
    except LocalProtocolError as err:
        raise RemoteProtocolError(str(err)) from None


def entry_from_row(raw: Any) -> Entry:
    """An entry the index stored: written by ``entry_to_wire`` from an entry that passed
    every check of ``entry_from_wire`` and ``Entry``, so unpacked without them again
    (3 us against 9 us; a join decodes each path's row four or five times). Its vector,
    looked up as stored (``to_dict`` keeps its items sorted), is checked when it is not
    among the vectors already checked."""
    path, vector, digest, size, mtime_ns, mode, kind, hlc, writer = raw
    checked = _VECTORS.get(tuple(vector.items()))
    entry = _new_entry(Entry)
    _set_path(entry, path)
    _set_vector(entry, vector_from_wire(vector) if checked is None else checked)
    _set_hash(entry, digest)
    _set_size(entry, size)
    _set_mtime(entry, mtime_ns)
    _set_mode(entry, mode)
    _set_kind(entry, _KINDS[kind])
    _set_hlc(entry, hlc)
    _set_writer(entry, writer)
    return entry


def vector_from_wire(raw: Any) -> VersionVector:
    if not isinstance(raw, dict) or not raw or len(raw) > MAX_VECTOR_NODES:
        raise RemoteProtocolError("vector is not a non-empty map of bounded size")
    for node, counter in raw.items():
        _node(node, "vector node")
        if type(counter) is not int or not 0 < counter <= MAX_COUNTER:
            raise RemoteProtocolError(f"bad counter {counter!r} for {node}")
    items = tuple(sorted(raw.items()))
    vector = _VECTORS.get(items)
    if vector is None:
        vector = VersionVector(items)
        _remember(_VECTORS, items, vector)
    return vector


def _conflict(raw: Any) -> tuple[Entry, Entry]:
    if not isinstance(raw, list) or len(raw) != 2:
        raise RemoteProtocolError("conflict is not a pair of entries")
    winner, loser = entry_from_peer(raw[0]), entry_from_peer(raw[1])
    if winner.path != loser.path:
        raise RemoteProtocolError("conflict pairs two different paths")
    return winner, loser


def _node(value: Any, what: str) -> str:
    if not _node_ok(value):
        raise RemoteProtocolError(f"bad {what} {str(value)[:80]!r}")
    return str(value)


# --- the checks every entry takes, made cheap ------------------------------------------
#
# A receiver validates every entry of every manifest, and the index decodes the
# stored heads of every path it reads: these checks were a third of its time.

# The shape of nearly every path: ASCII names that do not start with a dot, within
# NAME_MAX. Such a path is normalized (no empty, "." or ".." part, no NUL, no
# leading "/"); anything else takes the full check, is_normalized.
_PLAIN_PATH = re.compile(
    rf"[\w+,=@~-][\w.+,=@~ -]{{0,{MAX_NAME_BYTES - 1}}}"
    rf"(?:/[\w+,=@~-][\w.+,=@~ -]{{0,{MAX_NAME_BYTES - 1}}})*",
    re.ASCII,
)
_CACHE_LIMIT = 4096  # so that a peer sending ever new values cannot grow a cache


class _Checked:
    """The path entry_from_wire checked last. A str is immutable: the same object is
    the same, checked, path (from any thread)."""

    path: object = None


_checked = _Checked()
_NODE_IDS: dict[str, None] = {}  # ids that passed NODE_ID_RE: a cluster has a few
_VECTORS: dict[tuple[tuple[str, int], ...], VersionVector] = {}  # validated vectors


def _path_ok(path: Any) -> bool:
    if isinstance(path, str) and len(path) <= MAX_PATH_BYTES and _PLAIN_PATH.fullmatch(path):
        return True
    return isinstance(path, str) and is_normalized(path)


def _node_ok(value: Any) -> bool:
    if value.__class__ is str and value in _NODE_IDS:
        return True
    if not isinstance(value, str) or NODE_ID_RE.fullmatch(value) is None:
        return False
    _remember(_NODE_IDS, value, None)
    return True


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value


def _uint(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_INT64:
        raise RemoteProtocolError(f"bad {what} {value!r}")
    return value


def _list(value: Any, what: str, limit: int) -> Sequence[Any]:
    if not isinstance(value, list):
        raise RemoteProtocolError(f"{what} is not an array")
    if len(value) > limit:
        raise RemoteProtocolError(f"{what}: {len(value)} items exceed {limit}")
    return value


_KINDS = {int(k): k for k in Kind}
# entry_from_row fills an Entry's slots as __init__ would, without its checks.
_new_entry = object.__new__
(_set_path, _set_vector, _set_hash, _set_size, _set_mtime, _set_mode, _set_kind, _set_hlc,
 _set_writer) = (getattr(Entry, f.name).__set__ for f in fields(Entry))
