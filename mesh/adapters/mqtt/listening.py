"""Silence measured in time this process could listen (issue 16, ten agents on two cores).

A link is judged silent after so many seconds without a packet: the client's liveness
check (``connection.py``) and the broker's keep-alive cut (``guard.py``). Both run on the
event loop, and while the loop is held (a long synchronous step, or a process starved of
CPU) nothing is read: the peer's packets wait in the socket, and when the loop runs again
a timer may pass its verdict before the reader has taken them. Among ten agents on two
cores, most links dropped that way, all of one node's at once, each drop a reconnect, a
TLS handshake and a resync more.

``free()`` is a clock that stands still while the loop is held: loop time minus the
stalls seen so far. A stall is a tick (every ``TICK`` s) that came more than ``STALL_S``
late; the time past its due is not counted. A verdict taken on this clock blames the
peer only for silence while we were listening. A peer that is gone is still found out
``liveness`` seconds of our own running time later, and a process killed or closed
ends its TCP connections at once anyway.
"""

from __future__ import annotations

import asyncio
import logging
import weakref

LOG = logging.getLogger(__name__)

TICK = 0.1  # seconds between the loop's ticks
STALL_S = 0.25  # a tick later than this was a stall: its time is not counted
REPORT_S = 2.0  # a stall this long is logged (what held the loop is for a profile)


class ListeningClock:
    """One per event loop (``of``): seconds the loop was free to run."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._stalled = 0.0
        self._due = loop.time() + TICK
        self.stalls = 0  # how many were seen
        loop.call_at(self._due, self._tick)

    def free(self) -> float:
        """Loop time minus every stall seen so far, one under way included."""
        self._sample()
        return self._loop.time() - self._stalled

    def _sample(self) -> None:
        late = self._loop.time() - self._due
        if late > STALL_S:
            self._stalled += late
            self.stalls += 1
            self._due += late  # counted once, whether the tick or a verdict saw it first
            if late >= REPORT_S:
                LOG.warning("the event loop was held for %.1f s: silence in that time "
                            "is not held against any link", late)

    def _tick(self) -> None:
        self._sample()
        if self._loop.is_closed():
            return
        self._due = self._loop.time() + TICK
        self._loop.call_at(self._due, self._tick)


_CLOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ListeningClock] = (
    weakref.WeakKeyDictionary())


def of(loop: asyncio.AbstractEventLoop | None = None) -> ListeningClock:
    """The running loop's clock (made and started on first use)."""
    loop = loop or asyncio.get_running_loop()
    clock = _CLOCKS.get(loop)
    if clock is None:
        clock = _CLOCKS[loop] = ListeningClock(loop)
    return clock
