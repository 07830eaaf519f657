"""The paths this node waits for content of, and since when: ``mesh.core.stall``'s
``ContentWaits``, kept in a TEMP table of the index's connection, not in Python.

A node that joins waits for every path at once. A dict entry per path (its name, a
``_Wait``, and the list and set of every target path built anew at each update) was
the receiver's largest growth with the number of paths during a join, and memory that
pymalloc could not give back after it. Here the rows live in SQLite's temporary
database (its own bounded page cache, spilled to a temporary file), the update is two
statements against ``targets``, and the holders of the paths that waited ``bound`` are
found a page at a time."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

from mesh.core.stall import NO_HOLDER, count_stalled
from mesh.store.index import Index

PAGE = 4096  # paths whose holders are looked up per query
_SEP = "\n"  # between the holders of a path (node ids hold no newline)


class ContentWaitTable:
    """``ContentWaits``' answers; ``update`` reads the targets itself."""

    def __init__(self, index: Index, bound: float) -> None:
        self.index = index
        self.bound = bound
        self._delivered: dict[str, float] = {}  # peer -> last push's end
        index.db.execute(
            "CREATE TEMP TABLE IF NOT EXISTS content_waits (path TEXT PRIMARY KEY, "
            "since REAL NOT NULL, holders TEXT) WITHOUT ROWID")

    def update(self, now: float) -> None:
        """The paths waited for now are the index's targets: new ones start their wait,
        the rest are done."""
        self.index.flush()
        db = self.index.db
        db.execute("DELETE FROM temp.content_waits WHERE path NOT IN "
                   "(SELECT path FROM main.targets)")
        db.execute("INSERT OR IGNORE INTO temp.content_waits (path, since) "
                   "SELECT path, ? FROM main.targets", (now,))

    def delivered(self, peer: str, now: float) -> None:
        self._delivered[peer] = now

    def stalled(self, now: float, holders: Callable[[str], Iterable[str]]
                ) -> tuple[dict[str, int], int]:
        """As ``ContentWaits.stalled``: ``holders(path)`` asked once per path, when it has
        waited ``bound``; the counts per set of holders are one grouped query. A path
        whose content landed since the last ``update`` (every 5 s) is dropped, not asked
        about: it has no holders to find, and counted as stalled with none ("no peer
        holds it"). Looked up a page at a time: a filter on every row, every second, cost
        a 100,000-file join 1.2 CPU-s (0.04 s a call; 0.4 s at a million paths)."""
        db, due, after = self.index.db, now - self.bound, ""
        while True:  # by path, after the last page's (not from the first row each time)
            rows = [p for (p,) in db.execute(
                "SELECT path FROM temp.content_waits WHERE path > ? AND since <= ? AND "
                "holders IS NULL ORDER BY path LIMIT ?", (after, due, PAGE))]
            if not rows:
                break
            waited = {p for (p,) in db.execute(
                "SELECT path FROM main.targets WHERE path IN (SELECT value FROM "
                "json_each(?))", (json.dumps(rows),))}
            db.executemany("DELETE FROM temp.content_waits WHERE path = ?",
                           [(p,) for p in rows if p not in waited])
            db.executemany("UPDATE temp.content_waits SET holders = ? WHERE path = ?",
                           [(_SEP.join(sorted(holders(p))), p) for p in rows if p in waited])
            after = rows[-1]
        groups = db.execute("SELECT holders, count(*) FROM temp.content_waits "
                            "WHERE since <= ? GROUP BY holders", (due,)).fetchall()
        return count_stalled(((joined.split(_SEP) if joined else [NO_HOLDER], n)
                              for joined, n in groups), self._delivered, now, self.bound)
