"""The index's sizes for the status, which asks every second (issue 16): a count of a
million rows takes 0.3 s of the event loop, so a million-file node spent a third of its
loop counting. Each count is read again once it is older than ``STALE_BY`` times what
it took (a small index's at each status, as exact as ever); between two, the targets'
count is the last one plus every target written since (``Index.targets_written``):
only a target written can add one, so the pending count is never low, only high until
the next count."""

from __future__ import annotations

import time
from collections.abc import Callable

from mesh.store.index import Index

STALE_BY = 20  # a count is read again when older than this many times what it took
MIN_AGE_S = 0.0  # and at least this old


class _Count:
    def __init__(self, read: Callable[[], int]) -> None:
        self.read = read
        self.value = 0
        self.at = -float("inf")  # monotonic seconds of the last read
        self.took = 0.0

    def due(self, now: float) -> bool:
        return now - self.at >= max(MIN_AGE_S, STALE_BY * self.took)

    def refresh(self, now: float) -> None:
        started = time.monotonic()
        self.value = self.read()
        self.took = time.monotonic() - started
        self.at = now


class IndexSizes:
    def __init__(self, index: Index) -> None:
        self.index = index
        self._versions = _Count(index.count)
        self._targets = _Count(index.count_targets)
        self._written = 0  # index.targets_written at the targets' last count

    def versions(self, now: float) -> int:
        """Paths in the index (tombstones included), as of at most a few counts ago."""
        if self._versions.due(now):
            self._versions.refresh(now)
        return self._versions.value

    def pending(self, now: float) -> int:
        """Paths waiting for content: at least as many as there are."""
        if self._targets.due(now):
            self.index.flush()  # the targets it holds back are in the count, not added to it
            self._written = self.index.targets_written
            self._targets.refresh(now)
        return self._targets.value + self.index.targets_written - self._written
