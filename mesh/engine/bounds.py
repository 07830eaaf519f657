"""Before a node starts: state a peer poisoned before issue 13's bounds were checked.

An index written before the bounds (``mesh.core.admit``) may hold what they now refuse
(reserved paths, counters that overflow, clock stamps far ahead); such state made the
agent exit at every start. It is forgotten once, and the persisted hybrid clock is not
trusted when a peer pushed it too far ahead."""

from __future__ import annotations

import logging

from mesh.clock import now_ms
from mesh.core import admit
from mesh.core.paths import reserved
from mesh.core.vclock import hlc_pack
from mesh.store.index import Index

LOG = logging.getLogger("mesh.engine.node")
PURGED = 1  # meta "purged": the state was purged of what issue 13's bounds refuse


def purge_once(index: Index, me: str, limits: admit.Limits) -> None:
    """Forget, once, what the bounds now refuse from peers; the paths are scanned again."""
    if index.get_meta("purged") == PURGED:
        return
    now = now_ms()
    counts = index.purge(
        me, lambda path: reserved(path) is not None,
        lambda e: admit.refusal(e, now, limits) is not None,
        lambda v: admit.vector_refusal(v, limits) is not None)
    index.set_meta("purged", PURGED)
    if any(counts.values()):
        LOG.warning("state: forgot %s: rows a peer sent before their bounds were "
                    "checked (reserved names, overflowing counters, clocks far ahead); "
                    "the paths are scanned again", ", ".join(
                        f"{n} {table}" for table, n in counts.items() if n))


def clock_at_start(index: Index, limits: admit.Limits) -> int:
    """The persisted hybrid clock, unless a peer pushed it further ahead of the wall
    clock than the maximum skew (then the wall clock: a clock at 2**63-3 made every
    write fail, at every start)."""
    clock = int(index.get_meta("clock", 0))
    now = now_ms()
    why = admit.clock_refusal(clock, now, limits)
    if why is None:
        return clock
    LOG.warning("state: the persisted %s; starting from the wall clock", why)
    index.set_meta("clock", hlc_pack(now))
    return hlc_pack(now)
