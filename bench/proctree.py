"""The processes a bench starts, and what they cost, read from /proc.

How CPU is counted: the bench makes itself a child subreaper (``prctl``), so every
process the system under test starts stays its descendant: a grandchild whose parent
never waits for it (the background ``cat`` of a meshsync push's remote shell, whose
parent ``exec``s into another ``cat``) is re-parented to the bench, not to init, and
the bench reaps it. The CPU of the system is then, at one moment, the sum over every
live descendant of utime + stime + cutime + cstime (cutime/cstime hold each child it
reaped, and their reaped children in turn), plus the bench's own cutime + cstime (the
orphans it reaped; it starts no other process while it measures). A figure is the
difference of two such sums, each taken when the system is quiet (no process coming
or going), so that no process exits between the reading of its parent and its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
PR_SET_CHILD_SUBREAPER = 36
ME = os.getpid()
OWN: set[int] = set()  # what the bench started itself: their Popen reaps them
REAPED = [0]  # orphans the bench reaped


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    OWN.add(proc.pid)
    return proc


def reap() -> None:
    """Reap the orphans re-parented here that have ended (never a process of ``OWN``)."""
    for task in Path(f"/proc/{ME}/task").iterdir():
        with contextlib.suppress(OSError):
            for word in (task / "children").read_text().split():
                pid = int(word)
                if pid not in OWN:
                    with contextlib.suppress(ChildProcessError):
                        if os.waitpid(pid, os.WNOHANG)[0]:
                            REAPED[0] += 1


@dataclass(frozen=True)
class Stat:
    ppid: int
    start: int  # clock ticks after boot: with the pid, names one process
    own_s: float  # utime + stime
    children_s: float  # cutime + cstime: the children it reaped


def table() -> dict[int, Stat]:
    out: dict[int, Stat] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                f = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
                out[int(entry.name)] = Stat(int(f[1]), int(f[19]),
                                            (int(f[11]) + int(f[12])) / TICK,
                                            (int(f[13]) + int(f[14])) / TICK)
    return out


def family(stats: dict[int, Stat]) -> list[int]:
    """Every descendant of the bench, the bench itself not included."""
    kids: dict[int, list[int]] = {}
    for pid, st in stats.items():
        kids.setdefault(st.ppid, []).append(pid)
    out, todo = [], list(kids.get(ME, ()))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def cpu_s(stats: dict[int, Stat] | None = None) -> float:
    """CPU seconds of every descendant, alive or reaped (see the module's doc)."""
    if stats is None:
        reap()
        stats = table()
    return stats[ME].children_s + sum(stats[p].own_s + stats[p].children_s
                                      for p in family(stats))


def processes_started() -> int:
    """The machine's count of tasks started since boot (/proc/stat: processes and threads,
    every one of the machine's, not ours only)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("processes "):
            return int(line.split()[1])
    raise RuntimeError("/proc/stat has no processes line")


def own_pid_namespace() -> None:
    """Run the bench again as pid 1 of a pid namespace of its own (``unshare``, as root):
    the last pid given out there counts exactly the tasks its systems started (see
    ``ours_started``), and the kernel kills whatever is left in it when the bench ends."""
    if os.environ.get("BENCH_PID_NS") or os.geteuid() != 0:
        return
    argv = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
    if subprocess.run([*argv, "true"], capture_output=True, check=False).returncode == 0:
        os.environ["BENCH_PID_NS"] = "1"
        os.execvp(argv[0], [*argv, sys.executable, *sys.argv])


def ours_started() -> int | None:
    """Tasks (processes and threads) started in the bench's own pid namespace since it
    began, the bench's included; None outside one."""
    if ME != 1:
        return None
    return int(Path("/proc/sys/kernel/ns_last_pid").read_text())


def hwm_mib(pids: list[int]) -> float:
    """VmHWM (peak resident memory) of ``pids``, summed, MiB."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
    return total


def quiet(window: float, limit: float, max_cpu: float = 0.1) -> bool:
    """Until no descendant started or ended for ``window`` s and they used under
    ``max_cpu`` of a core meanwhile; False if that did not happen in ``limit`` s."""
    start = time.monotonic()
    since, cpu0, seen = start, cpu_s(), set(snapshot())
    while time.monotonic() - start < limit:
        time.sleep(0.05)
        reap()
        stats = table()
        now, cpu = time.monotonic(), cpu_s(stats)
        pids = {(p, stats[p].start) for p in family(stats)}
        if pids != seen or cpu - cpu0 > max_cpu * max(now - since, window):
            seen, since, cpu0 = pids, now, cpu
        elif now - since >= window:
            return True
    return False


def snapshot() -> list[tuple[int, int]]:
    stats = table()
    return [(pid, stats[pid].start) for pid in family(stats)]


def sweep(before: list[tuple[int, int]], timeout: float = 10.0) -> None:
    """After a system's own stop: SIGKILL, by id, whatever of ``before`` (and of the
    bench's descendants started since) is still there, and reap the orphans."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap()
        stats = table()
        left = [(p, s) for p, s in before if p in stats and stats[p].start == s]
        left += [(p, stats[p].start) for p in family(stats)
                 if p not in OWN and (p, stats[p].start) not in before]
        if not left:
            return
        for pid, _ in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def stop(procs: list[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM each by its id, SIGKILL it after ``timeout``; then ``sweep``."""
    before = snapshot()
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        OWN.discard(p.pid)
    sweep(before)
