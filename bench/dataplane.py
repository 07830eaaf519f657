"""The data plane on 3 local nodes, beside plain lsyncd + rsync multi-master.

    .venv/bin/python bench/dataplane.py [--big-mib 256] [--samples 30] [--burst 2000]

Runs the same scenarios twice in one run: meshsync (three real agents on
127.0.0.1x, as ``mesh local up`` starts them) and the stop-gap people use today
(lsyncd on every node pushing to every other with ``default.rsync``, the same
0.2 s delay). Prints p50/p95 for a new 1 KiB file to reach both peers, the time
for a burst of 4 KiB files to converge, MB/s for a large file and for a 1 MiB
in-place change in it (with the loopback bytes it took), a plain ``rsync -a``
of the large file as the throughput reference, and the agents' CPU and peak
memory. Figures, not pass/fail: targets are in issue 4.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mesh.deploy import local

LSYNCD_CONF = """\
settings {{ nodaemon = true, logfile = "{log}", statusFile = "{status}" }}
{syncs}
"""
LSYNCD_SYNC = ('sync {{ default.rsync, source = "{src}", target = "{dst}", delay = 0.2, '
               'rsync = {{ archive = true }} }}\n')


def wait(cond: Callable[[], bool], limit: float, step: float = 0.005) -> float:
    start = time.perf_counter()
    while not cond():
        if time.perf_counter() - start > limit:
            raise TimeoutError("scenario did not converge in time")
        time.sleep(step)
    return time.perf_counter() - start


def has(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def lo_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        if line.strip().startswith("lo:"):
            return int(line.split(":")[1].split()[0])
    return 0


def cpu_and_rss(pids: list[int]) -> tuple[float, float]:
    """CPU seconds (with reaped children) and the largest peak RSS (MB) of ``pids``."""
    cpu, peak = 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += sum(int(x) for x in fields[11:15]) / tick
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        except (FileNotFoundError, IndexError):
            pass
    return cpu, peak


@contextmanager
def meshsync(base: Path) -> Iterator[tuple[list[Path], list[int]]]:
    members = local.plan(3, base)
    pki_dir = local.ensure_pki(base, "bench", members)
    procs = [local.start(m, local.command(m, members, pki_dir, "bench")) for m in members]
    try:
        wait(lambda: all(local.linked(m, 2) for m in members), 60, 0.1)
        time.sleep(2)  # first-contact resyncs and lsyncd start
        yield [m.data for m in members], [p.pid for p in procs]
    finally:
        local.stop_all(procs)


@contextmanager
def plain_lsyncd(base: Path) -> Iterator[tuple[list[Path], list[int]]]:
    dirs = [base / f"p{k}" / "data" for k in range(1, 4)]
    for d in dirs:
        d.mkdir(parents=True)
    procs = []
    try:
        for k, src in enumerate(dirs):
            syncs = "".join(LSYNCD_SYNC.format(src=src, dst=dst) for dst in dirs if dst != src)
            conf = src.parent / "lsyncd.lua"
            conf.write_text(LSYNCD_CONF.format(log=src.parent / "lsyncd.log",
                                               status=src.parent / "status", syncs=syncs))
            procs.append(subprocess.Popen(["lsyncd", str(conf)], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True))
            del k
        time.sleep(2)
        yield dirs, [p.pid for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


def measure(out: dict[str, float], key: str, fn: Callable[[], float]) -> None:
    """One figure; a scenario that never converges is reported, not fatal
    (plain lsyncd multi-master can lose a write to an echo of the old one)."""
    try:
        out[key] = fn()
    except TimeoutError:
        out[key] = float("nan")


def scenarios(dirs: list[Path], pids: list[int], args: argparse.Namespace
              ) -> dict[str, float]:
    a, peers = dirs[0], dirs[1:]
    out: dict[str, float] = {}
    cpu0, _ = cpu_and_rss(pids)
    time.sleep(5)
    cpu1, _ = cpu_and_rss(pids)
    out["idle_cpu_pct"] = (cpu1 - cpu0) / 5 / len(pids) * 100

    def new_files() -> float:
        lat = []
        for i in range(args.samples):
            name = f"new-{i}.txt"
            (a / name).write_bytes(os.urandom(1024))
            lat.append(wait(lambda n=name: all(has(p / n, 1024) for p in peers), 60))
            time.sleep(0.2)
        lat.sort()
        out["new_p95_ms"] = lat[max(0, int(len(lat) * 0.95) - 1)] * 1000
        return statistics.median(lat) * 1000

    def burst() -> float:
        folder = a / "burst"
        folder.mkdir()
        start = time.perf_counter()
        for i in range(args.burst):
            (folder / f"f{i:05d}").write_bytes(os.urandom(4096))
        return time.perf_counter() - start + wait(
            lambda: all((p / "burst").is_dir()
                        and sum(1 for f in (p / "burst").iterdir() if has(f, 4096)) >= args.burst
                        for p in peers), 300, 0.05)

    big = a / "big.bin"
    size = args.big_mib << 20
    # The bench knows what it wrote: it hashes in memory, before the clock starts, so
    # that its own hashing does not compete with what it measures for the 2 cores.
    content = bytearray()

    def large() -> float:
        content[:] = os.urandom(size)
        digest = hashlib.sha256(content).hexdigest()
        with big.open("wb") as f:
            for at in range(0, size, 1 << 20):
                f.write(content[at:at + (1 << 20)])
        start = time.perf_counter()  # closed: both lsyncd and the agent start from here
        wait(lambda: all(has(p / "big.bin", size) for p in peers), 600, 0.02)
        took = time.perf_counter() - start
        wait(lambda: all(sha(p / "big.bin") == digest for p in peers), 120, 0.2)
        return args.big_mib / took

    def change() -> float:
        before = lo_bytes()
        at = size // 3
        content[at:at + (1 << 20)] = os.urandom(1 << 20)
        digest = hashlib.sha256(content).hexdigest()
        with big.open("r+b") as f:
            f.seek(at)
            f.write(content[at:at + (1 << 20)])
        start = time.perf_counter()
        mtime = big.stat().st_mtime_ns
        hashed: dict[Path, float] = {}

        def holds(p: Path) -> bool:
            """Hash a peer's copy only once it looks changed (rsync sets the mtime last),
            so that this poll does not compete with the agents for the disk and CPU."""
            try:
                st = (p / "big.bin").stat()
            except FileNotFoundError:
                return False
            if abs(st.st_mtime_ns - mtime) > 1_000_000 or hashed.get(p) == st.st_ctime:
                return False
            hashed[p] = st.st_ctime
            return sha(p / "big.bin") == digest

        done: set[Path] = set()

        def all_hold() -> bool:
            done.update(p for p in peers if p not in done and holds(p))
            return len(done) == len(peers)

        wait(all_hold, 60, 0.05)
        out["change_lo_mib_per_peer"] = (lo_bytes() - before) / 2 / len(peers) / (1 << 20)
        return time.perf_counter() - start

    out["new_p95_ms"] = out["change_lo_mib_per_peer"] = float("nan")
    measure(out, "new_p50_ms", new_files)
    measure(out, "burst_s", burst)
    measure(out, "big_mb_s", large)
    measure(out, "change_s", change)
    cpu, peak = cpu_and_rss(pids)
    out["cpu_s_per_node"] = cpu / len(pids)
    out["peak_rss_mb"] = peak
    return out


def plain_rsync_mb_s(work: Path, mib: int) -> float:
    src = work / "ref-src"
    src.mkdir()
    with (src / "big.bin").open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    dst = work / "ref-dst"
    dst.mkdir()
    start = time.perf_counter()
    subprocess.run(["rsync", "-a", str(src / "big.bin"), str(dst)], check=True)
    took = time.perf_counter() - start
    shutil.rmtree(src)
    shutil.rmtree(dst)
    return mib / took


ROWS = [
    ("idle agent CPU (% of a core)", "idle_cpu_pct", "{:.2f}"),
    ("new 1 KiB file to both peers p50 (ms)", "new_p50_ms", "{:.0f}"),
    ("new 1 KiB file to both peers p95 (ms)", "new_p95_ms", "{:.0f}"),
    ("burst of 4 KiB files converged (s)", "burst_s", "{:.2f}"),
    ("large file to both peers (MB/s)", "big_mb_s", "{:.1f}"),
    ("1 MiB in-place change converged (s)", "change_s", "{:.2f}"),
    ("  loopback bytes per peer (MiB)", "change_lo_mib_per_peer", "{:.1f}"),
    ("CPU seconds per node, whole run", "cpu_s_per_node", "{:.1f}"),
    ("peak RSS of one agent/lsyncd (MB)", "peak_rss_mb", "{:.0f}"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--burst", type=int, default=2000)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        work = Path(tmp)
        ref = plain_rsync_mb_s(work, args.big_mib)
        with meshsync(work / "mesh") as (dirs, pids):
            results["meshsync"] = scenarios(dirs, pids, args)
        with plain_lsyncd(work / "plain") as (dirs, pids):
            results["lsyncd+rsync"] = scenarios(dirs, pids, args)
    print(f"data plane, 3 local nodes, {os.cpu_count()} cores; burst {args.burst} files, "
          f"large file {args.big_mib} MiB; plain `rsync -a` of it: {ref:.1f} MB/s")
    print(f"{'':<40}{'meshsync':>12}{'lsyncd+rsync':>14}")
    for label, key, fmt in ROWS:
        print(f"{label:<40}{fmt.format(results['meshsync'][key]):>12}"
              f"{fmt.format(results['lsyncd+rsync'][key]):>14}")
    print(f"{'large file vs plain rsync':<40}{results['meshsync']['big_mb_s'] / ref:>11.2f}x"
          f"{results['lsyncd+rsync']['big_mb_s'] / ref:>13.2f}x")


if __name__ == "__main__":
    main()
