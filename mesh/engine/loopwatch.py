"""Where the event loop is held (issue 16): a thread that logs the loop thread's stack
once the loop has not run for ``HELD_S``.

Everything the agent serves (links, broker, tunnel, gate, control socket) waits while
one step of the loop runs; a step of seconds drops links. The listening clock
(``mesh.adapters.mqtt.listening``) keeps such a stall from counting against the
peers and logs how long it was, after it ended; this says what it was, while it
lasts. Among ten nodes on two cores it named the two causes left (a staging folder
removed on the loop, a push's end in one transaction) in one run. The thread only
reads the loop thread's frame; one line per hold.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback

LOG = logging.getLogger(__name__)

HELD_S = 2.0  # a hold this long is logged, with where the loop thread is
TICK = 0.25  # how often the loop says it runs, and the thread looks
FRAMES = 12  # innermost frames logged


class LoopWatch:
    """Create and ``start`` on the loop's thread; ``stop`` before the loop closes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, held_s: float = HELD_S) -> None:
        self.held_s = held_s
        self.reported = 0  # holds logged
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        self._stopped = threading.Event()
        self._handle: asyncio.TimerHandle | None = None
        self._thread = threading.Thread(target=self._watch, name="loopwatch", daemon=True)

    def start(self) -> None:
        self._tick()
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._handle is not None:
            self._handle.cancel()
        self._thread.join(timeout=2 * TICK)

    def _tick(self) -> None:
        self._beat = time.monotonic()
        if not self._stopped.is_set():
            self._handle = self._loop.call_later(TICK, self._tick)

    def _watch(self) -> None:
        logged = 0.0  # the beat whose hold was logged
        while not self._stopped.wait(TICK):
            beat = self._beat
            held = time.monotonic() - beat
            if held < self.held_s or beat == logged:
                continue
            frame = sys._current_frames().get(self._loop_thread)
            where = "".join(traceback.format_stack(frame)[-FRAMES:]) if frame else "?\n"
            LOG.warning("the event loop has been held for %.1f s, in:\n%s", held,
                        where.rstrip("\n"))
            logged = beat
            self.reported += 1
