"""The data plane on 3 local nodes, beside plain lsyncd delay 0 (issue 12's targets).

    unshare -n sh -c 'ip link set lo up && .venv/bin/python bench/dataplane.py --runs 3'

Each run starts meshsync (three real agents on 127.0.0.1x, as ``mesh local up``
starts them) and the stop-gap people use today (on every node an rsync daemon and
lsyncd pushing to every other node's daemon with ``default.rsync``, multi-master,
``delay = 0``), one after the other (the first alternates between runs), and runs
the same scenarios in the same order on each: a new 1 KiB file at both peers
(p50, p95); 30 single 1 KiB files, one at a time, each waited for at both peers and
then until the nodes are quiet (the CPU of all nodes; the tasks started per file,
machine-wide from /proc/stat, and exactly from the bench's own pid namespace: run as
root, it runs itself again under ``unshare --pid``); a burst of 4 KiB files in
folders, converged on all nodes; the delete of those folders (until the files are
gone everywhere, then the folders); a large file on all nodes (MiB/s) and a 1 MiB
in-place change in it; peak memory (VmHWM), the agents' and lsyncds' summed.
Every wait has a deadline: what does not converge is reported, not fatal. Each
scenario starts once the system is quiet (bench/proctree.py says how CPU is counted).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import dpreport
import proctree
from dpreport import SYSTEMS, Figures

from mesh.deploy import local

System = Callable[[Path, argparse.Namespace], AbstractContextManager[tuple[list[Path], list[int]]]]
RSYNCD_CONF = "use chroot = no\nuid = root\ngid = root\n[data]\n  path = {data}\n  read only = no\n"
LSYNCD_CONF = 'settings {{ nodaemon = true, logfile = "{log}", statusFile = "{status}" }}\n{syncs}'
LSYNCD_SYNC = ('sync {{ default.rsync, source = "{src}/", target = "{dst}", delay = 0, '
               'rsync = {{ archive = true }} }}\n')
RSYNCD_PORT = 8873
KIB = 1024


class Unconverged(Exception):
    pass


def wait(cond: Callable[[], bool], limit: float, step: float = 0.005,
         since: float | None = None) -> float:
    """Seconds from ``since`` (default: now) until ``cond``; ``Unconverged`` after ``limit``."""
    start = time.perf_counter() if since is None else since
    while not cond():
        if time.perf_counter() - start > limit:
            raise Unconverged(f"did not converge in {limit:.0f} s")
        time.sleep(step)
    return time.perf_counter() - start


def has(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


def lo_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        if line.strip().startswith("lo:"):
            return int(line.split(":")[1].split()[0])
    return 0


class Holds:
    """Whether, and since when, a node's copy of a file is ``content``: hashed only when its
    stat looks right (size, and the mtime rsync sets last) and changed since last hashed;
    the time is when that stat was first seen, so hashing it does not count."""

    def __init__(self, content: bytes | bytearray) -> None:
        self.digest = hashlib.sha256(content).hexdigest()
        self.size, self.mtime = len(content), 0
        self.seen: dict[Path, tuple[int, int, float | None]] = {}

    def written(self, path: Path, at: float) -> None:
        """The bench wrote ``content`` to ``path`` and closed it at ``at``."""
        st = path.stat()
        self.mtime, self.seen[path] = st.st_mtime_ns, (st.st_ino, st.st_ctime_ns, at)

    def since(self, path: Path) -> float | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if st.st_size != self.size or abs(st.st_mtime_ns - self.mtime) > 1_000_000:
            return None
        ino, ctime, at = self.seen.get(path, (0, 0, None))
        if (ino, ctime) != (st.st_ino, st.st_ctime_ns):
            at, h = time.perf_counter(), hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            at = at if h.hexdigest() == self.digest else None
            self.seen[path] = (st.st_ino, st.st_ctime_ns, at)
        return at


@contextmanager
def meshsync(base: Path, args: argparse.Namespace) -> Iterator[tuple[list[Path], list[int]]]:
    members = local.plan(3, base)
    pki_dir = local.ensure_pki(base, "bench", members)
    procs = []
    before = proctree.snapshot()
    try:
        for m in members:
            procs.append(local.start(m, local.command(m, members, pki_dir, "bench")))
            proctree.OWN.add(procs[-1].pid)
        wait(lambda: all(local.linked(m, 2) for m in members), args.deadline, 0.1)
        time.sleep(2)  # first-contact resyncs and lsyncd start
        yield [m.data for m in members], [p.pid for p in procs]
    finally:
        before += proctree.snapshot()
        local.stop_all(procs)
        proctree.OWN.difference_update(p.pid for p in procs)
        proctree.sweep(before)


@contextmanager
def plain_lsyncd(base: Path, args: argparse.Namespace) -> Iterator[tuple[list[Path], list[int]]]:
    """lsyncd multi-master into an rsync daemon on every node (as loadtest's baseline)."""
    roots = [base / f"p{k}" for k in range(1, 4)]
    hosts = [f"127.0.0.{20 + k}" for k in range(1, 4)]
    daemons, lsyncds = [], []
    try:
        for root, host in zip(roots, hosts, strict=True):
            (root / "data").mkdir(parents=True)
            (root / "rsyncd.conf").write_text(RSYNCD_CONF.format(data=root / "data"))
            daemons.append(proctree.spawn(
                ["rsync", "--daemon", "--no-detach", f"--config={root / 'rsyncd.conf'}",
                 f"--address={host}", f"--port={RSYNCD_PORT}",
                 f"--log-file={root / 'rsyncd.log'}"], root / "rsyncd.out"))
        wait(lambda: all(listening(h) for h in hosts), args.deadline, 0.05)
        for root in roots:
            syncs = "".join(LSYNCD_SYNC.format(src=root / "data",
                                               dst=f"rsync://{h}:{RSYNCD_PORT}/data/")
                            for r, h in zip(roots, hosts, strict=True) if r != root)
            (root / "lsyncd.lua").write_text(LSYNCD_CONF.format(
                log=root / "lsyncd.log", status=root / "lsyncd.status", syncs=syncs))
            lsyncds.append(proctree.spawn(["lsyncd", str(root / "lsyncd.lua")],
                                          root / "lsyncd.out"))
        wait(lambda: all(started(r) for r in roots), args.deadline, 0.1)
        yield [r / "data" for r in roots], [p.pid for p in lsyncds]
    finally:
        proctree.stop(lsyncds + daemons)


def listening(host: str) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, RSYNCD_PORT)) == 0


def started(root: Path) -> bool:
    """lsyncd finished its startup syncs (``rsync --delete`` of the tree to each peer)."""
    try:
        return (root / "lsyncd.log").read_text(errors="replace").count("Normal: Startup of") >= 2
    except FileNotFoundError:
        return False


class Scenarios:
    def __init__(self, dirs: list[Path], pids: list[int], args: argparse.Namespace) -> None:
        self.a, self.peers, self.dirs, self.pids, self.args = dirs[0], dirs[1:], dirs, pids, args
        self.out: Figures = {}
        self.notes: dict[str, str] = {}
        self.content = bytearray()

    def run(self) -> tuple[Figures, dict[str, str]]:
        self.out["load_start"] = round(os.getloadavg()[0], 2)
        for fn, keys in [(self.idle, "idle_cpu_pct idle_forks_per_s"),
                         (self.new_files, "new_p50_ms new_p95_ms"),
                         (self.small_cpu, "cpu_small_s procs_per_file orphans_small"),
                         (self.burst, "burst_s"), (self.delete, "delete_files_s delete_dirs_s"),
                         (self.large, "big_mib_s big_s"), (self.change, "change_s change_lo_mib")]:
            if fn == self.change and self.out.get("big_mib_s") is None:
                self.notes["change_s"] = "not run: the large file did not converge"
                continue
            if not proctree.quiet(self.args.quiet_s, self.args.deadline):
                self.notes[f"before {fn.__name__}"] = f"not quiet after {self.args.deadline:.0f} s"
            try:
                fn()
            except Unconverged as err:
                for key in keys.split():
                    if key not in self.out:
                        self.out[key], self.notes[key] = None, str(err)
        proctree.quiet(self.args.quiet_s, min(10, self.args.deadline))  # resident ones only
        self.out["mem_main_mib"] = proctree.hwm_mib(self.pids)
        self.out["mem_all_mib"] = proctree.hwm_mib(proctree.family(proctree.table()))
        self.out["load_end"] = round(os.getloadavg()[0], 2)
        return self.out, self.notes

    def idle(self) -> None:
        cpu, forks = proctree.cpu_s(), proctree.processes_started()
        time.sleep(5)
        self.out["idle_cpu_pct"] = (proctree.cpu_s() - cpu) / 5 * 100
        self.out["idle_forks_per_s"] = (proctree.processes_started() - forks) / 5

    def at_peers(self, name: str, size: int) -> float:
        return wait(lambda: all(has(p / name, size) for p in self.peers), self.args.deadline)

    def new_files(self) -> None:
        lat = []
        for i in range(self.args.samples):
            (self.a / f"new-{i}.txt").write_bytes(os.urandom(KIB))
            lat.append(self.at_peers(f"new-{i}.txt", KIB) * 1000)
            time.sleep(0.2)
        lat.sort()
        self.out["new_p50_ms"] = statistics.median(lat)
        self.out["new_p95_ms"] = lat[math.ceil(0.95 * len(lat)) - 1]

    def small_cpu(self) -> None:
        n, orphans, ours = self.args.small, proctree.REAPED[0], proctree.ours_started()
        cpu, forks = proctree.cpu_s(), proctree.processes_started()
        for i in range(n):
            (self.a / f"small-{i}.txt").write_bytes(os.urandom(KIB))
            self.at_peers(f"small-{i}.txt", KIB)
            if not proctree.quiet(self.args.quiet_s, self.args.deadline):
                self.notes["small_cpu"] = f"not quiet after {self.args.deadline:.0f} s"
        self.out["cpu_small_s"] = proctree.cpu_s() - cpu
        self.out["procs_per_file"] = (proctree.processes_started() - forks) / n
        if ours is not None and (now := proctree.ours_started()) is not None:
            self.out["procs_per_file_ours"] = (now - ours) / n
        self.out["orphans_small"] = proctree.REAPED[0] - orphans

    def folders(self) -> list[str]:
        return [f"burst-{k:02d}" for k in range(self.args.folders)]

    def burst(self) -> None:
        per = self.args.burst // self.args.folders
        start = time.perf_counter()
        for folder in self.folders():
            (self.a / folder).mkdir()
            for i in range(per):
                (self.a / folder / f"f{i:04d}").write_bytes(os.urandom(4 * KIB))
        done: set[tuple[Path, str]] = set()

        def full(d: Path, folder: str) -> bool:
            try:
                names = [p.name for p in (d / folder).iterdir() if not p.name.startswith(".")]
            except FileNotFoundError:
                return False
            return len(names) == per and all(has(d / folder / n, 4 * KIB) for n in names)

        def converged() -> bool:
            done.update((d, f) for d in self.dirs for f in self.folders()
                        if (d, f) not in done and full(d, f))
            return len(done) == len(self.dirs) * len(self.folders())

        self.out["burst_s"] = wait(converged, self.args.deadline, 0.05, since=start)

    def delete(self) -> None:
        def files_left() -> bool:
            for d in self.dirs:
                for f in self.folders():
                    with suppress(FileNotFoundError):
                        if any(not p.name.startswith(".") for p in (d / f).iterdir()):
                            return True
            return False

        start = time.perf_counter()
        for folder in self.folders():
            shutil.rmtree(self.a / folder)
        self.out["delete_files_s"] = wait(lambda: not files_left(), self.args.deadline,
                                          0.02, since=start)
        self.out["delete_dirs_s"] = wait(
            lambda: not any((d / f).exists() for d in self.dirs for f in self.folders()),
            self.args.deadline, 0.02, since=start)

    def converge(self, holds: Holds, start: float) -> float:
        """From ``start`` until every node holds the content (a copy that held may be
        clobbered by an echo: all are checked again each time)."""
        times: list[float | None] = []

        def all_hold() -> bool:
            times[:] = [holds.since(d / "big.bin") for d in self.dirs]
            return None not in times

        wait(all_hold, self.args.deadline, 0.02, since=start)
        return max(t for t in times if t is not None) - start

    def large(self) -> None:
        size = self.args.big_mib << 20
        self.content[:] = os.urandom(size)
        holds = Holds(self.content)  # hashed before the clock starts
        with (self.a / "big.bin").open("wb") as f:
            for at in range(0, size, 1 << 20):
                f.write(self.content[at:at + (1 << 20)])
        start = time.perf_counter()  # from the close, for both systems
        holds.written(self.a / "big.bin", start)
        self.out["big_s"] = took = self.converge(holds, start)
        self.out["big_mib_s"] = self.args.big_mib / took

    def change(self) -> None:
        before, at = lo_bytes(), (self.args.big_mib << 20) // 3
        self.content[at:at + (1 << 20)] = os.urandom(1 << 20)
        holds = Holds(self.content)
        with (self.a / "big.bin").open("r+b") as f:
            f.seek(at)
            f.write(self.content[at:at + (1 << 20)])
        start = time.perf_counter()
        holds.written(self.a / "big.bin", start)
        self.out["change_s"] = self.converge(holds, start)
        self.out["change_lo_mib"] = (lo_bytes() - before) / 2 / len(self.peers) / (1 << 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="the whole comparison, N times")
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--samples", type=int, default=30, help="new-file latency samples")
    parser.add_argument("--small", type=int, default=30, help="single files for CPU")
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--folders", type=int, default=20, help="the burst's folders")
    parser.add_argument("--deadline", type=float, default=60.0, help="every wait's limit, s")
    parser.add_argument("--quiet-s", type=float, default=1.5,
                        help="quiet: no process started or ended for this long (s); above "
                        "the agent's lsyncd delay (1 s), so each file's lsyncd batch counts")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    labels = vars(args)
    proctree.own_pid_namespace()
    proctree.become_subreaper()
    systems: dict[str, System] = {"meshsync": meshsync, "lsyncd": plain_lsyncd}
    runs: list[Run] = []
    print(f"data plane, 3 local nodes, {os.cpu_count()} cores, load average now "
          f"{os.getloadavg()[0]:.2f}. CPU: every process of the nodes, with the children "
          "each reaped (cutime/cstime) and the orphans the bench reaped as their subreaper; "
          "tasks started: /proc/stat's processes (machine-wide: other load adds to it) and, "
          f"{'' if proctree.ME == 1 else 'NOT AVAILABLE HERE: '}the last pid of the bench's "
          "own pid namespace (exact); memory: VmHWM; lsyncd d0: lsyncd delay 0, multi-master, "
          "into an rsync daemon on every node")
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        for r in range(args.runs):
            run = Run(SYSTEMS if r % 2 == 0 else SYSTEMS[::-1])
            for name in run.order:
                base = Path(tmp) / f"run{r}-{name}"
                try:
                    with systems[name](base, args) as (dirs, pids):
                        run.figures[name], run.notes[name] = Scenarios(dirs, pids, args).run()
                except Unconverged as err:  # it did not start: no figures
                    run.figures[name], run.notes[name] = {}, {"start": str(err)}
                shutil.rmtree(base, ignore_errors=True)
            load = ", ".join(f"{n} {run.figures[n].get('load_start')} to "
                             f"{run.figures[n].get('load_end')}" for n in run.order)
            dpreport.table(f"run {r + 1} of {args.runs}: {' then '.join(run.order)}; "
                           f"load average (1 min) {load}", run.figures, labels)
            for name in run.order:
                for key, note in run.notes[name].items():
                    print(f"  {name}: {key}: {note}")
            runs.append(run)
    medians = dpreport.summary([run.figures for run in runs], labels) if args.runs > 1 else {}
    if args.json:
        args.json.write_text(json.dumps(
            {"args": {k: str(v) for k, v in labels.items()},
             "runs": [vars(run) for run in runs], "median": medians}, indent=1) + "\n")


@dataclass
class Run:
    order: tuple[str, ...]
    figures: dict[str, Figures] = field(default_factory=dict)
    notes: dict[str, dict[str, str]] = field(default_factory=dict)


if __name__ == "__main__":
    main()
