"""The node's state database: version index, peer views and conflict log.

The only SQLite code in meshsync. WAL mode, numbered schema files applied in
order (``schema/NNNN_*.sql``), ``user_version`` records the last applied.
Writes happen inside ``batch()``: one transaction per batch, so a crash at any
moment leaves the state of the last committed batch (DESIGN.md invariant 5).

Inside a batch, path states and peer vectors are cached, and their writes are
held back and written with one ``executemany`` per table when the batch commits
(or before any query that reads those tables), leaving out what did not change.
A receiver applies a manifest of thousands of entries per batch, and one
statement per read and per write was most of its time; ``prefetch`` loads the
states a manifest touches in three queries instead of three per entry (issue 3:
34,000 -> 47,000 new entries applied per CPU-second, with decoding).

WAL checkpoints run on a thread of their own (``Checkpointer``), not in
whichever commit crosses SQLite's threshold: with ``synchronous=NORMAL`` a
checkpoint fsyncs, and on the event loop's thread that was the tail of the
mesh's manifest latency.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import msgpack

from mesh.core.effects import PathState
from mesh.core.manifest import (
    ContentKey,
    Entry,
    entry_from_wire,
)
from mesh.core.resolver import Rule, Version
from mesh.core.vclock import VersionVector
from mesh.errors import StoreError
from mesh.store.conflicts import ConflictLog, ConflictRow
from mesh.store.db import Checkpointer, connect, in_chunks
from mesh.store.purge import purge_rows
from mesh.store.rows import (
    PUT_PEER_VECTOR,
    PUT_VERSION,
    pack,
    pack_heads,
    state_of,
    unpack_heads,
    unpack_vector,
    version_row,
)

LOG = logging.getLogger(__name__)
NAMING_AT_MOST = 64  # hashes looked for in each target's row as bytes; more: rows decoded



class Index(ConflictLog):
    """SQLite-backed ``ReplicaStore`` plus the queries operators and links need."""

    def __init__(
        self, path: Path | str, *, keep: Callable[[ContentKey], bool] | None = None
    ) -> None:
        self.path = Path(path) if str(path) != ":memory:" else None
        self._keep = keep
        self.db = connect(path)
        self._checkpointer: Checkpointer | None = None
        if self.path is not None:
            self._checkpointer = Checkpointer(self.path)
            weakref.finalize(self, self._checkpointer.close)  # an index never closed
        self._depth = 0
        # Path states and peer vectors read or written in the open transaction: the
        # replica reads a path's state several times per change. Only this object
        # writes these tables, so the caches are exact; they are dropped at commit and
        # rollback. Writes wait in _dirty/_peers_dirty until _flush().
        self._states: dict[str, PathState] = {}
        self._stored: dict[str, PathState] = {}  # what the tables hold, of paths read
        self._dirty: dict[str, PathState] = {}
        self._peers: dict[tuple[str, str], VersionVector | None] = {}
        self._peers_dirty: dict[tuple[str, str], VersionVector] = {}
        # Targets written so far (a rolled-back batch's too): whether any need a look
        # (mesh.store.waits)
        self.targets_written = 0

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        self.db.close()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction; nested batches join the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
            self._flush()
        except BaseException:
            self._forget()
            self.db.execute("ROLLBACK")
            raise
        else:
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error as err:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise StoreError(f"commit to {self.path}: {err}") from err
            if self._checkpointer is not None:
                self._checkpointer.nudge()
        finally:
            self._depth = 0
            self._forget()

    def _forget(self) -> None:
        self._states.clear()
        self._stored.clear()
        self._dirty.clear()
        self._peers.clear()
        self._peers_dirty.clear()

    def flush(self) -> None:
        """Write what the open batch holds back (before a query of ``mesh.store.bulk``)."""
        self._flush()

    def _flush(self) -> None:
        """Write what the open batch holds back, one statement per table and kind."""
        if self._dirty:
            states, self._dirty = self._dirty, {}
            put_disk, put_target, drop_disk, drop_target = [], [], [], []
            for path, st in states.items():
                # Only what differs from the row as read (the replica often rewrites
                # one half of a state and hands the other back as it got it).
                stored = self._stored.get(path)
                disk, target = st.disk, st.target
                if stored is None or disk is not stored.disk:
                    if disk is not None:
                        put_disk.append(version_row(disk))
                    elif stored is None or stored.disk is not None:
                        drop_disk.append((path,))
                if stored is None or target is not stored.target:
                    if target is not None:
                        put_target.append((path, pack_heads(target)))
                    elif stored is None or stored.target is not None:
                        drop_target.append((path,))
                self._stored[path] = st
            db = self.db
            db.executemany("DELETE FROM versions WHERE path = ?", drop_disk)
            db.executemany(PUT_VERSION, put_disk)
            db.executemany("DELETE FROM targets WHERE path = ?", drop_target)
            db.executemany("INSERT OR REPLACE INTO targets VALUES (?, ?)", put_target)
            self.targets_written += len(put_target)
        if self._peers_dirty:
            vectors, self._peers_dirty = self._peers_dirty, {}
            self.db.executemany(PUT_PEER_VECTOR,
                                [(peer, path, pack(v.to_dict()))
                                 for (peer, path), v in vectors.items()])

    # --- ReplicaStore ------------------------------------------------------------
    def state(self, path: str) -> PathState:
        cached = self._states.get(path)
        if cached is not None:
            return cached
        disk, target = self.db.execute(
            "SELECT (SELECT heads FROM versions WHERE path = ?1), "
            "(SELECT heads FROM targets WHERE path = ?1)", (path,)).fetchone()
        state = state_of(disk, target)
        if self._depth and path not in self._dirty:
            self._states[path] = self._stored[path] = state
        return state

    def prefetch(self, paths: Iterable[str], peer: str | None = None) -> None:
        """Read the states of ``paths`` (and ``peer``'s vectors for them) into the open
        batch's cache with a few queries, before the replica asks for them one by one.
        Outside a batch there is no cache: nothing to do."""
        if not self._depth:
            return
        for chunk, wanted in in_chunks(p for p in paths if p not in self._states):
            disk = dict(self.db.execute(_IN_PATHS.format(table="versions"), (wanted,)))
            target = dict(self.db.execute(_IN_PATHS.format(table="targets"), (wanted,)))
            for p in chunk:
                self._states[p] = self._stored[p] = state_of(disk.get(p), target.get(p))
            if peer is not None:
                seen = dict(self.db.execute(
                    "SELECT path, vector FROM peer_vectors WHERE peer = ? AND path IN "
                    "(SELECT value FROM json_each(?))", (peer, wanted)))
                for p in chunk:
                    key = (peer, p)
                    if key not in self._peers:
                        blob = seen.get(p)
                        self._peers[key] = None if blob is None else unpack_vector(blob)

    def set_state(self, path: str, state: PathState) -> None:
        if not self._depth:
            with self.batch():
                self.set_state(path, state)
            return
        self._states[path] = self._dirty[path] = state

    def peer_vector(self, peer: str, path: str) -> VersionVector | None:
        key = (peer, path)
        if key in self._peers:
            return self._peers[key]
        row = self.db.execute("SELECT vector FROM peer_vectors WHERE peer = ? AND path = ?",
                              (peer, path)).fetchone()
        vector = None if row is None else unpack_vector(row[0])
        if self._depth:
            self._peers[key] = vector
        return vector

    def set_peer_vector(self, peer: str, path: str, vector: VersionVector) -> None:
        if self._depth:
            self._peers[(peer, path)] = self._peers_dirty[(peer, path)] = vector
            return
        self.db.execute(PUT_PEER_VECTOR,
                        (peer, path, pack(vector.to_dict())))

    def kept(self, content: ContentKey) -> bool:
        return bool(self._keep is not None and self._keep(content))

    # --- bulk and queries ----------------------------------------------------------
    def upsert_versions(self, versions: Iterable[Version]) -> int:
        """Write many disk versions in one transaction (start-up scan, catch-up)."""
        with self.batch():
            self._flush()
            rows = [version_row(v) for v in versions]
            for row in rows:  # the cached states of these paths are stale now
                self._states.pop(row[0], None)
                self._stored.pop(row[0], None)
            cur = self.db.executemany(PUT_VERSION, rows)
        return cur.rowcount

    def versions(self) -> Iterator[Version]:
        self._flush()
        for (blob,) in self.db.execute("SELECT heads FROM versions ORDER BY path"):
            yield unpack_heads(blob)

    def targets(self) -> Iterator[Version]:
        self._flush()
        for (blob,) in self.db.execute("SELECT heads FROM targets ORDER BY path"):
            yield unpack_heads(blob)

    def targets_naming(self, hashes: Collection[bytes]) -> Iterator[Version]:
        """The pending targets a head of which may hold one of ``hashes``: the rows that
        contain one as bytes (a superset), decoded; every target when they are many."""
        self._flush()
        few = len(hashes) <= NAMING_AT_MOST
        for (blob,) in self.db.execute("SELECT heads FROM targets ORDER BY path"):
            if not few or any(h in blob for h in hashes):
                yield unpack_heads(blob)

    def target_paths(self) -> list[str]:
        """The paths whose content this node waits for (no row decoded)."""
        self._flush()
        return [p for (p,) in self.db.execute("SELECT path FROM targets")]

    def count_targets(self) -> int:
        self._flush()
        return int(self.db.execute("SELECT count(*) FROM targets").fetchone()[0])

    def disk_items(self) -> Iterator[tuple[str, VersionVector]]:
        """(path, merged vector) of every disk version: what this node's digest covers."""
        self._flush()
        for path, blob in self.db.execute("SELECT path, vector FROM versions"):
            yield path, unpack_vector(blob)

    def peer_items(self, peer: str) -> Iterator[tuple[str, VersionVector]]:
        """(path, vector) of everything ``peer`` announced: our view of its digest."""
        self._flush()
        for path, blob in self.db.execute(
                "SELECT path, vector FROM peer_vectors WHERE peer = ?", (peer,)):
            yield path, unpack_vector(blob)

    def versions_in(self, paths: Iterable[str]) -> Iterator[Version]:
        for path in paths:
            v = self.state(path).disk
            if v is not None:
                yield v

    def paths_under(self, folder: str) -> list[str]:
        """Indexed paths strictly inside ``folder`` ('/' sorts just before '0')."""
        self._flush()
        return [p for (p,) in self.db.execute(
            "SELECT path FROM versions WHERE path > ? AND path < ? ORDER BY path",
            (folder + "/", folder + "0"))]

    def paths(self) -> Iterator[str]:
        self._flush()
        for (path,) in self.db.execute("SELECT path FROM versions"):
            yield path

    def targets_over(self, limit: int) -> bool:
        """Whether more than ``limit`` paths wait for content (reads at most ``limit`` + 1)."""
        self._flush()
        return bool(self.db.execute("SELECT count(*) > ? FROM (SELECT 1 FROM targets LIMIT ?)",
                                    (limit, limit + 1)).fetchone()[0])

    def count(self) -> int:
        self._flush()
        return int(self.db.execute("SELECT count(*) FROM versions").fetchone()[0])

    def purge(self, me: str, path_refused: Callable[[str], bool],
              write_refused: Callable[[Entry], bool],
              vector_refused: Callable[[VersionVector], bool]) -> dict[str, int]:
        """Forget every row that names a path, or holds a write or a vector, that would be
        refused from a peer now, or that cannot be read: state poisoned before the bounds
        were checked (issue 13), which would otherwise stop the agent at every start.
        Returns how many rows went, per table. Reads every row: run it once.

        A disk version forgotten is not simply dropped when peers announced the path: the
        next scan would make a write of ours with counter 1 again, which a peer holding an
        older write of ours takes for that one. It is replaced by a delete of ours (hlc 0)
        under the merge of what the peers announced, which the scan then writes on top of
        (and which loses to any peer's content under the same vector: an edit beats it)."""
        with self.batch():
            self._flush()
            return purge_rows(self.db, me, path_refused, write_refused, vector_refused)

    # --- what collection needs (issue 14, mesh.core.retention) ---------------------
    def unwritten_losers(self) -> list[Entry]:
        """The losers of logged conflicts whose copy path the index does not know yet:
        their content may still be written as the copy."""
        self._flush()
        return [entry_from_wire(msgpack.unpackb(blob)) for (blob,) in self.db.execute(
            "SELECT loser FROM conflicts c WHERE copy_path IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM versions WHERE path = c.copy_path) "
            "AND NOT EXISTS (SELECT 1 FROM targets WHERE path = c.copy_path)")]

    def tombstones(self, after: str, limit: int) -> list[Version]:
        """Up to ``limit`` deletes on disk, by path after ``after``."""
        self._flush()
        return [unpack_heads(blob) for (blob,) in self.db.execute(
            "SELECT heads FROM versions WHERE hash IS NULL AND path > ? ORDER BY path "
            "LIMIT ?", (after, limit))]

    def forget(self, path: str, peers: Iterable[str]) -> None:
        """Drop ``path``'s disk version and what ``peers`` announced of it: a tombstone
        every known peer acknowledged (``mesh.core.retention.tombstone_due``)."""
        peers = list(peers)
        with self.batch():
            self._flush()
            for cache in (self._states, self._stored):
                cache.pop(path, None)
            for peer in peers:
                self._peers.pop((peer, path), None)
            self.db.execute("DELETE FROM versions WHERE path = ?", (path,))
            self.db.executemany("DELETE FROM peer_vectors WHERE peer = ? AND path = ?",
                                [(peer, path) for peer in peers])

    def announcing_peers(self) -> list[str]:
        """Every peer that announced anything (one pass over the peer views' keys)."""
        self._flush()
        out: list[str] = []
        row = self.db.execute("SELECT min(peer) FROM peer_vectors").fetchone()
        while row is not None and row[0] is not None:
            out.append(row[0])
            row = self.db.execute("SELECT min(peer) FROM peer_vectors WHERE peer > ?",
                                  (row[0],)).fetchone()
        return out

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


_IN_PATHS = "SELECT path, heads FROM {table} WHERE path IN (SELECT value FROM json_each(?))"


__all__ = ["ConflictRow", "Index", "Rule"]
