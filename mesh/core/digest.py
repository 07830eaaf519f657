"""Index digests: find which paths two nodes disagree on without sending them all.

A digest splits paths into ``BUCKETS`` buckets by a hash of the path. A bucket's
value is the XOR of one 64-bit hash per path over (path, merged vector), so it
does not depend on order and can be updated incrementally. Two nodes compare
4,096 numbers (32 KiB) and then exchange only the entries of buckets that
differ: a node that missed 10,000 changes receives about 10,000 entries, not
the whole index (issue 3: catch-up without a full rescan of anyone).

The origin digests its disk versions; a receiver digests what that origin last
announced to it (its peer view). They match exactly when the receiver heard the
origin's latest announcement for every path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import msgpack

from mesh.core.vclock import VersionVector
from mesh.errors import LocalProtocolError

BUCKET_BITS = 12
BUCKETS = 1 << BUCKET_BITS


def bucket_of(path: str) -> int:
    digest = hashlib.blake2b(path.encode(), digest_size=2).digest()
    return int.from_bytes(digest, "big") >> (16 - BUCKET_BITS)


def vector_bytes(vector: VersionVector) -> bytes:
    """The vector as msgpack of its sorted map: what an item hashes, and byte for byte
    what the index stores (``mesh.store.rows.pack``), so that the index's triggers hash
    a row's vector as stored (``mesh.store.digests``), none decoded."""
    packed: bytes = msgpack.packb(vector.to_dict(), use_bin_type=True)
    return packed


def packed_item_hash(path: str, packed: bytes) -> int:
    material = path.encode() + b"\x00" + packed
    return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big")


def in_requests(buckets: list[int], count: int, per_request: int) -> list[list[int]]:
    """``buckets`` in groups of about ``per_request`` entries each, for a digest of
    ``count`` paths (spread evenly over the buckets by their hash). A catch-up asks for
    one group at a time: an empty node asking for all 4,096 buckets at once had the
    peer publish its whole index at once, a million entries queued in its broker."""
    if per_request < 1:
        raise LocalProtocolError("per_request must be >= 1")
    step = max(1, BUCKETS * per_request // max(count, 1))
    return [buckets[i:i + step] for i in range(0, len(buckets), step)]


@dataclass(frozen=True, slots=True)
class Digest:
    buckets: tuple[int, ...]
    count: int

    def __post_init__(self) -> None:
        if len(self.buckets) != BUCKETS:
            raise LocalProtocolError(f"a digest has {BUCKETS} buckets")

    @classmethod
    def of(cls, items: Iterable[tuple[str, VersionVector]]) -> Digest:
        return cls.of_packed((path, vector_bytes(vector)) for path, vector in items)

    @classmethod
    def of_packed(cls, items: Iterable[tuple[str, bytes]]) -> Digest:
        """``of`` for vectors as ``vector_bytes`` packs them: the definition the digests
        the index keeps (``mesh.store.digests``) are held to."""
        buckets = [0] * BUCKETS
        count = 0
        for path, packed in items:
            buckets[bucket_of(path)] ^= packed_item_hash(path, packed)
            count += 1
        return cls(tuple(buckets), count)

    def differing(self, other: Digest) -> list[int]:
        """Bucket numbers whose contents differ."""
        return [i for i, (a, b) in enumerate(zip(self.buckets, other.buckets, strict=True))
                if a != b]
