"""The index's digests (``mesh.core.digest``), kept by SQLite as rows are written.

Schema 5 keeps one row per (owner, bucket) in ``digests``: owner ``''`` for our disk
versions (``versions``), a peer's name for what it announced to us (``peer_vectors``).
Triggers on those two tables fold each row written or removed into its bucket, in
the statement's own transaction, so a digest is read (4,096 rows) and never hashed
from the whole index again: at a million paths that took 2.7 to 3 s a digest, and a
restart made four of them (each agent's own and its view of the other) while the
start-up walk wanted the same two cores (issue 16).

The functions the triggers call are registered on every connection that writes
(``mesh.store.db.connect``). A row's value is the bucket's XOR as SQLite's signed
64-bit integer; ``read`` gives it back unsigned, as ``Digest`` holds it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, cast

from mesh.core.digest import BUCKETS, Digest, bucket_of, packed_item_hash

DISK = ""  # the owner of our disk versions' digest (a peer's name is never empty)

_SPAN = 1 << 64
_TOP = 1 << 63


def _signed(value: int) -> int:
    return value - _SPAN if value >= _TOP else value


def item(path: str, vector: bytes) -> int:
    """One row's hash (``packed_item_hash``), as SQLite stores a 64-bit value."""
    return _signed(packed_item_hash(path, vector))


def fold(value: int, path: str, vector: bytes) -> int:
    """``value`` with one row's hash folded in or out (XOR: the same either way)."""
    return _signed((value % _SPAN) ^ packed_item_hash(path, vector))


class _Of:
    """The aggregate ``mesh_digest_of(path, vector)``: a bucket's value from its rows, for
    filling the table from rows written before schema 5."""

    def __init__(self) -> None:
        self.value = 0

    def step(self, path: str, vector: bytes) -> None:
        self.value ^= packed_item_hash(path, vector)

    def finalize(self) -> int:
        return _signed(self.value)


def register(db: sqlite3.Connection) -> None:
    """The functions schema 5's triggers and migration call, on ``db``."""
    db.create_function("mesh_bucket", 1, bucket_of, deterministic=True)
    db.create_function("mesh_digest_item", 2, item, deterministic=True)
    db.create_function("mesh_digest_fold", 3, fold, deterministic=True)
    # typeshed's aggregate protocol takes one argument to step; this one takes two
    db.create_aggregate("mesh_digest_of", 2, cast("Callable[[], Any]", _Of))


def read(db: sqlite3.Connection, owner: str = DISK) -> Digest:
    """The digest of ``owner``'s rows as ``db`` holds them (``DISK``: our disk versions)."""
    buckets, count = [0] * BUCKETS, 0
    for bucket, value, n in db.execute(
            "SELECT bucket, value, count FROM digests WHERE owner = ?", (owner,)):
        buckets[bucket] = value % _SPAN
        count += n
    return Digest(tuple(buckets), count)
