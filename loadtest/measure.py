"""What the probes saw arrive, turned into latencies and throughput.

Every content the harness writes is unique, so the first time a node reports
a path (or a conflict copy of it) with a write's hash is when that write
reached it; the first time it reports the path gone after a delete is when the
delete did.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from loadtest.history import History, first_after
from loadtest.probe import original_of


@dataclass
class Seen:
    """Arrivals reported by the probes, and waiters for a path on a node."""

    puts: dict[tuple[int, str, str], float] = field(default_factory=dict)
    dels: dict[tuple[int, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    waiters: dict[tuple[int, str], asyncio.Event] = field(default_factory=dict)

    def on_event(self, node: int, doc: dict[str, Any]) -> None:
        ev = doc.get("ev")
        if ev not in ("put", "del"):
            return
        path: str = doc["p"]
        orig = original_of(path) or path
        if ev == "put":
            self.puts.setdefault((node, orig, doc["h"]), doc["t"])
        else:
            self.dels[(node, path)].append(doc["t"])
        waiter = self.waiters.pop((node, orig), None)
        if waiter is not None:
            waiter.set()

    async def change_on(self, node: int, path: str, within: float) -> None:
        """Until ``node`` reports a change of ``path`` (or a copy of it), at most ``within``
        seconds."""
        event = self.waiters.setdefault((node, path), asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), within)


def percentiles(samples: list[float]) -> dict[str, float | int | None]:
    if not samples:
        return {"p50": None, "p95": None, "p99": None, "max": None, "count": 0}
    s = sorted(samples)

    def at(q: float) -> float:
        return round(s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))], 1)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": round(s[-1], 1),
            "count": len(s)}


@dataclass
class Delivery:
    latency_ms: list[float]  # each write to each other node
    all_ms: list[float]  # each write to every other node
    arrivals: list[tuple[float, int]]  # (time, bytes) of each write at each other node
    complete: list[tuple[float, int]]  # (time it was everywhere, bytes) of each write


def delivery(history: History, seen: Seen, nodes: int) -> Delivery:
    lat: list[float] = []
    all_ms: list[float] = []
    arrivals: list[tuple[float, int]] = []
    complete: list[tuple[float, int]] = []
    for rec in history.records:
        times: list[float] = []
        for other in range(nodes):
            if other == rec.node:
                continue
            if rec.hash is not None:
                t = seen.puts.get((other, rec.path, rec.hash))
            else:
                t = first_after(sorted(seen.dels.get((other, rec.path), [])), rec.t0)
            if t is None:
                continue
            times.append(t)
            lat.append(max(0.0, t - rec.t) * 1000)
            arrivals.append((t, rec.changed))
        if len(times) == nodes - 1 and times:
            all_ms.append(max(0.0, max(times) - rec.t) * 1000)
            complete.append((max(times), rec.changed))
    return Delivery(lat, all_ms, arrivals, complete)


def timeline(arrivals: list[tuple[float, int]], start: float, peers: int,
             bin_s: float = 1.0) -> dict[str, list[float]]:
    """Writes (and MB) arriving per second, per peer, from ``start``."""
    if not arrivals:
        return {"t": [], "files_s": [], "mb_s": []}
    end = max(t for t, _ in arrivals)
    bins = max(1, math.ceil((end - start) / bin_s))
    files = [0.0] * bins
    mb = [0.0] * bins
    for t, size in arrivals:
        i = min(bins - 1, max(0, int((t - start) / bin_s)))
        files[i] += 1 / peers / bin_s
        mb[i] += size / 2**20 / peers / bin_s
    return {"t": [round(i * bin_s, 2) for i in range(bins)],
            "files_s": [round(x, 2) for x in files], "mb_s": [round(x, 3) for x in mb]}
