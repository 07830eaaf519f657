"""What this node answers to its peers' requests (on its own broker, ``mesh.engine.exchange``
publishes the replies): replays from the outbox's log, index digests, the entries of the
buckets that differ, conflict records, and ``mesh verify``'s per-folder tree sums and
listings (``mesh.core.tree``). Long answers go in chunks, the last one marked done."""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from mesh.core import tree, wire
from mesh.core.delivery import Outbox
from mesh.core.manifest import MAX_CONFLICTS, Entry, Manifest
from mesh.store import bulk
from mesh.store.index import Index

LOG = logging.getLogger("mesh.engine.exchange")

ENTRIES_PER_REPLY = 4096
IDS_PER_REPLY = 16384
FOLDERS_PER_REPLY = 1024


def conflict_digest(ids: Iterable[str]) -> int:
    acc = 0
    for i in ids:
        acc ^= int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big")
    return acc


def tree_entries(index: Index) -> list[Entry]:
    """What this node holds: one resolved entry per live disk version."""
    return [v.resolved for v in index.versions() if v.content is not None]


def answer(peer: str, m: wire.Message | Manifest, index: Index, outbox: Outbox, epoch: int
           ) -> Iterable[bytes]:
    """The replies to request ``m`` from ``peer``, encoded, in order."""
    if isinstance(m, wire.ReplayRequest):
        log = outbox.replay(m.epoch, m.from_seq)
        if log is None:
            LOG.info("%s asked for a replay from seq %d of epoch %d: gone, resync",
                     peer, m.from_seq, m.epoch)
            return [wire.encode(wire.ReplayGone(m.rid, epoch))]
        return log
    if isinstance(m, wire.EntriesRequest):
        # Streamed from the index a page at a time, each reply encoded as it is sent
        # (issue 16: an empty node fetches every bucket; the whole tree's entries and
        # replies were built at once, with a query per path).
        heads = (h for v in bulk.versions_in_buckets(index, set(m.buckets))
                 for h in v.heads)
        return _chunks(heads, ENTRIES_PER_REPLY,
                       lambda part, done: wire.EntriesReply(m.rid, tuple(part), done))
    if isinstance(m, wire.ConflictIdsRequest):
        return _chunks(index.conflict_ids(), IDS_PER_REPLY,
                       lambda part, done: wire.ConflictIdsReply(m.rid, tuple(part), done))
    if isinstance(m, wire.ConflictsRequest):
        pairs = list(index.conflict_pairs(m.ids))
        return _chunks(pairs, MAX_CONFLICTS // 2,
                       lambda part, done: wire.ConflictsReply(m.rid, tuple(part), done))
    if isinstance(m, wire.TreeRequest | wire.ListingRequest):
        return _answer_verify(index, m)
    LOG.warning("refused %s from %s on its request topic", type(m).__name__, peer)
    return []

def _answer_verify(index: Index, m: wire.TreeRequest | wire.ListingRequest
                   ) -> Iterable[bytes]:
    if isinstance(m, wire.TreeRequest):
        sums = [(f, acc, n) for f, (acc, n) in sorted(tree.folder_sums(
            tree_entries(index)).items())]
        return _chunks(sums, FOLDERS_PER_REPLY,
                       lambda part, done: wire.TreeReply(m.rid, tuple(part), done))
    wanted = set(m.under)
    entries = [e for e in tree_entries(index) if tree.folder_of(e.path) in wanted]
    return _chunks(entries, ENTRIES_PER_REPLY,
                   lambda part, done: wire.EntriesReply(m.rid, tuple(part), done))


T = TypeVar("T")


def _chunks(items: Iterable[T], size: int,
            build: Callable[[list[T], bool], wire.Message]) -> Iterator[bytes]:
    """``items`` in replies of ``size``, the last one marked done, each encoded when the
    caller takes it."""
    it = iter(items)
    part = list(itertools.islice(it, size))
    while True:
        after = list(itertools.islice(it, size))
        yield wire.encode(build(part, not after))
        if not after:
            return
        part = after
