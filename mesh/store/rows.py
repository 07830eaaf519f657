"""How the index's rows hold values: msgpack blobs of heads, vectors and path states."""

from __future__ import annotations

from typing import Any

import msgpack

from mesh.core.digest import bucket_of
from mesh.core.effects import PathState
from mesh.core.manifest import (
    Entry,
    entry_from_row,
    entry_from_wire,
    entry_to_wire,
    vector_from_wire,
)
from mesh.core.resolver import Version
from mesh.core.vclock import VersionVector

Row = Any


def pack(value: Any) -> bytearray:
    # A bytearray, not bytes: Python 3.11's sqlite3 binds str, int, float and bytearray
    # as they are, and asks its adapter registry about every other value, bytes too
    # (Modules/_sqlite/cursor.c, need_adapt): 0.3 us per blob, more than the copy.
    return bytearray(msgpack.packb(value, use_bin_type=True))


def pack_heads(v: Version) -> bytearray:
    return pack([entry_to_wire(h) for h in v.heads])


def unpack_heads(blob: bytes) -> Version:
    """A version the index stored (``entry_from_row``: not checked again)."""
    return Version(tuple([entry_from_row(raw) for raw in msgpack.unpackb(blob)]))


def checked_heads(blob: bytes) -> Version:
    """A version from a row that may predate a check (``mesh.store.purge``)."""
    return Version(tuple(entry_from_wire(raw) for raw in msgpack.unpackb(blob)))


NOTHING = PathState()  # a path neither held nor wanted: most of what a peer announces


def heads_of(blob: bytes) -> tuple[Entry, ...]:
    return checked_heads(blob).heads


def pair_of(winner: bytes, loser: bytes) -> tuple[Entry, Entry]:
    return entry_from_wire(msgpack.unpackb(winner)), entry_from_wire(msgpack.unpackb(loser))


def state_of(disk: bytes | None, target: bytes | None) -> PathState:
    if disk is None and target is None:
        return NOTHING
    return PathState(None if disk is None else unpack_heads(disk),
                     None if target is None else unpack_heads(target))


def unpack_vector(blob: bytes) -> VersionVector:
    return vector_from_wire(msgpack.unpackb(blob))  # through its cache of vectors


# A disk version's row: ``version_row``'s columns, in the table's order. Upserts, not
# REPLACE: a row updated in place fires one trigger of the digests (schema 5), not a
# delete and an insert.
PUT_VERSION = ("INSERT INTO versions VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (path) DO UPDATE "
               "SET heads = excluded.heads, vector = excluded.vector, hash = excluded.hash, "
               "size = excluded.size, mode = excluded.mode, kind = excluded.kind, "
               "bucket = excluded.bucket")
# What a peer announced of a path: (peer, path, packed vector).
PUT_PEER_VECTOR = ("INSERT INTO peer_vectors VALUES (?, ?, ?) ON CONFLICT (peer, path) "
                   "DO UPDATE SET vector = excluded.vector")


def version_row(v: Version) -> tuple[Any, ...]:
    w = v.winner
    digest = None if w.hash is None else bytearray(w.hash)
    return (v.path, pack_heads(v), pack(v.vector.to_dict()), digest, w.size, w.mode,
            int(w.kind), bucket_of(v.path))
