"""bench/dataplane.py's tables: both systems, the ratio meshsync / lsyncd, issue 12's targets."""

from __future__ import annotations

import statistics
from typing import Any

Figures = dict[str, float | None]
Target = tuple[str, float] | None  # "<=x" / ">=x": a ratio to lsyncd; "<=": meshsync alone

ROWS: list[tuple[str, str, str, Target]] = [
    ("new_p50_ms", "new 1 KiB file at both peers p50 (ms)", "{:.0f}", ("<=x", 1.2)),
    ("new_p95_ms", "new 1 KiB file at both peers p95 (ms)", "{:.0f}", None),
    ("burst_s", "{burst} x 4 KiB burst, all nodes (s)", "{:.2f}", ("<=x", 1.5)),
    ("delete_files_s", "delete them: files gone everywhere (s)", "{:.2f}", ("<=x", 1.5)),
    ("delete_dirs_s", "delete them: folders gone everywhere (s)", "{:.2f}", ("<=x", 1.5)),
    ("big_mib_s", "{big_mib} MiB file on all nodes (MiB/s)", "{:.1f}", (">=x", 1.0)),
    ("big_s", "  the same, from its close (s)", "{:.2f}", None),
    ("change_s", "1 MiB in-place change, all nodes (s)", "{:.2f}", None),
    ("change_lo_mib", "  loopback MiB per peer for it", "{:.1f}", None),
    ("cpu_small_s", "CPU of all nodes, {small} single files (s)", "{:.2f}", ("<=x", 2.0)),
    ("procs_per_file", "tasks started per file, whole machine", "{:.1f}", None),
    ("procs_per_file_ours", "  started by the nodes (own pid namespace)", "{:.1f}", None),
    ("orphans_small", "  orphans the bench reaped, all files", "{:.0f}", None),
    ("mem_main_mib", "peak memory, agents / lsyncds summed (MiB)", "{:.0f}", ("<=", 250.0)),
    ("mem_all_mib", "  every resident process summed (MiB)", "{:.0f}", None),
    ("idle_cpu_pct", "idle CPU, all nodes (% of a core)", "{:.2f}", None),
    ("idle_forks_per_s", "  tasks started/s when idle, whole machine", "{:.1f}", None),
]
SYSTEMS = ("meshsync", "lsyncd")


def met(target: Target, m: float | None, b: float | None) -> str:
    if target is None:
        return ""
    kind, value = target
    if m is None:
        return "not met (meshsync did not converge)"
    if kind == "<=":
        return "met" if m <= value else "not met"
    if b is None:
        return "met (lsyncd did not converge)"
    ok = m / b <= value if kind == "<=x" else m / b >= value
    return "met" if ok else "not met"


def table(title: str, figs: dict[str, Figures], labels: dict[str, Any],
          verdicts: dict[str, str] | None = None) -> None:
    """One table; ``verdicts`` (by key) instead of this table's own, for a summary."""
    print(f"\n{title}\n{'':<44}{'meshsync':>10}{'lsyncd d0':>11}{'ratio':>7}  target")
    for key, label, fmt, target in ROWS:
        m, b = figs["meshsync"].get(key), figs["lsyncd"].get(key)
        cells = [fmt.format(v) if v is not None else "n/c" for v in (m, b)]
        ratio = f"{m / b:.2f}" if m is not None and b else "-"
        want = "" if target is None else (f"{target[0][:2]} {target[1]:g}"
                                          + ("x" if target[0].endswith("x") else " MiB"))
        said = met(target, m, b) if verdicts is None else verdicts.get(key, "")
        row = f"{label.format(**labels):<44}{cells[0]:>10}{cells[1]:>11}{ratio:>7}"
        print(f"{row}  {want:<8} {said}".rstrip())
    print("  n/c: did not converge by the deadline, or not run (see the notes)")


def summary(runs: list[dict[str, Figures]], labels: dict[str, Any]) -> dict[str, Figures]:
    """The median of each figure over the runs that have it, and how many runs met each
    target; printed, and returned."""
    medians: dict[str, Figures] = {}
    for name in SYSTEMS:
        medians[name] = {}
        for key, *_ in ROWS:
            have = [v for run in runs if (v := run[name].get(key)) is not None]
            medians[name][key] = statistics.median(have) if have else None
    verdicts = {}
    for key, _, _, target in ROWS:
        if target is not None:
            n = sum(met(target, run["meshsync"].get(key), run["lsyncd"].get(key))
                    .startswith("met") for run in runs)
            verdicts[key] = f"met in {n} of {len(runs)} runs"
    table(f"median of {len(runs)} runs (a ratio: of the medians)", medians, labels, verdicts)
    return medians
