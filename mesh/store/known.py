"""What the index and the stat cache say each of many paths shows when it is unchanged,
for the start-up reconcile (``mesh.core.reconcile``, issue 16): one query per chunk of
paths instead of two rows read per path, on a read-only connection of its own so that
a worker thread can read while the event loop's connection writes (WAL: the reader
sees the last committed state, and what changes after it is a scan the loop makes
anyway)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from mesh.core.manifest import Kind
from mesh.core.reconcile import Fingerprint
from mesh.errors import StoreError
from mesh.store.db import connect_read_only
from mesh.store.statcache import from_sql_ino

# A file's stat cache record counts only if it hashed the disk version's content (the
# join's hash), and a folder's disk version is its mode alone (an empty hash):
# ``mesh.core.reconcile.expected``, as SQL and one tuple per path. The blobs stay in
# SQLite: building a Known per path (two hashes as bytes) was half of reading them.
_LISTED = (
    "SELECT v.path, v.kind, v.mode, length(v.hash), s.size, s.mtime_ns, s.ctime_ns, s.ino "
    "FROM versions v LEFT JOIN stat_cache s ON s.path = v.path AND s.hash = v.hash "
    "WHERE v.path IN (SELECT value FROM json_each(?))")
_RANGE = (
    "SELECT v.path, v.kind, v.mode, length(v.hash), s.size, s.mtime_ns, s.ctime_ns, s.ino "
    "FROM versions v LEFT JOIN stat_cache s ON s.path = v.path AND s.hash = v.hash "
    "WHERE v.path BETWEEN ? AND ? ORDER BY v.path LIMIT ?")
RANGE_AT_MOST = 4  # rows a range may read per path asked about; more: read them by name

_FILE, _DIR = Kind.FILE.value, Kind.DIR.value


class KnownPaths:
    """Reads of ``db`` (the index's own connection, or a reader from ``open_reader``)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def expected(self, paths: list[str], hashed: bool = True) -> dict[str, Fingerprint]:
        """What an ``lstat`` shows of each of ``paths`` that is unchanged since it was
        indexed (``mesh.core.reconcile.expected``); a path that is always scanned has
        none. Without ``hashed`` (no stat cache), no file has one.

        The walk asks in chunks of its own order, mostly whole folders, so the rows
        between the least and the greatest path are read in one range (half the time of
        a lookup by name each, at a million paths), unless the range holds more than
        ``RANGE_AT_MOST`` rows a path (sibling names that sort between a folder and
        its content: "a.b" lies between "a" and "a/x")."""
        out: dict[str, Fingerprint] = {}
        if not paths:
            return out
        wanted, cap = set(paths), RANGE_AT_MOST * len(paths)
        try:
            rows = self.db.execute(_RANGE, (min(paths), max(paths), cap + 1)).fetchall()
            if len(rows) > cap:
                rows = self.db.execute(_LISTED, (json.dumps(paths),)).fetchall()
        except sqlite3.Error as err:
            raise StoreError(f"read the index for {len(paths)} paths: {err}") from err
        for path, kind, mode, length, size, mtime_ns, ctime_ns, ino in rows:
            if path not in wanted:
                continue
            if kind == _DIR:
                if length == 0:
                    out[path] = (mode,)
            elif kind == _FILE and size is not None and hashed:
                out[path] = (mode, size, mtime_ns, ctime_ns, from_sql_ino(ino))
        return out

    def held(self) -> Iterator[str]:
        """Every path whose disk version holds content (not a delete)."""
        try:
            for (path,) in self.db.execute("SELECT path FROM versions WHERE hash IS NOT NULL"):
                yield path
        except sqlite3.Error as err:
            raise StoreError(f"read the index's paths: {err}") from err


@contextlib.contextmanager
def open_reader(path: Path) -> Iterator[KnownPaths]:
    """A read-only connection of its own to the state database at ``path``."""
    try:
        db = connect_read_only(path)
    except sqlite3.Error as err:
        raise StoreError(f"open {path} to read: {err}") from err
    try:
        yield KnownPaths(db)
    finally:
        db.close()
