"""Queries over many paths at once, for catch-up and incoming pushes (issue 16).

A catch-up of an empty node moves the whole tree: asking the index one path at a time
(a row fetched and its heads decoded per path, in the sender's planner and in the
receiver's admission) was most of the CPU of a join. These read what is needed in one
statement per chunk, decode only vectors, and stream: nothing here holds the whole
tree in memory (``behind`` pages by path, ``limit`` rows at a time).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from mesh.core.digest import Digest
from mesh.core.resolver import Version
from mesh.core.vclock import VersionVector
from mesh.store import digests
from mesh.store.db import IN_CHUNK, connect_read_only, in_chunks
from mesh.store.index import Index
from mesh.store.rows import unpack_heads, unpack_vector


def peer_vectors(index: Index, peer: str, paths: Iterable[str]) -> dict[str, VersionVector]:
    """What ``peer`` last announced of each of ``paths`` (absent: never): the bulk form
    of ``Index.peer_vector``."""
    index.flush()
    out: dict[str, VersionVector] = {}
    for _, wanted in in_chunks(paths):
        for path, blob in index.db.execute(
                "SELECT path, vector FROM peer_vectors WHERE peer = ? AND path IN "
                "(SELECT value FROM json_each(?))", (peer, wanted)):
            out[path] = unpack_vector(blob)
    return out


def behind(index: Index, peer: str, after: str, limit: int) -> tuple[list[str], str | None]:
    """The next page of a sweep for what ``peer`` is behind on: of the first ``limit``
    indexed paths after ``after`` (by path) that wait for no target, those our disk
    version may overwrite ``peer``'s with (``Replica.may_push``: content where it
    announced nothing, else a vector strictly after what it announced); and the last
    path of the page, to continue after (None: the sweep is done)."""
    index.flush()
    rows = index.db.execute(
        "SELECT v.path, v.vector, v.hash IS NOT NULL, p.vector FROM versions v "
        "LEFT JOIN peer_vectors p ON p.peer = ? AND p.path = v.path "
        "WHERE v.path > ? AND NOT EXISTS (SELECT 1 FROM targets t WHERE t.path = v.path) "
        "ORDER BY v.path LIMIT ?", (peer, after, limit)).fetchall()
    # Equal bytes are equal vectors (``vector_bytes``), which do not dominate: a restart's
    # sweep finds most paths so and decodes none of them.
    out = [path for path, mine, held, seen in rows
           if (held if seen is None else mine != seen
               and unpack_vector(mine).dominates(unpack_vector(seen)))]
    return out, (rows[-1][0] if len(rows) == limit else None)


def versions_in_buckets(index: Index, wanted: set[int], page: int = IN_CHUNK
                        ) -> Iterator[Version]:
    """Our disk versions of the paths in the digest buckets ``wanted``, by path, a page
    of ``page`` rows per query, the rows picked by their bucket column (schema 4) in
    SQLite: what a peer's catch-up fetches (all 4,096 buckets for an empty node). No
    cursor stays open between pages: the caller may publish, and the index be written,
    between two. (Each request hashed every path of the tree in Python: at a million
    paths, 2 s of the sender's loop at a time.)"""
    after, buckets = "", json.dumps(sorted(wanted))
    while True:
        index.flush()
        rows = index.db.execute(
            "SELECT path, heads FROM versions WHERE path > ? AND bucket IN "
            "(SELECT value FROM json_each(?)) ORDER BY path LIMIT ?",
            (after, buckets, page)).fetchall()
        for _, blob in rows:
            yield unpack_heads(blob)
        if len(rows) < page:
            return
        after = rows[-1][0]


# One digest at a time, off the event loop: a digest used to hash every row of the
# index (a million paths: 3 s), and two at once fought for the GIL. Now each is a read of
# 4,096 rows that the triggers keep (``mesh.store.digests``); the thread stays, as any
# read of the index through a connection of its own does.
_DIGESTS = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mesh-digest")


async def digest(index: Index, peer: str | None = None) -> Digest:
    """The digest of our disk versions, or of what ``peer`` announced to us, as last
    committed (``digest_in_thread``); an index in memory (tests) has one connection,
    read on the caller's."""
    if index.path is None:
        index.flush()
        return digests.read(index.db, digests.DISK if peer is None else peer)
    return await asyncio.get_running_loop().run_in_executor(
        _DIGESTS, digest_in_thread, index.path, peer)


def digest_in_thread(db_path: Path, peer: str | None = None) -> Digest:
    """The digest of our disk versions (``Digest.of(Index.disk_items())``), or of what
    ``peer`` announced (``Index.peer_items``), read through a connection of its own, to
    run in a thread. It reads the index as last committed (WAL)."""
    db = connect_read_only(db_path)
    try:
        return digests.read(db, digests.DISK if peer is None else peer)
    finally:
        db.close()
