"""The report directory: report.json, report.md, samples.json and PNG charts; and
the summary table on the terminal (the same rows as the Markdown's)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loadtest.measure import percentiles

Block = dict[str, Any]
SYSTEMS = ("meshsync", "baseline")
PER_RUN = ("timeline", "latency_samples_ms", "disk")  # kept out of the aggregate and report.json


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, dict):
        return ", ".join(f"{v:,} {k}" for k, v in value.items()) or "none"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:,.2f}{unit}" if value < 100 else f"{value:,.0f}{unit}"
    return f"{value:,}{unit}" if isinstance(value, int) else f"{value}{unit}"


def _lat(key: str, q: str) -> Callable[[Block], Any]:
    return lambda b: b[key][q]


ROWS: list[tuple[str, Callable[[Block], Any], str]] = [
    ("converged", lambda b: b["converged"], ""),
    ("idle afterwards (meshsync: mesh health --max-lag 0)", lambda b: b.get("idle"), ""),
    ("lost writes", lambda b: b["lost_writes"], ""),
    ("writes some node lacks (not converged)", lambda b: b.get("writes_not_everywhere"), ""),
    ("deletes undone (file back)", lambda b: b["resurrected_deletes"], ""),
    ("paths holding none of their latest writes", lambda b: b["stale_paths"], ""),
    ("conflicts expected / logged", lambda b: f"{b['conflicts_expected']} / "
     f"{b['conflicts_logged']}", ""),
    ("expected conflicts not logged", lambda b: b["conflicts_missing"], ""),
    ("conflicts logged between writes that saw each other",
     lambda b: b["conflicts_unexpected"], ""),
    ("content no write made at its path (invented)", lambda b: b.get("invented_content"), ""),
    ("conflict logs identical on every node", lambda b: b.get("conflict_logs_identical"), ""),
    ("an empty node joined: same tree, nothing else changed",
     lambda b: (b.get("join") or {}).get("ok"), ""),
    ("kills timed on a push / push cut short", lambda b: _kills(b), ""),
    ("write to one peer, p50", _lat("latency_ms", "p50"), " ms"),
    ("write to one peer, p95", _lat("latency_ms", "p95"), " ms"),
    ("write to one peer, p99", _lat("latency_ms", "p99"), " ms"),
    ("write to one peer, max", _lat("latency_ms", "max"), " ms"),
    ("write to every peer, p50 / p99",
     lambda b: f"{_fmt(b['latency_all_ms']['p50'])} / {_fmt(b['latency_all_ms']['p99'])} ms", ""),
    ("writes delivered everywhere per s", lambda b: b["throughput_files_s"], ""),
    ("MB delivered everywhere per s", lambda b: b["throughput_mb_s"], ""),
    ("converged after the load", lambda b: b["converge_s"], " s"),
    ("bytes on the wire / bytes changed / peer", lambda b: b["wire_per_changed_per_peer"], " x"),
    ("CPU seconds, all nodes", lambda b: round(sum(b["cpu_s"].values()), 1), " s"),
    ("peak memory of one node", lambda b: max(b["peak_rss_mb"].values(), default=None), " MB"),
    ("keep area of the largest node, peak / at the end", lambda b: _disk(b, "keep"), ""),
    ("index of the largest node, peak / at the end", lambda b: _disk(b, "index"), ""),
    ("paths indexed / tombstones collected, largest node at the end",
     lambda b: (b.get("disk_mb") or {}).get("index_paths_end") and
     f"{b['disk_mb']['index_paths_end']:,} / {b['disk_mb']['tombstones_collected_end']:,}", ""),
]


def _disk(b: Block, what: str) -> str | None:
    mb = b.get("disk_mb")
    if not mb:
        return None
    return f"{mb[what + '_peak_mb']:,.1f} / {mb[what + '_end_mb']:,.1f} MB"


def _kills(b: Block) -> str | None:
    kills = b.get("kills_during_push")
    if not kills:
        return None
    return f"{len(kills)} / {sum(1 for k in kills if k['in_flight'])}"


def rows(report: dict[str, Any]) -> list[list[str]]:
    systems = [s for s in SYSTEMS if s in report["blocks"]]
    return [[label, *(_fmt(get(report["blocks"][s]), unit) for s in systems)]
            for label, get, unit in ROWS]


def aggregate(blocks: list[Block]) -> Block:
    """One block for several profiles: sums, worst cases, pooled latencies."""
    if len(blocks) == 1:
        return {k: v for k, v in blocks[0].items() if k not in PER_RUN}
    pooled = [x for b in blocks for x in b["latency_samples_ms"]]
    summed = ("lost_writes", "resurrected_deletes", "stale_paths", "conflicts_expected",
              "conflicts_logged", "conflicts_missing", "conflicts_unexpected", "writes",
              "bytes_changed", "conflict_copies")
    out: Block = {"system": blocks[0]["system"],
                  "converged": all(b["converged"] for b in blocks),
                  "idle": all(b.get("idle") for b in blocks),
                  "converge_s": max((b["converge_s"] for b in blocks
                                     if b["converge_s"] is not None), default=None),
                  "latency_ms": percentiles(pooled),
                  "latency_all_ms": blocks[0]["latency_all_ms"] if len(blocks) == 1 else
                  {"p50": None, "p95": None, "p99": None, "max": None, "count": 0},
                  "throughput_files_s": None, "throughput_mb_s": None,
                  "wire_per_changed_per_peer": None}
    for k in summed:
        out[k] = sum(b[k] for b in blocks)
    out["invented_content"] = sum(b.get("invented_content") or 0 for b in blocks)
    out["conflict_logs_identical"] = all(b.get("conflict_logs_identical", True) for b in blocks)
    joins = [b["join"] for b in blocks if b.get("join")]
    out["join"] = {"ok": all(j.get("ok") for j in joins)} if joins else None
    out["cpu_s"] = {n: round(sum(b["cpu_s"].get(n, 0) for b in blocks), 2)
                    for n in blocks[0]["cpu_s"]}
    out["peak_rss_mb"] = {n: max(b["peak_rss_mb"].get(n, 0) for b in blocks)
                          for n in blocks[0]["peak_rss_mb"]}
    return out


def machine() -> dict[str, Any]:
    def first(path: str, key: str) -> str | None:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip() if ":" in line else line.split("=", 1)[1]
        except OSError:
            return None
        return None

    def version(argv: list[str]) -> str | None:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        text = (out.stdout or out.stderr).strip().splitlines()
        return text[0] if text else None

    mem = first("/proc/meminfo", "MemTotal")
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": first("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "memory_gb": round(int(mem.split()[0]) / 2**20, 1) if mem else None,
        "kernel": platform.release(),
        "os": (first("/etc/os-release", "PRETTY_NAME") or "").strip('"') or None,
        "python": platform.python_version(),
        "rsync": version(["rsync", "--version"]),
        "lsyncd": version(["lsyncd", "--version"]),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        **meshsync_source(),
    }


def meshsync_source() -> dict[str, Any]:
    """Which meshsync ran: the commit of the ``mesh`` package's checkout, and whether its
    files differed from that commit."""
    import mesh

    folder = Path(mesh.__file__).parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True,
                                 text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--", ".", "../lsyncd")
    return {"mesh": str(folder), "commit": git("rev-parse", "--short", "HEAD"),
            "mesh_modified": None if status is None else bool(status)}


META = ("profiles", "profile", "target", "nodes", "seed", "duration", "rate", "command",
        "machine")


def render(out: Path) -> None:
    """Write report.md and the charts again from report.json and samples.json."""
    doc = json.loads((out / "report.json").read_text())
    samples = json.loads((out / "samples.json").read_text())
    runs = {p: {s: b | {"latency_samples_ms": samples[p][s]} for s, b in r.items()}
            for p, r in doc["runs"].items()}
    systems = [s for s in SYSTEMS if s in next(iter(runs.values()))]
    report = {k: doc[k] for k in META} | {
        "blocks": {s: aggregate([runs[p][s] for p in doc["profiles"]]) for s in systems}}
    write(report, runs, out)


def write(report: dict[str, Any], runs: dict[str, dict[str, Block]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    samples = {p: {s: b["latency_samples_ms"] for s, b in r.items()} for p, r in runs.items()}
    (out / "samples.json").write_text(json.dumps(samples))
    doc = {k: v for k, v in report.items() if k != "blocks"}
    doc |= report["blocks"]["meshsync"]
    if "baseline" in report["blocks"]:
        doc["baseline"] = report["blocks"]["baseline"]
    doc["runs"] = {p: {s: {k: v for k, v in b.items() if k != "latency_samples_ms"}
                       for s, b in r.items()} for p, r in runs.items()}
    (out / "report.json").write_text(json.dumps(doc, indent=2) + "\n")
    from loadtest import charts

    pngs = charts.draw(runs, out)
    (out / "report.md").write_text(markdown(report, runs, pngs))


FINDINGS = [
    ("resurrected", "deleted (the delete saw every write), yet there after convergence"),
    ("stale", "holding none of their latest writes' contents"),
    ("conflicts_unexpected_paths", "conflict logged between writes that saw each other"),
]
DEFINITIONS = """\
## How to read this

- Every write has unique content. A write on node X *saw* the writes of its path whose
  content X held (at the path or in a conflict copy) when it wrote; the harness makes a
  node wait (up to `--wait` s) until it holds a path's latest writes before changing it.
- **lost**: no later write saw it and no node holds its content at its path or in a
  conflict copy of it after convergence (the keep area does not count; a rename is a
  delete of the old path that saw the content and a write of the new one; a folder
  removed is a delete of each file the node held in it). **writes some node lacks**:
  the same, held by some nodes only (not converged). **deletes undone**: a path whose
  latest writes are all deletes, present after convergence. **invented**: a file
  whose content no write made at its path (or, for a conflict copy, at the path it is
  a copy of). **conflicts expected**: for k writes of a path that are pairwise
  concurrent (neither saw the other), k - 1 losers; **logged**: the distinct losing
  writes in the union of the nodes' conflict logs (conflicts on folders are not tied
  to writes: "unmatched"). **conflict logs identical**: every node logged the same
  conflicts (path, loser, its content, id).
- **an empty node joined** (faults): after convergence one more agent starts with an
  empty folder; once every node holds the same tree again, the new node's must be
  the one the others held before, and theirs and their conflict logs unchanged.
- **kills timed on a push** (faults): a 3-8 MiB file written, then its sender or
  receiver killed once the link carried 1 MiB more; "cut short": the receiver did
  not have the file when the kill came.
- **latency**: from the end of a write until a peer's probe (inotify) saw its content,
  per peer; "every peer": until the last one. **throughput**: writes that reached
  every peer, per second from the start of the load to the last arrival.
- **converged**: every node's tree (hidden names excepted) identical in two snapshots in
  a row; the time counts from the end of the load to the first of those snapshots.
  **idle**: then, every agent said it had nothing left to do (what `mesh health
  --max-lag 0` checks) within 30 s.
- **wire**: bytes through the harness's per-link proxies (meshsync: MQTT and the TLS
  tunnel; baseline: rsync's daemon protocol), over bytes changed times peers.
- **CPU, memory**: each node's processes with their descendants (agent, lsyncd, rsync,
  gate; baseline: lsyncd and the rsync daemon), from /proc, during load and
  convergence; memory is the peak of their summed RSS (sampled every second).
"""


def markdown(report: dict[str, Any], runs: dict[str, dict[str, Block]], pngs: list[str]) -> str:
    systems = [s for s in SYSTEMS if s in report["blocks"]]
    names = {"meshsync": "meshsync", "baseline": "lsyncd + rsync"}
    m = report["machine"]
    lines = [
        f"# Load test: {', '.join(report['profiles'])}",
        "",
        f"`{report['command']}`",
        "",
        f"{report['target']} target, {report['nodes']} nodes, seed {report['seed']}; "
        f"{m['date']} on {m['cpu']} ({m['cores']} cores, {m['memory_gb']} GB), "
        f"kernel {m['kernel']}, {m['os']}, Python {m['python']}, commit {m['commit']}; "
        f"load average at start {m['load_average']}.",
        "",
        "| | " + " | ".join(names[s] for s in systems) + " |",
        "| --- | " + " | ".join("---" for _ in systems) + " |",
        *("| " + " | ".join(r) + " |" for r in rows(report)),
        "",
    ]
    for profile, run in runs.items():
        lines += [f"## {profile}", ""]
        for s, b in run.items():
            lines.append(
                f"- **{names[s]}**: {b['writes']} writes (ops: {_fmt(b['ops'])}) in "
                f"{b['load_s']} s "
                f"({b['offered_ops_s']} ops/s); {b['forced_writes']} written before their node "
                f"held the path; skipped: {_fmt(b['skipped_ops'])}; issue lag p99 "
                f"{_fmt(b['issue_lag_ms']['p99'])} ms; {_fmt(b['bytes_changed'])} B changed, "
                f"{_fmt(b['wire_bytes'])} B on the wire; conflict copies {b['conflict_copies']}; "
                f"conflicts unexpected {b['conflicts_unexpected']}, unmatched "
                f"{b['conflicts_unmatched']}, logged per node: "
                f"{_fmt(b['conflicts_logged_per_node'])}.")
            for lost in b["lost"]:
                lines.append(f"  - lost: write {lost['wid']} ({lost['kind']}) of "
                             f"`{lost['path']}` on {lost['node']} at {lost['t_s']} s")
            for key, what in FINDINGS:
                if b.get(key):
                    lines.append(f"  - {what}: " + ", ".join(f"`{p}`" for p in b[key]))
            for inv in b.get("invented") or []:
                lines.append(f"  - invented: `{inv['path']}` on {inv['node']} "
                             f"({inv['content']})")
            lines += _extra_md(b)
        lines.append("")
    lines += [f"![{p}]({p})" for p in pngs]
    return "\n".join([*lines, "", DEFINITIONS]) + "\n"


def _extra_md(b: Block) -> list[str]:
    """The faults, the join and the findings' path histories, when there are any."""
    lines: list[str] = []
    if b.get("faults"):
        lines += ["", "Faults (s from the start of the load):", ""]
        lines += [f"- {fault_text(e)}" for e in b["faults"]]
    for k in b.get("kills_during_push") or []:
        lines.append(f"- kill of the {k['side']} {k['killed']} at {k['t_s']} s, push of "
                     f"`{k['path']}` on {k['link']}: link carried 1 MiB more first: "
                     f"{_fmt(k['link_reached'])}; the receiver had the file before the kill: "
                     f"{_fmt(k['received_before_kill'])}")
    if b.get("join"):
        lines += ["", f"Join: `{json.dumps(b['join'])}`"]
    if b.get("histories"):
        lines += ["", "Path histories of the findings (t in s from the start of the load; "
                  "content wN: made by write N; saw: the writes whose content the node "
                  "held):", "", "```"]
        for h in b["histories"]:
            lines += history_lines(h)
        lines.append("```")
    if b.get("explained"):
        lines += ["", "What each node said of them before it stopped (its status, its index's "
                  "rows for each path, its log's warnings and lines naming one):", "", "```"]
        for node, said in b["explained"].items():
            lines += explained_lines(node, said)
        lines.append("```")
    return lines


def explained_lines(node: str, said: dict[str, Any]) -> list[str]:
    lines = [f"{node}:"]
    lines += [f"  status: {s}" for s in said.get("status", [])]
    for path, rows in said.get("index", {}).items():
        lines.append(f"  index {path}: {json.dumps(rows, sort_keys=True)}")
    lines += [f"  log: {line}" for line in said.get("log", [])]
    return lines


def fault_text(e: dict[str, Any]) -> str:
    who = e.get("node") or ",".join(e.get("nodes", []))
    text = f"{e['t_s']:8.3f} s  {e['kind']} {who}".rstrip()
    if e.get("kind") in ("mkdir", "rmdir"):
        text += f" {e['path']}" + (f" ({e['files']} files)" if e["kind"] == "rmdir" else "")
        if e.get("gone") is False:
            text += " (the folder stayed: files kept arriving)"
    if "link" in e:
        text += (f" once its push of {e['path']} on {e['link']} was under way "
                 f"(1 MiB more on the link: {'yes' if e['link_reached'] else 'no'}, "
                 f"waited {e['waited_s']} s)")
    return text


def history_lines(h: dict[str, Any]) -> list[str]:
    lines = [f"{h['path']}: {'; '.join(h['why'])}"]
    for o in h["ops"]:
        if "event" in o:
            lines.append(f"  {fault_text(o['event'])}")
            continue
        saw = ",".join(f"w{w}" for w in o["saw"]) or "-"
        extra = (" forced" if o.get("forced") else "") + (
            f" from {o['from']}" if o.get("from") else "")
        lines.append(f"  {o['t_s']:8.3f} s  {o['node']:<3} {o['kind']:<11} w{o['wid']:<5} "
                     f"-> {o['content']:<12} saw {saw}{extra}")
    for node, f in h["final"].items():
        copies = f"; copies {', '.join(f['copies'])}" if f["copies"] else ""
        lines.append(f"  final on {node}: {f['at']}{copies}")
    lines += [f"  log {line}" for line in h["conflict_log"]]
    return lines


def findings(b: Block, console: Console) -> None:
    """The join and the path histories of one run's findings, on the terminal."""
    join = b.get("join")
    if join and join.get("ok") is not None:
        console.print(f"join of an empty node: {'ok' if join['ok'] else 'FAILED'} "
                      f"{json.dumps(join)}", markup=False, highlight=False, soft_wrap=True)
    hist = b.get("histories") or []
    if hist:
        console.print(f"path histories of the findings ({len(hist)}; t in s from the start "
                      "of the load; wN: the content write N made):", markup=False)
    for h in hist:
        console.print("\n".join(history_lines(h)), markup=False, highlight=False,
                      soft_wrap=True)


def summary(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{', '.join(report['profiles'])}: {report['nodes']} nodes, "
                        f"seed {report['seed']}")
    table.add_column("")
    for s in SYSTEMS:
        if s in report["blocks"]:
            table.add_column("meshsync" if s == "meshsync" else "lsyncd + rsync",
                             justify="right")
    for r in rows(report):
        table.add_row(*(c.replace("**", "") for c in r))
    console.print(table)
