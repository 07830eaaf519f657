"""PNG charts of a run (matplotlib, no display): latency CDF per profile,
throughput over time, and meshsync beside the baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

Block = dict[str, Any]
LABEL = {"meshsync": "meshsync", "baseline": "lsyncd + rsync"}
COLOR = {"meshsync": "tab:blue", "baseline": "tab:orange"}


def draw(runs: dict[str, dict[str, Block]], out: Path) -> list[str]:
    charts = [_cdf(runs, out / "latency_cdf.png"), _throughput(runs, out / "throughput.png"),
              _beside(runs, out / "comparison.png")]
    if any(b.get("disk") for run in runs.values() for b in run.values()):
        charts.append(_disk(runs, out / "disk.png"))
    return charts


def _grid(n: int) -> tuple[Any, list[Any]]:
    fig, axes = plt.subplots(n, 1, figsize=(8, 3.2 * n), squeeze=False)
    return fig, [a[0] for a in axes]


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _cdf(runs: dict[str, dict[str, Block]], path: Path) -> str:
    fig, axes = _grid(len(runs))
    for ax, (profile, run) in zip(axes, runs.items(), strict=True):
        for system, block in run.items():
            xs = block["latency_samples_ms"]
            if xs:
                ys = [(k + 1) / len(xs) for k in range(len(xs))]
                ax.step(xs, ys, where="post", color=COLOR[system], label=LABEL[system])
        ax.set_xscale("log")
        ax.set_xlabel("write reaches a peer (ms, log scale)")
        ax.set_ylabel("fraction of deliveries")
        ax.set_title(f"{profile}: propagation latency CDF")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    return _save(fig, path)


def _throughput(runs: dict[str, dict[str, Block]], path: Path) -> str:
    fig, axes = _grid(len(runs))
    for ax, (profile, run) in zip(axes, runs.items(), strict=True):
        for system, block in run.items():
            tl = block["timeline"]
            ax.plot(tl["t"], tl["files_s"], color=COLOR[system], label=LABEL[system])
            ax.axvline(block["load_s"], color=COLOR[system], linestyle=":", alpha=0.6)
        ax.set_xlabel("seconds from the start of the load (dotted: load ends)")
        ax.set_ylabel("writes arriving per peer per s")
        ax.set_title(f"{profile}: throughput over time")
        ax.grid(True, alpha=0.3)
        ax.legend()
    return _save(fig, path)


def _disk(runs: dict[str, dict[str, Block]], path: Path) -> str:
    """meshsync's keep area and index on each node over the run (issue 14)."""
    panels = (("keep_mb", "keep area", "MB"), ("index_mb", "index (with its WAL)", "MB"),
              ("paths", "paths indexed (tombstones included)", "paths"),
              ("collected", "tombstones collected since start", "tombstones"))
    fig, axes = plt.subplots(len(runs), len(panels), figsize=(5 * len(panels), 3.4 * len(runs)),
                             squeeze=False)
    for row, (profile, run) in zip(axes, runs.items(), strict=True):
        block = run.get("meshsync") or {}
        disk = block.get("disk")
        for ax, (key, what, unit) in zip(row, panels, strict=True):
            if disk and key in disk:
                for node, ys in disk[key].items():
                    ax.plot(disk["t"], ys, label=node)
                ax.axvline(block["load_s"], color="grey", linestyle=":", alpha=0.6)
                ax.legend()
            ax.set_xlabel("s from the load's start (dotted: its end)")
            ax.set_ylabel(unit)
            ax.set_title(f"{profile}: {what}", fontsize=10)
            ax.grid(True, alpha=0.3)
    return _save(fig, path)


METRICS: list[tuple[str, Any]] = [
    ("latency p50 (ms)", lambda b: b["latency_ms"]["p50"]),
    ("latency p99 (ms)", lambda b: b["latency_ms"]["p99"]),
    ("converge (s)", lambda b: b["converge_s"]),
    ("CPU, all nodes (s)", lambda b: sum(b["cpu_s"].values())),
    ("peak memory of a node (MB)", lambda b: max(b["peak_rss_mb"].values(), default=0)),
    ("lost writes", lambda b: b["lost_writes"]),
]


def _beside(runs: dict[str, dict[str, Block]], path: Path) -> str:
    fig, axes = plt.subplots(len(runs), len(METRICS), figsize=(2.6 * len(METRICS),
                                                              2.8 * len(runs)), squeeze=False)
    for row, (profile, run) in zip(axes, runs.items(), strict=True):
        for ax, (title, get) in zip(row, METRICS, strict=True):
            systems = list(run)
            values = [get(run[s]) for s in systems]
            bars = ax.bar([LABEL[s] for s in systems], [v or 0 for v in values],
                          color=[COLOR[s] for s in systems])
            for bar, v in zip(bars, values, strict=True):
                ax.annotate("n/a" if v is None else f"{v:.3g}",
                            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
            ax.set_title(f"{profile}: {title}", fontsize=9)
            ax.tick_params(axis="x", labelsize=7)
    return _save(fig, path)
