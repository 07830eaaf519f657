"""The nodes' disk over a run (issue 14): bytes in each keep area and in each index,
and the paths the index holds (tombstones included) with the tombstones collected so
far, sampled with the CPU and memory readings, for the report and its chart."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

MB = 1 << 20
KEEP_NAME = ".mesh-keep"


def tree_bytes(root: Path) -> int:
    """Bytes of the files under ``root`` (what vanishes during the walk is not counted)."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(folder) / name).lstat().st_size
    return total


Usage = tuple[int, int, int, int]  # keep bytes, index bytes, index paths, tombstones collected


def node_usage(data: Path, state: Path) -> Usage:
    """Of one meshsync node: keep area bytes, index bytes (state.db with its WAL), and
    from its status, the paths indexed and the tombstones collected since its start."""
    index = 0
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        with contextlib.suppress(OSError):
            index += (state / name).stat().st_size
    paths = collected = 0
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        doc = json.loads((state / "agent.json").read_text())
        paths = int(doc["index_size"])
        collected = int((doc.get("keep") or {}).get("tombstones_collected", 0))
    return tree_bytes(data / KEEP_NAME), index, paths, collected


class DiskLog:
    """Samples of (time, node -> (keep bytes, index bytes))."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, dict[str, Usage]]] = []

    def take(self, now: float, usage: dict[str, Usage]) -> None:
        self.samples.append((now, usage))

    def series(self, start: float) -> dict[str, Any] | None:
        """For the chart: seconds from the load's start, MB per node."""
        if not self.samples:
            return None
        nodes = sorted({n for _, u in self.samples for n in u})
        def column(k: int, scale: float = 1) -> dict[str, list[float]]:
            return {n: [round(u.get(n, (0, 0, 0, 0))[k] / scale, 2) for _, u in self.samples]
                    for n in nodes}

        return {"t": [round(t - start, 1) for t, _ in self.samples], "keep_mb": column(0, MB),
                "index_mb": column(1, MB), "paths": column(2), "collected": column(3)}

    def summary(self) -> dict[str, float] | None:
        """Peak and last of the largest node, in MB."""
        if not self.samples:
            return None
        keep = [max((x[0] for x in u.values()), default=0) / MB for _, u in self.samples]
        index = [max((x[1] for x in u.values()), default=0) / MB for _, u in self.samples]
        last = self.samples[-1][1]
        return {"keep_peak_mb": round(max(keep), 2), "keep_end_mb": round(keep[-1], 2),
                "index_peak_mb": round(max(index), 2), "index_end_mb": round(index[-1], 2),
                "index_paths_end": max((x[2] for x in last.values()), default=0),
                "tombstones_collected_end": max((x[3] for x in last.values()), default=0),
                "samples": len(self.samples)}
