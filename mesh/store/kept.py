"""The record of what the keep area holds, and of the peers heard (issue 14).

Tables ``kept`` and ``peers_heard`` (``schema/0003_keep.sql``), on the index's
connection and inside its transactions: a row is written in the same batch as
the restore that filed its content away, so a crash leaves both or neither.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from mesh.core.manifest import Entry, entry_from_wire, entry_to_wire, vector_from_wire
from mesh.core.retention import Reason
from mesh.core.vclock import VersionVector
from mesh.store.index import Index
from mesh.store.rows import pack

_COLUMNS = "id, path, entry, vector, kept_ms, reason"
_CHUNK = 500  # hashes per IN query


@dataclass(frozen=True, slots=True)
class KeptRow:
    id: int
    path: str
    entry: Entry  # the kept write
    vector: VersionVector  # the merged vector of the version it was part of
    kept_ms: int
    reason: Reason


def _row(r: Any) -> KeptRow:
    return KeptRow(r[0], r[1], entry_from_wire(msgpack.unpackb(r[2])),
                   vector_from_wire(msgpack.unpackb(r[3])), r[4], Reason(r[5]))


class KeptLog:
    def __init__(self, index: Index) -> None:
        self.index = index
        self.db = index.db

    # --- kept versions ------------------------------------------------------------
    def add(self, entry: Entry, vector: VersionVector, reason: Reason, now_ms: int) -> None:
        assert entry.hash is not None
        with self.index.batch():
            self.db.execute(
                "INSERT INTO kept (path, hash, entry, vector, size, kept_ms, reason) "
                "VALUES (?,?,?,?,?,?,?)",
                (entry.path, bytearray(entry.hash), pack(entry_to_wire(entry)),
                 pack(vector.to_dict()), entry.size, now_ms, reason.value))

    def of_path(self, path: str) -> list[KeptRow]:
        """Every kept version of ``path``, newest first."""
        return [_row(r) for r in self.db.execute(
            f"SELECT {_COLUMNS} FROM kept WHERE path = ? ORDER BY kept_ms DESC, id DESC",  # noqa: S608
            (path,))]

    def latest_per_path(self, since_ms: int | None = None) -> list[KeptRow]:
        """The newest kept version of each path (kept since ``since_ms``), newest first."""
        return [_row(r) for r in self.db.execute(
            f"SELECT {_COLUMNS} FROM kept k WHERE kept_ms >= ? AND id = (SELECT id FROM "  # noqa: S608
            "kept WHERE path = k.path ORDER BY kept_ms DESC, id DESC LIMIT 1) "
            "ORDER BY kept_ms DESC, id DESC", (since_ms or 0,))]

    def oldest(self, limit: int, kept_before_ms: int | None = None) -> list[KeptRow]:
        sql = f"SELECT {_COLUMNS} FROM kept"  # noqa: S608
        args: list[Any] = []
        if kept_before_ms is not None:
            sql += " WHERE kept_ms <= ?"
            args.append(kept_before_ms)
        return [_row(r) for r in self.db.execute(sql + " ORDER BY kept_ms, id LIMIT ?",
                                                 [*args, limit])]

    def rows_of(self, hashes: Iterable[bytes]) -> dict[bytes, int]:
        """How many rows keep each of ``hashes`` (absent: none)."""
        out: dict[bytes, int] = {}
        todo = list(set(hashes))
        for i in range(0, len(todo), _CHUNK):
            chunk = todo[i:i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for h, n in self.db.execute(
                    f"SELECT hash, count(*) FROM kept WHERE hash IN ({marks}) GROUP BY hash",  # noqa: S608
                    [bytearray(h) for h in chunk]):
                out[bytes(h)] = int(n)
        return out

    def delete(self, ids: Iterable[int]) -> None:
        with self.index.batch():
            self.db.executemany("DELETE FROM kept WHERE id = ?", [(i,) for i in ids])

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM kept").fetchone()[0])

    # --- peers heard ------------------------------------------------------------
    def heard(self, live: Iterable[str], known: Iterable[str], now_ms: int,
              elapsed_ms: int) -> None:
        """``live`` peers are heard now; every other ``known`` one (and every one already
        recorded) missed another ``elapsed_ms`` of our running time."""
        live = set(live)
        with self.index.batch():
            self.db.executemany(
                "INSERT INTO peers_heard VALUES (?, ?, 0) ON CONFLICT (peer) DO UPDATE "
                "SET heard_ms = excluded.heard_ms, missed_ms = 0", [(p, now_ms) for p in live])
            self.db.executemany(
                "INSERT OR IGNORE INTO peers_heard VALUES (?, ?, 0)",
                [(p, now_ms) for p in set(known) - live])
            if live:
                marks = ",".join("?" * len(live))
                self.db.execute(
                    f"UPDATE peers_heard SET missed_ms = missed_ms + ? WHERE peer NOT IN ({marks})",  # noqa: S608
                    [elapsed_ms, *sorted(live)])
            else:
                self.db.execute("UPDATE peers_heard SET missed_ms = missed_ms + ?",
                                (elapsed_ms,))

    def peers(self, forget_after_ms: int) -> tuple[list[str], list[str]]:
        """(known, forgotten): peers heard within ``forget_after_ms`` of our running time,
        and the others."""
        known: list[str] = []
        forgotten: list[str] = []
        for peer, missed in self.db.execute(
                "SELECT peer, missed_ms FROM peers_heard ORDER BY peer"):
            (known if missed < forget_after_ms else forgotten).append(peer)
        return known, forgotten
