"""The keep area's and the index's collector (issue 14): one round every few seconds,
at a bounded cost, on the agent's loop.

A round, with no await inside (so no restore, landing or scan runs in between):

1. the peers whose links are up are *heard*; every other one misses the round's
   time (``KeptLog.heard``). A peer that missed ``forget_after`` of this node's
   running time is *forgotten*: it no longer holds tombstones back;
2. up to ``batch`` tombstones, from where the last round stopped, are dropped when
   ``retention.tombstone_due``; the replica's horizon rises to the largest stamp;
3. the keep area: what ``retention.needed`` keeps, the oldest kept rows past their
   retention (and the oldest of all while over the cap), every orphan object; the
   rows ``retention.plan`` drops are deleted (committed), then the objects no row
   keeps are removed. One line says what was freed.

A round's cost is bounded by ``batch`` rows and tombstones plus a listing of the
objects; while more than ``MAX_TARGETS`` paths wait for content (a catch-up),
the keep area is left for later rounds: computing what they need would read them all.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from mesh import clock
from mesh.core import retention
from mesh.core.retention import Candidate, Plan, Policy
from mesh.engine.keep import KeepArea
from mesh.errors import MeshError
from mesh.store.index import Index
from mesh.store.kept import KeptLog, KeptRow

LOG = logging.getLogger("mesh.engine.keep")

MAX_TARGETS = 50_000
HORIZON_KEY = "horizon"


@dataclass(frozen=True, slots=True)
class KeepLimits:
    keep_for_s: float  # 0: as long as safety needs
    keep_max: tuple[float, str]  # (n, "bytes" | "%"): the cap; (0, "bytes") means none
    forget_after_s: float  # our running time without hearing a peer before it is forgotten
    tombstone_age_s: float  # the maximum clock skew: a tombstone younger stays

    def cap_bytes(self, volume_bytes: int) -> int | None:
        n, unit = self.keep_max
        if n <= 0:
            return None
        return round(n * volume_bytes / 100) if unit == "%" else int(n)


@dataclass
class KeepStats:
    """What the metrics and the status show."""

    bytes: int = 0
    objects: int = 0
    held_bytes: int = 0
    cap_bytes: int | None = None
    rows: int = 0
    freed_bytes: int = 0  # totals since start
    freed_objects: int = 0
    tombstones: int = 0
    forgotten: list[str] = field(default_factory=list)

    def doc(self) -> dict[str, object]:
        return {"bytes": self.bytes, "objects": self.objects, "held_bytes": self.held_bytes,
                "cap_bytes": self.cap_bytes, "versions": self.rows,
                "freed_bytes": self.freed_bytes, "freed_objects": self.freed_objects,
                "tombstones_collected": self.tombstones, "forgotten_peers": self.forgotten}


class Collector:
    def __init__(self, *, index: Index, keep: KeepArea, kept: KeptLog,
                 set_horizon: Callable[[int], None], limits: KeepLimits,
                 live_peers: Callable[[], Iterable[str]],
                 seen_peers: Callable[[], Iterable[str]] = tuple, every: float = 5.0,
                 batch: int = 2000) -> None:
        self.index = index
        self.keep = keep
        self.kept = kept
        self.set_horizon = set_horizon
        self.limits = limits
        self.live_peers = live_peers
        self.seen_peers = seen_peers  # every peer heard from since start, if only briefly
        self.every = every
        self.batch = batch
        self.stats = KeepStats()
        self._cursor = ""  # the last tombstone path looked at
        self._last: float | None = None
        # Peers that announced before this release recorded whom it heard.
        kept.heard((), index.announcing_peers(), clock.now_ms(), 0)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:
                self.round(clock.now_ms())
            except (OSError, ValueError, MeshError) as err:  # a volume in trouble: next round
                LOG.warning("keep area: collection failed: %s", err)

    def round(self, now_ms: int) -> Plan:
        now = time.monotonic()
        elapsed = 0 if self._last is None else round((now - self._last) * 1000)
        self._last = now
        self.kept.heard(self.live_peers(), self.seen_peers(), now_ms, elapsed)
        known, forgotten = self.kept.peers(round(self.limits.forget_after_s * 1000))
        if forgotten != self.stats.forgotten:
            for peer in sorted(set(forgotten) - set(self.stats.forgotten)):
                LOG.warning("%s not heard for %s of our running time: forgotten, its "
                            "acknowledgements no longer awaited (a version it still holds "
                            "of what was deleted since comes back as a delete)", peer,
                            _span(self.limits.forget_after_s))
            self.stats.forgotten = forgotten
        self._tombstones(known, [*known, *forgotten], now_ms)
        return self._collect(known, now_ms)

    # --- tombstones -------------------------------------------------------------------

    def _tombstones(self, known: list[str], everyone: list[str], now_ms: int) -> None:
        found = self.index.tombstones(self._cursor, self.batch)
        self._cursor = found[-1].path if len(found) == self.batch else ""
        horizon = int(self.index.get_meta(HORIZON_KEY, 0))
        dropped = 0
        with self.index.batch():
            for tomb in found:
                st = self.index.state(tomb.path)
                peers = [self.index.peer_vector(p, tomb.path) for p in known]
                if retention.tombstone_due(st.disk, st.target, peers, now_ms,
                                           round(self.limits.tombstone_age_s * 1000)):
                    assert st.disk is not None
                    horizon = max(horizon, retention.horizon_of(st.disk))
                    self.index.forget(tomb.path, everyone)
                    dropped += 1
            if dropped:
                self.index.set_meta(HORIZON_KEY, horizon)
        if dropped:
            self.set_horizon(horizon)
            self.stats.tombstones += dropped
            LOG.info("collected %d tombstones every known peer acknowledged", dropped)

    # --- the keep area ----------------------------------------------------------------

    def _collect(self, known: list[str], now_ms: int) -> Plan:
        objects = self.keep.objects_held()
        sizes = {h: size for h, (size, _) in objects.items()}
        cap = self.limits.cap_bytes(_volume_bytes(self.keep))
        self.stats.cap_bytes = cap
        self.stats.rows = self.kept.count()
        if self.index.targets_over(MAX_TARGETS):
            self._measure(sizes, None)
            return Plan((), (), 0, 0, sum(sizes.values()))
        keep_for_ms = round(self.limits.keep_for_s * 1000)
        over = cap is not None and sum(sizes.values()) > cap
        rows = {r.id: r for r in self.kept.oldest(self.batch, None if over
                                                  else now_ms - keep_for_ms)}
        # Rule 1 is asked only about what this round could remove: nothing, most rounds
        # of a join, which then need not read the targets (50,000 rows, 1 s a round).
        among = {*objects, *(r.entry.hash for r in rows.values() if r.entry.hash)}
        need = retention.needed(self.index.targets_naming(among), self.index.unwritten_losers(),
                                among) if among else set()
        candidates = [self._judge(r, known) for r in rows.values()]
        rows_of = self.kept.rows_of(h for h in objects)
        candidates += [Candidate(None, h, size, ctime, True)
                       for h, (size, ctime) in objects.items() if h not in rows_of]
        policy = Policy(keep_for_ms, cap)
        result = retention.plan(candidates, rows_of, sizes, need, policy, now_ms)
        if result.rows:
            self.kept.delete(result.rows)  # committed before any object goes
        for digest in result.objects:
            self.keep.remove(digest)
        if result.objects:
            self.stats.freed_bytes += result.freed
            self.stats.freed_objects += len(result.objects)
            LOG.info("keep area: freed %s in %d objects (%d kept versions dropped); "
                     "%s left, %s of it needed by pending restores or conflict copies",
                     _bytes(result.freed), len(result.objects), len(result.rows),
                     _bytes(result.total - result.freed), _bytes(result.held))
        for digest in result.objects:
            sizes.pop(digest, None)
        self._measure(sizes, result.held)
        self.stats.rows = self.kept.count()
        return result

    def _judge(self, row: KeptRow, known: list[str]) -> Candidate:
        disk = self.index.state(row.path).disk
        peers = [self.index.peer_vector(p, row.path) for p in known]
        assert row.entry.hash is not None
        return Candidate(row.id, row.entry.hash, row.entry.size, row.kept_ms,
                         retention.superseded(row.vector, None if disk is None
                                              else disk.vector, peers))

    def _measure(self, sizes: dict[bytes, int], held: int | None) -> None:
        self.stats.bytes = sum(sizes.values())
        self.stats.objects = len(sizes)
        if held is not None:
            self.stats.held_bytes = held


def _volume_bytes(keep: KeepArea) -> int:
    fs = os.statvfs(keep.objects)
    return fs.f_blocks * fs.f_frsize


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _span(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:g} d"
    return f"{seconds:g} s"


class KeepMetrics:
    """The collector's numbers for Prometheus (a custom collector: read at scrape time)."""

    def __init__(self, stats: KeepStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        yield GaugeMetricFamily("mesh_keep_object_bytes", "Bytes of the keep area's objects "
                                "(kept versions, staged content), as of the collector's last "
                                "round.", value=s.bytes)
        yield GaugeMetricFamily("mesh_keep_objects", "Objects in the keep area.",
                                value=s.objects)
        yield GaugeMetricFamily("mesh_keep_held_bytes", "Bytes of objects a pending restore "
                                "or conflict copy needs: never collected.", value=s.held_bytes)
        yield GaugeMetricFamily("mesh_keep_versions", "Kept versions recorded (`mesh "
                                "versions`).", value=s.rows)
        if s.cap_bytes is not None:
            yield GaugeMetricFamily("mesh_keep_cap_bytes", "The keep area's cap (--keep-max).",
                                    value=s.cap_bytes)
        yield CounterMetricFamily("mesh_keep_freed_bytes", "Bytes the collector removed from "
                                  "the keep area.", value=s.freed_bytes)
        yield CounterMetricFamily("mesh_tombstones_collected", "Tombstones dropped from the "
                                  "index once every known peer acknowledged them.",
                                  value=s.tombstones)
        yield GaugeMetricFamily("mesh_peers_forgotten", "Peers not heard for --forget-after, "
                                "whose acknowledgements are no longer awaited.",
                                value=len(s.forgotten))
