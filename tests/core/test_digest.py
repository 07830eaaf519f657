"""A digest (``Digest.of_packed``) is its definition: each item's hash in its path's bucket."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mesh.core.digest import BUCKETS, Digest, bucket_of, packed_item_hash


@given(st.lists(st.tuples(st.text(min_size=1, max_size=40), st.binary(max_size=30)),
                max_size=30))
def test_a_digest_is_each_item_s_hash_in_its_path_s_bucket(
        items: list[tuple[str, bytes]]) -> None:
    buckets = [0] * BUCKETS
    for path, packed in items:
        buckets[bucket_of(path)] ^= packed_item_hash(path, packed)
    assert Digest.of_packed(items) == Digest(tuple(buckets), len(items))
