"""The nodes' disk over a run (issue 14): bytes in each keep area and in each index,
sampled with the CPU and memory readings, for the report and its chart."""

from __future__ import annotations

import contextlib
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


def node_usage(data: Path, state: Path) -> tuple[int, int]:
    """(keep area bytes, index bytes: state.db with its WAL) of one meshsync node."""
    index = 0
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        with contextlib.suppress(OSError):
            index += (state / name).stat().st_size
    return tree_bytes(data / KEEP_NAME), index


class DiskLog:
    """Samples of (time, node -> (keep bytes, index bytes))."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, dict[str, tuple[int, int]]]] = []

    def take(self, now: float, usage: dict[str, tuple[int, int]]) -> None:
        self.samples.append((now, usage))

    def series(self, start: float) -> dict[str, Any] | None:
        """For the chart: seconds from the load's start, MB per node."""
        if not self.samples:
            return None
        nodes = sorted({n for _, u in self.samples for n in u})
        return {"t": [round(t - start, 1) for t, _ in self.samples],
                "keep_mb": {n: [round(u.get(n, (0, 0))[0] / MB, 2) for _, u in self.samples]
                            for n in nodes},
                "index_mb": {n: [round(u.get(n, (0, 0))[1] / MB, 2) for _, u in self.samples]
                             for n in nodes}}

    def summary(self) -> dict[str, float] | None:
        """Peak and last of the largest node, in MB."""
        if not self.samples:
            return None
        keep = [max((k for k, _ in u.values()), default=0) / MB for _, u in self.samples]
        index = [max((i for _, i in u.values()), default=0) / MB for _, u in self.samples]
        return {"keep_peak_mb": round(max(keep), 2), "keep_end_mb": round(keep[-1], 2),
                "index_peak_mb": round(max(index), 2), "index_end_mb": round(index[-1], 2),
                "samples": len(self.samples)}
