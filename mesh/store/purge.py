"""Forgetting state a peer poisoned before issue 13's bounds were checked (``Index.purge``):
raw SQL over the index's tables, inside the index's open batch."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Iterable

from mesh.core import admit
from mesh.core.manifest import Entry
from mesh.core.vclock import VersionVector
from mesh.errors import MeshError
from mesh.store.rows import PUT_VERSION, heads_of, pair_of, unpack_vector, version_row


def purge_rows(db: sqlite3.Connection, me: str, path_refused: Callable[[str], bool],
               write_refused: Callable[[Entry], bool],
               vector_refused: Callable[[VersionVector], bool]) -> dict[str, int]:
    """What ``Index.purge`` does, on its connection, in its batch."""

    def refused(path: str, read: Callable[[], Iterable[Entry]]) -> bool:
        if path_refused(path):
            return True
        try:
            writes = list(read())
        except (MeshError, ValueError, TypeError):
            return True  # unreadable: it would fail whatever reads it
        return any(write_refused(w) for w in writes)

    def refused_vector(path: str, blob: bytes) -> bool:
        try:
            return path_refused(path) or vector_refused(unpack_vector(blob))
        except (MeshError, ValueError, TypeError):
            return True

    counts: dict[str, int] = {}
    vectors = [(peer, path) for peer, path, blob in
               db.execute("SELECT peer, path, vector FROM peer_vectors")
               if refused_vector(path, blob)]
    db.executemany("DELETE FROM peer_vectors WHERE peer = ? AND path = ?", vectors)
    counts["peer_vectors"] = len(vectors)
    doomed: dict[str, list[str]] = {}
    for table in ("versions", "targets"):
        doomed[table] = [path for path, blob in
                         db.execute(f"SELECT path, heads FROM {table}")  # noqa: S608
                         if refused(path, functools.partial(heads_of, blob))]
        db.executemany(f"DELETE FROM {table} WHERE path = ?",  # noqa: S608
                       [(p,) for p in doomed[table]])
        counts[table] = len(doomed[table])
    stand_ins = [admit.stand_in(path, me, (unpack_vector(blob) for (blob,) in db.execute(
                     "SELECT vector FROM peer_vectors WHERE path = ?", (path,))))
                 for path in doomed["versions"] if not path_refused(path)]
    db.executemany(PUT_VERSION,
                   [version_row(v) for v in stand_ins if v is not None])
    conflicts = [(cid,) for cid, path, winner, loser in
                 db.execute("SELECT id, path, winner, loser FROM conflicts")
                 if refused(path, functools.partial(pair_of, winner, loser))]
    db.executemany("DELETE FROM conflicts WHERE id = ?", conflicts)
    counts["conflicts"] = len(conflicts)
    return counts

