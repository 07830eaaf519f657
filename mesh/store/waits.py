"""The paths this node waits for content of, and since when: ``mesh.core.stall``'s
``ContentWaits``, kept in a TEMP table of the index's connection, not in Python.

A node that joins waits for every path at once. A dict entry per path was the
receiver's largest growth with the number of paths during a join; here the rows live
in SQLite's temporary database (its own bounded page cache, spilled to a temporary
file).

No call reads every row (issue 16: at a million paths, comparing every path with the
targets held the agent's loop 0.7 s every 5 s, counting them 0.4 s every second, and
finding the holders of every path that fell due at once 2-3 s; a link dropped). Each
call walks on from where the last one stopped, ``walk`` rows at a time:

* ``update`` walks the targets: a target not waited for yet starts its wait now. So a
  wait starts up to one pass late (a pass is the number of rows over ``walk`` calls:
  one call below ``walk`` rows; 245 at a million).
* ``update`` and ``stalled`` walk the waits: one whose path is no longer a target
  ends, so up to a pass late (a path whose content came and that is waited for again
  within a pass keeps its first start). ``stalled`` looks up the holders of those
  that have waited ``bound``, at most ``lookups`` per call. The counts per set of
  holders are kept as rows are looked up and ended, not counted again.

Neither walks when it has nothing to find: ``update`` while no target was written
since its last pass began (``Index.targets_written``), ``stalled`` while no wait is
counted and none can have waited ``bound`` (the oldest wait's start is kept, renewed
at each whole pass). A join shorter than ``bound`` does neither after the catch-up's
targets are walked once."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable

from mesh.core.stall import LOOKUPS, NO_HOLDER, count_stalled
from mesh.store.index import Index

WALK = 4096  # rows of the targets, and of the waits, looked at per call
_SEP = "\n"  # between the holders of a path (node ids hold no newline)


class ContentWaitTable:
    """``ContentWaits``' answers, for the index's targets."""

    def __init__(self, index: Index, bound: float, lookups: int = LOOKUPS,
                 walk: int = WALK) -> None:
        self.index = index
        self.bound = bound
        self.lookups = lookups
        self.walk = walk
        self._delivered: dict[str, float] = {}  # peer -> last push's end
        self._counted: dict[str, int] = {}  # holders (joined) -> paths looked up
        self._targets_after = self._waits_after = ""  # where each walk goes on
        self._written = -1  # the index's targets_written when the last whole pass began
        self._pass_written = 0
        # No wait began before _oldest: until it has waited ``bound`` and while none is
        # counted, the waits need no walk. _pass_oldest and _inserted_oldest make the
        # next one: the oldest wait the walk kept, and the oldest begun, in this pass.
        self._oldest = self._pass_oldest = self._inserted_oldest = math.inf
        index.db.execute("DROP TABLE IF EXISTS temp.content_waits")
        index.db.execute(
            "CREATE TEMP TABLE content_waits (path TEXT PRIMARY KEY, since REAL NOT NULL, "
            "holders TEXT) WITHOUT ROWID")

    def update(self, now: float) -> None:
        """Walk on: the next ``walk`` waits end if their path is no longer a target, then
        the next ``walk`` targets not waited for yet start their wait now. Neither is
        looked at while no target was written since the last pass began."""
        self.index.flush()
        if not self._targets_after:
            if self.index.targets_written == self._written:
                return
            self._pass_written = self.index.targets_written
        self._walk_waits(now, None)
        db = self.index.db
        paths = [p for (p,) in db.execute(
            "SELECT path FROM main.targets WHERE path > ? ORDER BY path LIMIT ?",
            (self._targets_after, self.walk))]
        if db.executemany("INSERT OR IGNORE INTO temp.content_waits (path, since) "
                          "VALUES (?, ?)", [(p, now) for p in paths]).rowcount > 0:
            self._oldest = min(self._oldest, now)
            self._inserted_oldest = min(self._inserted_oldest, now)
        self._targets_after = paths[-1] if len(paths) == self.walk else ""
        if not self._targets_after:
            self._written = self._pass_written

    def delivered(self, peer: str, now: float) -> None:
        self._delivered[peer] = now

    def stalled(self, now: float, holders: Callable[[str], Iterable[str]]
                ) -> tuple[dict[str, int], int]:
        """As ``ContentWaits.stalled``: ``holders(path)`` asked once per path, when it has
        waited ``bound``, and of at most ``lookups`` paths per call. ``now`` never goes
        back (a path once counted stays counted until its wait ends)."""
        if not self._counted and now - self._oldest < self.bound:
            return {}, 0  # nothing has waited that long
        self.index.flush()
        self._walk_waits(now, holders)
        groups = [(joined.split(_SEP) if joined else [NO_HOLDER], n)
                  for joined, n in self._counted.items()]
        return count_stalled(groups, self._delivered, now, self.bound)

    def _walk_waits(self, now: float, holders: Callable[[str], Iterable[str]] | None
                    ) -> None:
        """The next ``walk`` waits: those whose path is no longer a target end; with
        ``holders``, those that waited ``bound`` have them looked up (``lookups`` at most;
        the walk stops at the first one over)."""
        db = self.index.db
        rows = db.execute(
            "SELECT path, since, holders FROM temp.content_waits WHERE path > ? "
            "ORDER BY path LIMIT ?", (self._waits_after, self.walk)).fetchall()
        targets = {p for (p,) in db.execute(
            "SELECT path FROM main.targets WHERE path IN (SELECT value FROM json_each(?))",
            (json.dumps([path for path, _, _ in rows]),))}
        ended, found, left, last = [], [], self.lookups, self._waits_after
        for path, since, known in rows:
            if path not in targets:
                ended.append((path,))
                if known is not None:
                    self._count(known, -1)
                last = path
                continue
            if holders is not None and known is None and now - since >= self.bound:
                if not left:
                    break  # looked up on the next call
                left -= 1
                joined = _SEP.join(sorted(holders(path)))
                found.append((joined, path))
                self._count(joined, 1)
            self._pass_oldest = min(self._pass_oldest, since)
            last = path
        db.executemany("DELETE FROM temp.content_waits WHERE path = ?", ended)
        db.executemany("UPDATE temp.content_waits SET holders = ? WHERE path = ?", found)
        self._waits_after = last if len(rows) == self.walk or not left else ""
        if not self._waits_after:  # a whole pass: no wait it kept began before
            self._oldest = min(self._pass_oldest, self._inserted_oldest)
            self._pass_oldest = self._inserted_oldest = math.inf

    def _count(self, joined: str, change: int) -> None:
        n = self._counted.get(joined, 0) + change
        if n:
            self._counted[joined] = n
        else:
            del self._counted[joined]
