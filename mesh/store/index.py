"""The node's state database: version index, peer views and conflict log.

The only SQLite code in meshsync. WAL mode, numbered schema files applied in
order (``schema/NNNN_*.sql``), ``user_version`` records the last applied.
Writes happen inside ``batch()``: one transaction per batch, so a crash at any
moment leaves the state of the last committed batch (DESIGN.md invariant 5).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import msgpack

from mesh.core.manifest import ContentKey, Entry, entry_from_wire, entry_to_wire
from mesh.core.replica import PathState
from mesh.core.resolver import Conflict, Rule, Version, resolve
from mesh.core.vclock import VersionVector
from mesh.errors import StoreError

_ROW = Any


def _schema_files() -> list[tuple[int, str]]:
    folder = resources.files("mesh.store") / "schema"
    files = sorted(f.name for f in folder.iterdir() if f.name.endswith(".sql"))
    return [(int(name.split("_", 1)[0]), (folder / name).read_text()) for name in files]


def _pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def _pack_heads(v: Version) -> bytes:
    return _pack([entry_to_wire(h) for h in v.heads])


def _unpack_heads(blob: bytes) -> Version:
    return Version(tuple(entry_from_wire(raw) for raw in msgpack.unpackb(blob)))


def _unpack_vector(blob: bytes) -> VersionVector:
    return VersionVector.of(msgpack.unpackb(blob))


def _version_row(v: Version) -> tuple[Any, ...]:
    w = v.winner
    return (v.path, _pack_heads(v), _pack(v.vector.to_dict()), w.hash, w.size, w.mode,
            int(w.kind))


@dataclass(frozen=True, slots=True)
class ConflictRow:
    conflict: Conflict
    logged_ms: int
    restored_ms: int | None


class Index:
    """SQLite-backed ``ReplicaStore`` plus the queries operators and links need."""

    def __init__(
        self, path: Path | str, *, keep: Callable[[ContentKey], bool] | None = None
    ) -> None:
        self.path = Path(path) if str(path) != ":memory:" else None
        self._keep = keep
        try:
            self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as err:
            raise StoreError(f"open state database {path}: {err}") from err
        self._depth = 0
        # Path states read or written in the open transaction: the replica reads
        # a path's state several times per change. Only this object writes the
        # tables, so the cache is exact; it is dropped at commit and rollback.
        self._states: dict[str, PathState] = {}

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        current = self.db.execute("PRAGMA user_version").fetchone()[0]
        for number, sql in _schema_files():
            if number <= current:
                continue
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for statement in sql.split(";\n"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {number:d}")
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

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
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error as err:
                raise StoreError(f"commit to {self.path}: {err}") from err
        finally:
            self._depth = 0
            self._states.clear()

    # --- ReplicaStore ------------------------------------------------------------
    def state(self, path: str) -> PathState:
        cached = self._states.get(path)
        if cached is not None:
            return cached
        state = PathState(self._get("versions", path), self._get("targets", path))
        if self._depth:
            self._states[path] = state
        return state

    def _get(self, table: str, path: str) -> Version | None:
        row = self.db.execute(f"SELECT heads FROM {table} WHERE path = ?",  # noqa: S608
                              (path,)).fetchone()
        return None if row is None else _unpack_heads(row[0])

    def set_state(self, path: str, state: PathState) -> None:
        with self.batch():
            self._states[path] = state
            if state.disk is None:
                self.db.execute("DELETE FROM versions WHERE path = ?", (path,))
            else:
                self.db.execute("INSERT OR REPLACE INTO versions VALUES (?,?,?,?,?,?,?)",
                                _version_row(state.disk))
            if state.target is None:
                self.db.execute("DELETE FROM targets WHERE path = ?", (path,))
            else:
                self.db.execute("INSERT OR REPLACE INTO targets VALUES (?, ?)",
                                (path, _pack_heads(state.target)))

    def peer_vector(self, peer: str, path: str) -> VersionVector | None:
        row = self.db.execute("SELECT vector FROM peer_vectors WHERE peer = ? AND path = ?",
                              (peer, path)).fetchone()
        return None if row is None else _unpack_vector(row[0])

    def set_peer_vector(self, peer: str, path: str, vector: VersionVector) -> None:
        self.db.execute("INSERT OR REPLACE INTO peer_vectors VALUES (?, ?, ?)",
                        (peer, path, _pack(vector.to_dict())))

    def log_conflict(self, conflict: Conflict, now_ms: int | None = None) -> bool:
        cur = self.db.execute(
            "INSERT OR IGNORE INTO conflicts (id, path, rule, copy_path, winner, loser, "
            "logged_ms) VALUES (?,?,?,?,?,?,?)",
            (conflict.id, conflict.path, conflict.rule.value, conflict.copy_path,
             _pack(entry_to_wire(conflict.winner)),
             _pack(entry_to_wire(conflict.loser)),
             int(time.time() * 1000) if now_ms is None else now_ms),
        )
        return cur.rowcount == 1

    def kept(self, content: ContentKey) -> bool:
        return bool(self._keep is not None and self._keep(content))

    # --- bulk and queries ----------------------------------------------------------
    def upsert_versions(self, versions: Iterable[Version]) -> int:
        """Write many disk versions in one transaction (start-up scan, catch-up)."""
        with self.batch():
            cur = self.db.executemany("INSERT OR REPLACE INTO versions VALUES (?,?,?,?,?,?,?)",
                                      (_version_row(v) for v in versions))
        return cur.rowcount

    def versions(self) -> Iterator[Version]:
        for (blob,) in self.db.execute("SELECT heads FROM versions ORDER BY path"):
            yield _unpack_heads(blob)

    def targets(self) -> Iterator[Version]:
        for (blob,) in self.db.execute("SELECT heads FROM targets ORDER BY path"):
            yield _unpack_heads(blob)

    def disk_items(self) -> Iterator[tuple[str, VersionVector]]:
        """(path, merged vector) of every disk version: what this node's digest covers."""
        for path, blob in self.db.execute("SELECT path, vector FROM versions"):
            yield path, _unpack_vector(blob)

    def peer_items(self, peer: str) -> Iterator[tuple[str, VersionVector]]:
        """(path, vector) of everything ``peer`` announced: our view of its digest."""
        for path, blob in self.db.execute(
                "SELECT path, vector FROM peer_vectors WHERE peer = ?", (peer,)):
            yield path, _unpack_vector(blob)

    def versions_in(self, paths: Iterable[str]) -> Iterator[Version]:
        for path in paths:
            v = self._get("versions", path)
            if v is not None:
                yield v

    def paths_under(self, folder: str) -> list[str]:
        """Indexed paths strictly inside ``folder`` ('/' sorts just before '0')."""
        return [p for (p,) in self.db.execute(
            "SELECT path FROM versions WHERE path > ? AND path < ? ORDER BY path",
            (folder + "/", folder + "0"))]

    def paths(self) -> Iterator[str]:
        for (path,) in self.db.execute("SELECT path FROM versions"):
            yield path

    def conflicts_on(self, paths: Iterable[str]) -> list[ConflictRow]:
        rows = []
        for path in paths:
            rows += [self._conflict_row(r) for r in self.db.execute(
                "SELECT winner, loser, logged_ms, restored_ms FROM conflicts WHERE path = ?",
                (path,))]
        return rows

    def conflict_ids(self) -> list[str]:
        return [i for (i,) in self.db.execute("SELECT id FROM conflicts ORDER BY id")]

    def conflict_pairs(self, ids: Iterable[str]) -> Iterator[tuple[Entry, Entry]]:
        for conflict_id in ids:
            row = self.conflict(conflict_id)
            if row is not None:
                yield row.conflict.winner, row.conflict.loser

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM versions").fetchone()[0])

    def conflicts(self, *, since_ms: int | None = None, limit: int | None = None
                  ) -> list[ConflictRow]:
        sql = "SELECT winner, loser, logged_ms, restored_ms FROM conflicts"
        args: list[Any] = []
        if since_ms is not None:
            sql += " WHERE logged_ms >= ?"
            args.append(since_ms)
        sql += " ORDER BY logged_ms DESC, id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [self._conflict_row(r) for r in self.db.execute(sql, args)]

    def conflict(self, conflict_id: str) -> ConflictRow | None:
        row = self.db.execute(
            "SELECT winner, loser, logged_ms, restored_ms FROM conflicts WHERE id = ?",
            (conflict_id,)).fetchone()
        return None if row is None else self._conflict_row(row)

    @staticmethod
    def _conflict_row(row: _ROW) -> ConflictRow:
        winner = entry_from_wire(msgpack.unpackb(row[0]))
        loser = entry_from_wire(msgpack.unpackb(row[1]))
        outcome = resolve(winner, loser)
        if not isinstance(outcome, Conflict):
            raise StoreError(f"conflict log holds a non-conflict for {winner.path}")
        return ConflictRow(outcome, row[2], row[3])

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


__all__ = ["ConflictRow", "Index", "Rule"]
