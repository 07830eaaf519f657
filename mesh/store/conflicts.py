"""The conflict log (``conflicts`` table): every conflict this node resolved or learnt of,
by its id, with when it was logged and whether an operator restored its loser. A part
of ``mesh.store.index.Index``, which inherits it."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

from mesh import clock
from mesh.core.manifest import Entry, entry_from_wire, entry_to_wire
from mesh.core.resolver import Conflict, resolve
from mesh.errors import StoreError
from mesh.store.db import in_chunks
from mesh.store.rows import Row, pack


@dataclass(frozen=True, slots=True)
class ConflictRow:
    conflict: Conflict
    logged_ms: int
    restored_ms: int | None


class ConflictLog:
    """The conflict log's queries, on the index's connection ``db``."""

    db: sqlite3.Connection

    def log_conflict(self, conflict: Conflict, now_ms: int | None = None) -> bool:
        cur = self.db.execute(
            "INSERT OR IGNORE INTO conflicts (id, path, rule, copy_path, winner, loser, "
            "logged_ms) VALUES (?,?,?,?,?,?,?)",
            (conflict.id, conflict.path, conflict.rule.value, conflict.copy_path,
             pack(entry_to_wire(conflict.winner)),
             pack(entry_to_wire(conflict.loser)),
             clock.now_ms() if now_ms is None else now_ms),
        )
        return cur.rowcount == 1

    def conflicts_on(self, paths: Iterable[str]) -> list[ConflictRow]:
        """The conflicts logged on ``paths``, by path: one query per 8,192 paths (a push's
        order asked once per path, issue 16)."""
        rows = []
        for _, wanted in in_chunks(sorted(set(paths))):
            rows += [self._conflict_row(r[1:]) for r in self.db.execute(
                "SELECT path, winner, loser, logged_ms, restored_ms FROM conflicts WHERE "
                "path IN (SELECT value FROM json_each(?)) ORDER BY path, rowid", (wanted,))]
        return rows

    def conflict_ids(self) -> list[str]:
        return [i for (i,) in self.db.execute("SELECT id FROM conflicts ORDER BY id")]

    def conflict_pairs(self, ids: Iterable[str]) -> Iterator[tuple[Entry, Entry]]:
        for conflict_id in ids:
            row = self.conflict(conflict_id)
            if row is not None:
                yield row.conflict.winner, row.conflict.loser

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
    def _conflict_row(row: Row) -> ConflictRow:
        winner = entry_from_wire(msgpack.unpackb(row[0]))
        loser = entry_from_wire(msgpack.unpackb(row[1]))
        outcome = resolve(winner, loser)
        if not isinstance(outcome, Conflict):
            raise StoreError(f"conflict log holds a non-conflict for {winner.path}")
        return ConflictRow(outcome, row[2], row[3])

    def mark_restored(self, conflict_id: str, now_ms: int) -> None:
        """Record that an operator restored the loser of ``conflict_id``."""
        self.db.execute("UPDATE conflicts SET restored_ms = ? WHERE id = ?",
                        (now_ms, conflict_id))
