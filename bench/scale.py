"""Scale (issue 16): many small files on local nodes, beside ``rsync -a`` in the same run.

    unshare -n sh -c 'ip link set lo up && .venv/bin/python bench/scale.py --files 100000'

Writes ``--files`` files of 1 KiB (deterministic) in up to 1,000 folders into n1's
folder and times ``rsync -a`` of them from an rsync daemon on loopback; then, with agents
started as ``mesh local up`` starts them and judged as ``mesh health`` judges: n1's first
start (until indexed), n2..nN joining empty (until every file is on every node,
byte-identical), a restart of n1 on unchanged files (until healthy), and with ``--burst
B`` B new files on n1 (until on every node). Wall time, CPU-s (an agent with its lsyncd
and rsync children), peak RSS, and the agents' log lines about their links, per phase.
``--profile DIR``: ``py-spy record`` on the agents in each phase (not for the figures).
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mesh
from mesh.cli.reach import AgentDown, running_status
from mesh.deploy import local
from mesh.engine.ops.health import DEFAULT_MAX_LAG, health_problems

MAX_FOLDERS = 1000
RSYNCD_PORT = 8730
PY_SPY = Path(sys.executable).with_name("py-spy")
LOG_PATTERNS = {  # what the agents log when a link drops or a request goes unanswered
    "link dropped": r"link \S+: down \((?!connect:)",
    "refused": r"\brefused\b",
    "silent for": r"silent for",
    "broker cut": r"\bcut \S+ \[",
    "no answer": r"no answer in",
    "catch-up failed": r"catch-up with \S+ failed",
    "PUBACK timeout": r"Timeout waiting for PUBACK",
    "behind on": r"is behind on",
    "caught up": r"caught up with",
}
REPEATS = re.compile(r"came (\d+) more times")
SILENT = re.compile(r"silent for ([\d.]+) s")
SCAN_DONE = "start-up scan:"
SETTLE_S = 5.0  # quiet seconds before and after the restart

Proc = subprocess.Popen[bytes]


def content(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "big")).digest() * 32  # 1 KiB


def layout(files: int, first: int = 0, folder: str = "d") -> dict[str, list[tuple[int, str]]]:
    """Folder -> [(file number, name)], files spread round-robin over the folders."""
    out: dict[str, list[tuple[int, str]]] = {}
    folders = min(files, MAX_FOLDERS)
    for i in range(first, first + files):
        out.setdefault(f"{folder}{(i - first) % folders:03d}", []).append((i, f"f{i:07d}.bin"))
    return out


def write_tree(root: Path, tree: dict[str, list[tuple[int, str]]]) -> None:
    for folder, files in tree.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, name in files:
            (root / folder / name).write_bytes(content(i))


class Arrival:
    """Which folders of ``tree`` are not yet complete under ``root`` (names only, cheap
    enough to poll), then a byte-for-byte check of every file."""

    def __init__(self, root: Path, tree: dict[str, list[tuple[int, str]]]) -> None:
        self.root, self.tree = root, tree
        self.missing = {f: {name for _, name in files} for f, files in tree.items()}

    def poll(self) -> bool:
        for folder in list(self.missing):
            with contextlib.suppress(FileNotFoundError):
                self.missing[folder] -= {p.name for p in (self.root / folder).iterdir()}
            if not self.missing[folder]:
                del self.missing[folder]
        return not self.missing

    def wrong(self) -> int:
        files = [(self.root / f / name, i) for f, names in self.tree.items() for i, name in names]
        return sum(not p.exists() or p.read_bytes() != content(i) for p, i in files)


def wait(cond: Callable[[], bool], limit: float, what: str, step: float = 0.2,
         since: float | None = None) -> float:
    """Seconds from ``since`` (default: now) until ``cond()``; TimeoutError after ``limit``."""
    start = time.monotonic() if since is None else since
    while not cond():
        if time.monotonic() - start > limit:
            raise TimeoutError(f"{what}: not within {limit:.0f} s")
        time.sleep(step)
    return time.monotonic() - start


def arrived(arrivals: list[Arrival], since: float, limit: float, what: str) -> float:
    """Seconds from ``since`` until every name is there (polled), then checked byte for
    byte (outside the clock; on a difference, the wait goes on)."""
    while True:
        took = wait(lambda: all([a.poll() for a in arrivals]), limit, what, 0.5, since)
        if not sum(a.wrong() for a in arrivals):
            return took
        arrivals[:] = [Arrival(a.root, a.tree) for a in arrivals]


def group_cpu(pgid: int) -> float:
    """CPU seconds of a process group: each live member's own and its reaped children's."""
    total = 0  # clock ticks
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                total += sum(int(x) for x in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    """The process's peak RSS (VmHWM; writing 5 to its clear_refs starts a new peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Cluster:
    """The agents, started and stopped through ``mesh.local``, with their log offsets."""

    def __init__(self, base: Path, nodes: int) -> None:
        self.members = local.plan(nodes, base)
        self.pki = local.ensure_pki(base, "scale", self.members)
        self.procs, self.marks = dict[str, Proc](), dict[str, int]()  # marks: log offsets

    def start(self, m: local.LocalNode) -> Proc:
        self.marks[m.name] = m.log.stat().st_size if m.log.exists() else 0
        self.procs[m.name] = local.start(m, local.command(m, self.members, self.pki, "scale"))
        return self.procs[m.name]

    def stop(self, names: list[str]) -> None:
        local.stop_all([self.procs.pop(n) for n in names if n in self.procs])

    def log_since(self, m: local.LocalNode, mark: int | None = None) -> str:
        with m.log.open("rb") as f:
            f.seek(self.marks.get(m.name, 0) if mark is None else mark)
            return f.read().decode(errors="replace")

    def problems(self, m: local.LocalNode) -> list[str]:
        """What ``mesh health`` finds wrong, and a missing link to any other node."""
        try:
            doc = running_status(m.state, time.time())
        except AgentDown as err:
            return [str(err)]
        linked = local.linked(m, len(self.members) - 1)
        return health_problems(doc, DEFAULT_MAX_LAG) + ([] if linked else ["links missing"])

    def healthy(self, m: local.LocalNode) -> bool:
        return not self.problems(m)


def link_events(text: str) -> dict[str, Any]:
    counts: dict[str, Any] = dict.fromkeys(LOG_PATTERNS, 0)
    for line in text.splitlines():
        held = REPEATS.search(line)
        for key, pattern in LOG_PATTERNS.items():
            if re.search(pattern, line):
                counts[key] += int(held.group(1)) if held else 1
    counts["longest silence s"] = max((float(s) for s in SILENT.findall(text)), default=0.0)
    return counts


class Profiler:
    """``py-spy record`` on agents, each to DIR/<phase>-<node>.txt, stopped by SIGINT."""

    def __init__(self, folder: Path | None) -> None:
        self.folder, self.procs = folder, list[Proc]()

    def attach(self, phase: str, name: str, pid: int) -> None:
        if self.folder is not None:
            self.procs.append(subprocess.Popen(
                [str(PY_SPY), "record", "--pid", str(pid), "--format", "raw", "--rate", "50",
                 "--threads", "-o", str(self.folder / f"{phase}-{name}.txt")],
                stdout=subprocess.DEVNULL))

    def stop(self) -> None:  # each writes its profile on SIGINT
        for p in self.procs:
            p.send_signal(signal.SIGINT)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(60)
            p.kill()
            p.wait()
        self.procs = []


def plain_rsync(base: Path, source: Path) -> dict[str, float]:
    """``rsync -a`` of ``source`` from an rsync daemon on loopback into an empty folder."""
    conf, dest = base / "rsyncd.conf", base / "rsync-copy"
    conf.write_text(f"pid file = {base / 'rsyncd.pid'}\nuse chroot = no\n"
                    f"[src]\npath = {source}\nread only = yes\nuid = 0\ngid = 0\n")
    daemon = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}",
                               "--address=127.0.0.1", f"--port={RSYNCD_PORT}"],
                              start_new_session=True)
    try:
        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", RSYNCD_PORT)) == 0
        wait(listening, 10, "rsync daemon listening", 0.05)
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
        subprocess.run(["rsync", "-a", f"rsync://127.0.0.1:{RSYNCD_PORT}/src/", str(dest)],
                       check=True)
        took, after = time.monotonic() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        time.sleep(0.5)  # the daemon reaps its connection's process
        daemon_cpu = group_cpu(daemon.pid)
    finally:
        daemon.terminate()
        daemon.wait(10)
    # Its copy stays until the run ends: ext4 without a journal (these machines) looks
    # past every inode deleted in the last minute when it makes a file, and 100,000
    # deletes made each file of the join that followed cost about 0.5 ms of kernel time.
    return {"s": took, "cpu_client_s": cpu, "cpu_daemon_s": daemon_cpu}


def phases(args: argparse.Namespace, base: Path, cluster: Cluster, prof: Profiler,
           out: dict[str, Any]) -> None:
    """Each figure into ``out`` as soon as it is taken."""
    n1, others, limit = cluster.members[0], cluster.members[1:], args.timeout
    tree = layout(args.files)
    write_tree(n1.data, tree)
    out["rsync"] = plain_rsync(base, n1.data)
    at: dict[str, int] = {}

    def mark() -> None:
        at.update({m.name: m.log.stat().st_size if m.log.exists() else 0
                   for m in cluster.members})

    def logs() -> dict[str, Any]:
        return link_events("".join(cluster.log_since(m, at[m.name]) for m in cluster.members
                                   if m.log.exists()))

    def launch(m: local.LocalNode, phase: str) -> Proc:
        proc = cluster.start(m)
        if args.profile:  # once it logs, its interpreter is up and py-spy can attach
            wait(lambda: m.log.stat().st_size > cluster.marks[m.name], 60, "a log line", 0.02)
            prof.attach(phase, m.name, proc.pid)
        return proc

    def indexed(since: float) -> float:
        return wait(lambda: SCAN_DONE in cluster.log_since(n1), limit, "n1 indexed", 0.2, since)

    def all_healthy(since: float) -> float:
        return wait(lambda: all(cluster.healthy(m) for m in cluster.members), limit,
                    "every node healthy", 0.5, since)

    # (a) first start of a node holding the files
    mark()
    start = time.monotonic()
    p1 = launch(n1, "start")
    out["start"] = {"indexed_s": indexed(start), "cpu_s": group_cpu(p1.pid),
                    "peak_rss_mib": peak_rss_mib(p1.pid)}
    prof.stop()
    time.sleep(2)  # what the scan held up (link silences) gets logged
    out["start"]["logs"] = logs()

    # (b) the empty nodes join
    mark()
    Path(f"/proc/{p1.pid}/clear_refs").write_text("5")  # the join's own peak RSS
    sender_cpu = group_cpu(p1.pid)
    start = time.monotonic()
    prof.attach("join", n1.name, p1.pid)
    joiners = [launch(m, "join") for m in others]
    there = arrived([Arrival(m.data, tree) for m in others], start, limit, "the join")
    out["join"] = {"all_files_s": there, "cpu_sender_s": group_cpu(p1.pid) - sender_cpu,
                   "cpu_receivers_s": [group_cpu(p.pid) for p in joiners],
                   "peak_rss_sender_mib": peak_rss_mib(p1.pid),
                   "peak_rss_receivers_mib": [peak_rss_mib(p.pid) for p in joiners]}
    prof.stop()
    out["join"]["problems_when_there"] = {m.name: cluster.problems(m) for m in cluster.members}
    out["join"]["all_healthy_s"] = all_healthy(start)
    out["join"]["logs"] = logs()

    # (c) restart of n1 on unchanged files (--restarts times; the first one's figures)
    for i in range(args.restarts):
        time.sleep(SETTLE_S)
        mark()
        start = time.monotonic()
        cluster.stop([n1.name])
        restart = {"stop_s": time.monotonic() - start}
        start = time.monotonic()
        p1 = launch(n1, "restart" if i == 0 else f"restart{i + 1}")
        restart["indexed_s"] = indexed(start)
        restart["healthy_s"] = wait(lambda: cluster.healthy(n1), limit, "n1 healthy", 0.1,
                                    start)
        restart["cpu_s"], restart["peak_rss_mib"] = group_cpu(p1.pid), peak_rss_mib(p1.pid)
        prof.stop()
        restart["all_healthy_s"] = all_healthy(start)
        time.sleep(SETTLE_S)  # a peer's reaction to the restart (a catch-up) gets logged
        restart["logs"] = logs()
        out.setdefault("restart", restart)
        out.setdefault("restarts_healthy_s", []).append(restart["healthy_s"])

    # (d) a burst of new files on n1
    if args.burst:
        mark()
        burst = layout(args.burst, first=args.files, folder="burst")
        cpu0 = {n: group_cpu(p.pid) for n, p in cluster.procs.items()}
        prof.attach("burst", n1.name, p1.pid)
        start = time.monotonic()
        write_tree(n1.data, burst)
        took = arrived([Arrival(m.data, burst) for m in others], start, limit, "the burst")
        prof.stop()
        out["burst"] = {"files": args.burst, "all_files_s": took, "logs": logs(),
                        "cpu_s": {n: group_cpu(p.pid) - cpu0[n] for n, p in cluster.procs.items()},
                        "peak_rss_mib": {n: peak_rss_mib(p.pid) for n, p in cluster.procs.items()}}
    out["load_after"] = os.getloadavg()


def report(r: dict[str, Any]) -> None:
    a, s, j, c, b = r["rsync"], r["start"], r["join"], r["restart"], r.get("burst")
    print(f"the agents ran the code in {r['code']}")

    def nums(xs: list[float], digits: int = 1) -> str:
        return " / ".join(f"{x:.{digits}f}" for x in xs)

    rows = [("first start of a node holding them: indexed", "—",
             f"{s['indexed_s']:.1f} s, {s['cpu_s']:.1f} CPU-s, {s['peak_rss_mib']:.0f} MiB RSS"),
            ("empty node(s) join: every file there, byte-identical",
             f"{a['s']:.2f} s (CPU {a['cpu_client_s']:.1f} s client + {a['cpu_daemon_s']:.1f} s "
             f"daemon)", f"{j['all_files_s']:.1f} s ({j['all_files_s'] / a['s']:.1f}x); CPU "
             f"{j['cpu_sender_s']:.1f} s sender + {nums(j['cpu_receivers_s'])} s receiver; peak "
             f"RSS {j['peak_rss_sender_mib']:.0f} / {nums(j['peak_rss_receivers_mib'], 0)} MiB; "
             f"all healthy at {j['all_healthy_s']:.1f} s"),
            ("restart of n1 on unchanged files: healthy", "—",
             f"{c['healthy_s']:.1f} s (indexed {c['indexed_s']:.1f} s; stop took "
             f"{c['stop_s']:.1f} s), {c['cpu_s']:.1f} CPU-s, {c['peak_rss_mib']:.0f} MiB; all "
             f"healthy at {c['all_healthy_s']:.1f} s"
             + (f"; each restart healthy in {nums(r['restarts_healthy_s'])} s"
                if len(r["restarts_healthy_s"]) > 1 else ""))]
    if b:
        rows.append((f"a burst of {b['files']:,} new files on n1: on every node", "—",
                     f"{b['all_files_s']:.1f} s; CPU-s {nums(list(b['cpu_s'].values()))}; peak "
                     f"RSS {nums(list(b['peak_rss_mib'].values()), 0)} MiB"))
    print(f"{r['files']:,} files of 1 KiB, {r['nodes']} nodes, {r['cores']} cores, load "
          f"{nums(r['load_before'], 2)} before, {nums(r['load_after'], 2)} after\n"
          f"| {r['files']:,} files | `rsync -a` | meshsync |\n| --- | --- | --- |")
    print("\n".join(f"| {label} | {plain} | {mesh} |" for label, plain, mesh in rows))
    print("\nwhat the agents logged, per phase:")
    for phase in (p for p in ("start", "join", "restart", "burst") if p in r):
        print(f"  {phase}: " + ", ".join(f"{k} {v:g}" for k, v in r[phase]["logs"].items() if v))
    for name, problems in j["problems_when_there"].items():
        print(f"  {name} when every file was there: {'; '.join(problems) or 'healthy'}")


def run_this_code() -> Path:
    """Have the agents (``python -m mesh``) and their walkers run the ``mesh`` this script
    imported: by default ``python -m`` puts the current folder first, so a baseline
    run from a worktree with ``PYTHONPATH`` ran the current folder's code instead. That
    code is compiled first, as the image does (compose/Dockerfile): with
    ``PYTHONDONTWRITEBYTECODE`` set and no bytecode, each agent compiled its modules
    at every start, about 0.4 s of a restart here."""
    root = Path(mesh.__file__).resolve().parents[1]
    compileall.compile_dir(root / "mesh", quiet=1)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPATH"] = str(root)
    os.environ["PYTHONSAFEPATH"] = "1"  # Python 3.11: no current folder on the path
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--burst", type=int, default=0, help="then B new files on n1")
    parser.add_argument("--restarts", type=int, default=1,
                        help="restart n1 on unchanged files this many times")
    parser.add_argument("--timeout", type=float, default=1800, help="per wait, seconds")
    parser.add_argument("--dir", type=Path, help="work folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--profile", type=Path, help="py-spy raw profiles into this folder")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if args.nodes < 2 or args.files < 1 or args.restarts < 1:
        parser.error("--nodes must be at least 2, --files and --restarts at least 1")
    if args.profile:
        args.profile = args.profile.absolute()
        args.profile.mkdir(parents=True, exist_ok=True)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stops all as Ctrl-C does
    code = run_this_code()
    base = Path(tempfile.mkdtemp(prefix="mesh-scale-", dir=args.dir)).absolute()
    cluster, prof = Cluster(base, args.nodes), Profiler(args.profile)
    out: dict[str, Any] = {"files": args.files, "nodes": args.nodes, "cores": os.cpu_count(),
                           "load_before": os.getloadavg(), "code": str(code)}
    try:
        phases(args, base, cluster, prof, out)
    except TimeoutError as err:  # reported with what was measured before it
        out["error"], out["load_after"] = str(err), os.getloadavg()
    finally:  # also on Ctrl-C or SIGTERM
        prof.stop()
        cluster.stop(list(cluster.procs))
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    if args.json or "error" in out:
        print(json.dumps(out, indent=1))
    else:
        report(out)
    if args.keep:
        print(f"work folder (logs in nK/agent.log): {base}", file=sys.stderr)
    sys.exit("error" in out)


if __name__ == "__main__":
    main()
