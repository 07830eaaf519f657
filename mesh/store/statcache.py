"""The scanner's stat cache: what a regular file looked like when it was hashed.

It lives in the state database (schema ``0002_stat_cache.sql``) and uses the
``Index``'s own connection (``StatCache(index.db)``). It never begins or
commits a transaction: inside ``Index.batch()`` its writes join the batch's
transaction; outside one, the connection (``isolation_level=None``) applies
each statement on its own. A lost cache entry only costs a re-hash.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from mesh.errors import LocalProtocolError, StoreError

_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1


def to_sql_ino(ino: int) -> int:
    # SQLite integers are signed 64-bit; overlayfs (xino) and some other
    # filesystems hand out inode numbers with the top bit set.
    return ino - _U64 if ino > _I64_MAX else ino


def from_sql_ino(value: int) -> int:
    return value + _U64 if value < 0 else value


@dataclass(frozen=True, slots=True)
class CachedStat:
    """A file's identity when it was hashed, and the SHA-256 of its content."""

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    hash: bytes

    def __post_init__(self) -> None:
        if len(self.hash) != 32:
            raise LocalProtocolError(f"stat cache hash must be 32 bytes, not {len(self.hash)}")
        if self.size < 0 or not 0 <= self.ino < _U64:
            raise LocalProtocolError("stat cache size and inode must be unsigned")

    def same_file(self, size: int, mtime_ns: int, ctime_ns: int, ino: int) -> bool:
        return (self.size, self.mtime_ns, self.ctime_ns, self.ino) == (
            size, mtime_ns, ctime_ns, ino)


class StatCache:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def get(self, path: str) -> CachedStat | None:
        try:
            row = self.db.execute(
                "SELECT size, mtime_ns, ctime_ns, ino, hash FROM stat_cache WHERE path = ?",
                (path,)).fetchone()
        except sqlite3.Error as err:
            raise StoreError(f"read stat cache for {path!r}: {err}") from err
        if row is None:
            return None
        size, mtime_ns, ctime_ns, ino, digest = row
        return CachedStat(size, mtime_ns, ctime_ns, from_sql_ino(ino), digest)

    def put(self, path: str, stat: CachedStat) -> None:
        self.put_many(((path, stat),))

    def put_many(self, items: Iterable[tuple[str, CachedStat]]) -> None:
        try:
            self.db.executemany(
                "INSERT OR REPLACE INTO stat_cache VALUES (?, ?, ?, ?, ?, ?)",
                ((p, s.size, s.mtime_ns, s.ctime_ns, to_sql_ino(s.ino), s.hash)
                 for p, s in items))
        except sqlite3.Error as err:
            raise StoreError(f"write stat cache: {err}") from err

    def delete(self, path: str) -> None:
        try:
            self.db.execute("DELETE FROM stat_cache WHERE path = ?", (path,))
        except sqlite3.Error as err:
            raise StoreError(f"delete {path!r} from stat cache: {err}") from err

    def __len__(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM stat_cache").fetchone()[0])
