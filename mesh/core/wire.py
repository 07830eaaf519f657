"""Control messages of wire protocol version 1 (everything but the manifest).

Each is one msgpack map with a type tag ``"t"``; a manifest has no tag (see
``mesh.core.manifest``). ``decode`` is as strict as the manifest decoder: any
malformed input raises ``RemoteProtocolError`` and nothing else.

    head      origin → all, QoS 0, every second: epoch and last manifest seq
    hello     origin → all, retained: epoch, software version, tunnel port
    replay    peer → origin: resend manifests of ``epoch`` from ``from``
    gone      origin → peer: the replay log no longer reaches back; resync
    digest?   peer → origin: send your digest      digest  origin → peer
    entries?  peer → origin: entries of buckets    entries origin → peer (chunked)
    cids?     peer → origin: conflict ids          cids    origin → peer (chunked)
    confl?    peer → origin: conflict records      confl   origin → peer (chunked)
    tree?     peer → origin: per-folder sums       tree    origin → peer (chunked)
    ls?       peer → origin: entries of folders    entries origin → peer (chunked)

``tree?`` and ``ls?`` serve ``mesh verify`` (issue 5, see ``mesh.core.tree``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import msgpack

from mesh.core import manifest
from mesh.core.digest import BUCKETS, Digest
from mesh.core.manifest import Entry, Manifest
from mesh.core.paths import is_normalized, reserved
from mesh.core.vclock import NODE_ID_RE
from mesh.errors import LocalProtocolError, RemoteProtocolError

MAX_IDS = 16384
_U64 = 2**64 - 1
_I64 = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Head:
    origin: str
    epoch: int
    seq: int
    at_ms: int


@dataclass(frozen=True, slots=True)
class Hello:
    origin: str
    epoch: int
    version: str
    tunnel_port: int
    at_ms: int


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    rid: int
    epoch: int
    from_seq: int


@dataclass(frozen=True, slots=True)
class ReplayGone:
    rid: int
    epoch: int


@dataclass(frozen=True, slots=True)
class DigestRequest:
    rid: int


@dataclass(frozen=True, slots=True)
class DigestReply:
    rid: int
    epoch: int
    seq: int
    digest: Digest
    conflicts: int  # 64-bit XOR of the conflict ids' hashes
    conflict_count: int


@dataclass(frozen=True, slots=True)
class EntriesRequest:
    rid: int
    buckets: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class EntriesReply:
    rid: int
    entries: tuple[Entry, ...]
    done: bool


@dataclass(frozen=True, slots=True)
class ConflictIdsRequest:
    rid: int


@dataclass(frozen=True, slots=True)
class ConflictIdsReply:
    rid: int
    ids: tuple[str, ...]
    done: bool


@dataclass(frozen=True, slots=True)
class ConflictsRequest:
    rid: int
    ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ConflictsReply:
    rid: int
    pairs: tuple[tuple[Entry, Entry], ...]
    done: bool


# --- mesh verify (issue 5): per-folder tree sums, then the entries of some folders ---------

MAX_FOLDERS = 16384


@dataclass(frozen=True, slots=True)
class TreeRequest:
    rid: int


@dataclass(frozen=True, slots=True)
class TreeReply:
    rid: int
    folders: tuple[tuple[str, int, int], ...]  # (folder, XOR of item hashes, count)
    done: bool


@dataclass(frozen=True, slots=True)
class ListingRequest:
    """Answered with ``EntriesReply``: the live entries directly in these folders."""

    rid: int
    under: tuple[str, ...]


Message = (
    Head | Hello | ReplayRequest | ReplayGone | DigestRequest | DigestReply | EntriesRequest
    | EntriesReply | ConflictIdsRequest | ConflictIdsReply | ConflictsRequest | ConflictsReply
    | TreeRequest | TreeReply | ListingRequest
)

_TAGS: dict[type, str] = {
    Head: "head", Hello: "hello", ReplayRequest: "replay", ReplayGone: "gone",
    DigestRequest: "digest?", DigestReply: "digest", EntriesRequest: "entries?",
    EntriesReply: "entries", ConflictIdsRequest: "cids?", ConflictIdsReply: "cids",
    ConflictsRequest: "confl?", ConflictsReply: "confl",
    TreeRequest: "tree?", TreeReply: "tree", ListingRequest: "ls?",
}
_TYPES = {tag: cls for cls, tag in _TAGS.items()}


# --- encoding -----------------------------------------------------------------------


def _to_wire(value: Any) -> Any:
    if isinstance(value, Digest):
        return [list(value.buckets), value.count]
    if isinstance(value, Entry):
        return manifest.entry_to_wire(value)
    if isinstance(value, tuple):
        return [_to_wire(v) for v in value]
    return value


def encode(message: Message) -> bytes:
    doc = {"t": _TAGS[type(message)]}
    for f in fields(message):
        doc[f.name] = _to_wire(getattr(message, f.name))
    data: bytes = msgpack.packb(doc, use_bin_type=True)
    if len(data) > manifest.MAX_MESSAGE_BYTES:
        raise LocalProtocolError(f"{doc['t']} message is {len(data)} bytes; chunk smaller")
    return data


# --- decoding -----------------------------------------------------------------------


def _uint(limit: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if type(v) is not int or not 0 <= v <= limit:
            raise RemoteProtocolError(f"bad integer {str(v)[:40]!r}")
        return v
    return check


def _node(v: Any) -> str:
    if not isinstance(v, str) or NODE_ID_RE.fullmatch(v) is None:
        raise RemoteProtocolError(f"bad node id {str(v)[:80]!r}")
    return v


def _text(v: Any) -> str:
    if not isinstance(v, str) or len(v) > 64:
        raise RemoteProtocolError("bad text field")
    return v


def _flag(v: Any) -> bool:
    if type(v) is not bool:
        raise RemoteProtocolError("bad flag")
    return v


def _list(v: Any, limit: int) -> list[Any]:
    if not isinstance(v, list) or len(v) > limit:
        raise RemoteProtocolError("bad or oversized list")
    return v


def _digest(v: Any) -> Digest:
    raw = _list(v, 2)
    if len(raw) != 2:
        raise RemoteProtocolError("bad digest")
    buckets = _list(raw[0], BUCKETS)
    if len(buckets) != BUCKETS:
        raise RemoteProtocolError("digest has the wrong number of buckets")
    return Digest(tuple(_uint(_U64)(b) for b in buckets), _uint(_I64)(raw[1]))


def _buckets(v: Any) -> tuple[int, ...]:
    return tuple(_uint(BUCKETS - 1)(b) for b in _list(v, BUCKETS))


def _ids(v: Any) -> tuple[str, ...]:
    out = []
    for i in _list(v, MAX_IDS):
        if not isinstance(i, str) or len(i) != 24 or not all(c in "0123456789abcdef" for c in i):
            raise RemoteProtocolError("bad conflict id")
        out.append(i)
    return tuple(out)


def _folder(v: Any) -> str:
    if not isinstance(v, str) or (v and not is_normalized(v)):
        raise RemoteProtocolError("bad folder")
    if v and (why := reserved(v)) is not None:
        raise RemoteProtocolError(f"reserved folder {v[:80]!r}: {why}")
    return v


def _folders(v: Any) -> tuple[tuple[str, int, int], ...]:
    out = []
    for item in _list(v, MAX_FOLDERS):
        triple = _list(item, 3)
        if len(triple) != 3:
            raise RemoteProtocolError("folder sum is not a triple")
        out.append((_folder(triple[0]), _uint(_U64)(triple[1]), _uint(_I64)(triple[2])))
    return tuple(out)


def _under(v: Any) -> tuple[str, ...]:
    return tuple(_folder(f) for f in _list(v, MAX_FOLDERS))


def _entries(v: Any) -> tuple[Entry, ...]:
    return tuple(manifest.entry_from_peer(e) for e in _list(v, manifest.MAX_ENTRIES))


def _pairs(v: Any) -> tuple[tuple[Entry, Entry], ...]:
    out = []
    for pair in _list(v, manifest.MAX_CONFLICTS):
        p = _list(pair, 2)
        if len(p) != 2:
            raise RemoteProtocolError("conflict is not a pair")
        out.append((manifest.entry_from_peer(p[0]), manifest.entry_from_peer(p[1])))
    return tuple(out)


_FIELD_CHECKS: dict[str, Callable[[Any], Any]] = {
    "origin": _node, "epoch": _uint(_I64), "seq": _uint(_I64), "at_ms": _uint(_I64),
    "version": _text, "tunnel_port": _uint(65535), "rid": _uint(_I64),
    "from_seq": _uint(_I64), "digest": _digest, "conflicts": _uint(_U64),
    "conflict_count": _uint(_I64), "buckets": _buckets, "entries": _entries,
    "done": _flag, "ids": _ids, "pairs": _pairs, "folders": _folders, "under": _under,
}


def decode(data: bytes) -> Message | Manifest:
    """A control message, or a manifest (replayed manifests share topics with them)."""
    doc = manifest.unpack(data)
    if not isinstance(doc, dict):
        raise RemoteProtocolError("message is not a map")
    if "t" not in doc:
        return manifest.decode(data)
    cls = _TYPES.get(doc["t"]) if isinstance(doc["t"], str) else None
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {str(doc['t'])[:20]!r}")
    names = [f.name for f in fields(cls)]
    if doc.keys() != {"t", *names}:
        raise RemoteProtocolError(f"{doc['t']}: missing or unknown fields")
    message: Message = cls(*(_FIELD_CHECKS[n](doc[n]) for n in names))
    return message
