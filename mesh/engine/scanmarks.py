"""When each path's last scan began (``DataPlane.scan``): a watcher batch whose events
were all read before a path's mark need not scan it again, so a burst of pushed files
is scanned once, by the push's end. A scan that leaves a path out for that reason
waits for the scan under way that marked it (``running``): the gate grants from what
the index records once it returns (issue 12: lsyncd's batches for a 256 MiB file to
two peers came together, one scan hashed it, and the other peer's grant, not waiting,
found no new version; the file went to that peer 1.4 s later, by the agent's pusher).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Scan:
    """A scan under way (``ScanMarks.begin``): over when ``done`` is."""

    done: asyncio.Future[None]
    paths: list[str]


KEPT = 10_000  # marks kept at least, however old
KEPT_S = 10.0  # a mark matters only to watcher events already on their way


class ScanMarks:
    def __init__(self, *, kept: int = KEPT, kept_s: float = KEPT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kept = kept
        self.kept_s = kept_s
        self._clock = clock
        # path -> when its last scan began, oldest first. An OrderedDict: a dict's first
        # key after many deletes at its front is found by skipping their holes, which
        # made the start-up scan of a million files quadratic (the loop held 6 s).
        self._marks: OrderedDict[str, float] = OrderedDict()
        self._running: dict[str, asyncio.Future[None]] = {}  # path -> the scan marking it

    def __len__(self) -> int:
        return len(self._marks)

    def paths(self) -> list[str]:
        """The marked paths, oldest mark first."""
        return list(self._marks)

    def since(self, path: str) -> float:
        """When the last scan of ``path`` began (-1: none marked)."""
        return self._marks.get(path, -1.0)

    def mark(self, path: str, when: float) -> None:
        """``path`` scanned at ``when``, no earlier than any mark so far: moved to the
        end, the map stays in the order of its marks (``forget``)."""
        self._marks[path] = when
        self._marks.move_to_end(path)

    def begin(self, paths: Iterable[str], when: float) -> Scan:
        """A scan of ``paths`` begins at ``when``: each is marked, and is the scan's
        until ``end``."""
        scan = Scan(asyncio.get_running_loop().create_future(), list(paths))
        for path in scan.paths:
            self.mark(path, when)
            self._running[path] = scan.done
        return scan

    def end(self, scan: Scan) -> None:
        """``scan`` is over (its own paths looked at, not every scan's under way)."""
        for path in scan.paths:
            if self._running.get(path) is scan.done:
                del self._running[path]
        scan.done.set_result(None)

    async def running(self, paths: Iterable[str]) -> None:
        """Until the scans under way that marked any of ``paths`` are over (each began
        before the caller's: no two wait for each other)."""
        scans = {f for p in paths if (f := self._running.get(p)) is not None}
        if scans:
            await asyncio.wait(scans)

    def forget(self) -> None:
        """Marks matter only against events still on their way: kept briefly. The oldest
        go first, and only while the map is over its bound: each mark is dropped once,
        however many scans ask (issue 16: the map was rebuilt whole at every batch while
        it held more than ``kept`` young marks, quadratic in a start-up scan)."""
        marks = self._marks
        if len(marks) <= self.kept:
            return
        old = self._clock() - self.kept_s
        while len(marks) > self.kept:
            path = next(iter(marks))
            if marks[path] > old:
                break
            del marks[path]
