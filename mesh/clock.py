"""The wall clock in milliseconds, the unit of hybrid-logical-clock stamps and of every
time the agent stores or sends. The core takes it as an argument (``wall_ms``,
``now_ms``); this is where the agent reads it."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Milliseconds since the epoch, from the wall clock."""
    return time.time_ns() // 1_000_000
