"""What holds this node's health down, and for how long (issue 13).

``mesh health`` fails while content this node waits for has not come, or while
paths are queued for a peer. One certified peer could hold that down for good:
announce 8,192 files whose content never comes, or advertise a tunnel nobody can
push to, and every rolling update waits on a node that will never be healthy.
After ``bound`` seconds without progress such a wait is *stalled*: reported (status,
metrics) and no longer counted against health.

* ``ContentWaits``: a path waited for is stalled once it has waited ``bound``
  seconds and no peer that announced holding it (its *holders*) has delivered a
  push to us in the last ``bound`` seconds. A large catch-up that keeps
  delivering is not stalled, however long it takes. The holders of at most
  ``lookups`` paths are looked up per call, oldest wait first; a path due and not
  looked up yet still counts against health. (A join waits for a million paths at
  once, and they all fall due together: finding every holder in one status tick
  held the agent's loop for seconds, and its links dropped.)
* ``QueueWatch``: the queue to a peer is stalled once it has not been empty, nor
  shrunk, for ``bound`` seconds.
* (in ``Node.stalled``) a catch-up with a peer that has run for ``bound`` seconds: a
  peer can answer a digest and then trickle chunks forever.

No I/O and no clock: the caller passes ``now`` (monotonic seconds) in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

NO_HOLDER = ""  # a waited path no peer announced holding (it went away, say)
LOOKUPS = 2048  # paths whose holders are looked up per call, at most


@dataclass(slots=True)
class _Wait:
    since: float
    holders: tuple[str, ...] | None = None  # found once the path has waited ``bound``


@dataclass
class ContentWaits:
    bound: float
    lookups: int = LOOKUPS
    _waits: dict[str, _Wait] = field(default_factory=dict)
    _delivered: dict[str, float] = field(default_factory=dict)  # peer -> last push's end

    def update(self, now: float, waiting: Iterable[str]) -> None:
        """The paths waited for now (every target): new ones start their wait, the
        rest are done."""
        current = set(waiting)
        for path in list(self._waits):
            if path not in current:
                del self._waits[path]
        for path in current:
            if path not in self._waits:
                self._waits[path] = _Wait(now)

    def delivered(self, peer: str, now: float) -> None:
        """A push from ``peer`` ended well: its content is moving."""
        self._delivered[peer] = now

    def stalled(self, now: float, holders: Callable[[str], Iterable[str]]
                ) -> tuple[dict[str, int], int]:
        """Stalled paths per holder (``NO_HOLDER`` for none), and how many paths that is
        (a path with two holders counts for each, once in the total). ``holders(path)``
        is asked once per path, when it has waited ``bound``, and of at most ``lookups``
        paths per call."""
        due, left = [], self.lookups
        for path, wait in self._waits.items():
            if now - wait.since < self.bound:
                continue
            if wait.holders is None:
                if not left:
                    continue
                left -= 1
                wait.holders = tuple(sorted(holders(path))) or (NO_HOLDER,)
            due.append((wait.holders, 1))
        return count_stalled(due, self._delivered, now, self.bound)


def count_stalled(due: Iterable[tuple[Iterable[str], int]], delivered: Mapping[str, float],
                  now: float, bound: float) -> tuple[dict[str, int], int]:
    """``ContentWaits.stalled``'s answer from the paths that have waited ``bound``,
    given as (their holders, how many paths): those whose holders include one that
    delivered a push in the last ``bound`` seconds are still moving; the rest count
    for each of their holders, and once in the total."""
    per_peer: dict[str, int] = {}
    total = 0
    for group, paths in due:
        peers = tuple(group)
        if any(now - delivered.get(p, -bound) < bound for p in peers if p != NO_HOLDER):
            continue
        total += paths
        for p in peers:
            per_peer[p] = per_peer.get(p, 0) + paths
    return per_peer, total


@dataclass(frozen=True, slots=True)
class StalledQueue:
    paths: int
    since: float  # when the queue last moved


@dataclass
class QueueWatch:
    bound: float
    _moved: dict[str, tuple[float, int]] = field(default_factory=dict)  # peer -> (when, size)

    def update(self, now: float, pending: Mapping[str, int]) -> None:
        """The queue sizes now; an empty or shorter queue has moved."""
        for peer, size in pending.items():
            last = self._moved.get(peer)
            if last is None or size == 0 or size < last[1]:
                self._moved[peer] = (now, size)
            else:
                self._moved[peer] = (last[0], size)
        for peer in set(self._moved) - set(pending):
            del self._moved[peer]

    def stalled(self, now: float) -> dict[str, StalledQueue]:
        return {peer: StalledQueue(size, when) for peer, (when, size) in self._moved.items()
                if size and now - when >= self.bound}
