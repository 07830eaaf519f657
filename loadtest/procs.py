"""Processes the harness starts: each in a session of its own, stopped by its id.

Every session leader is registered in ``SESSIONS`` when started and removed
when stopped, so that ``sweep()`` (run on any exit, Ctrl-C included) kills
whatever is left, by group id and nothing else. ``Meter`` reads /proc for the
CPU seconds and resident memory of a process with its descendants (an agent
with its lsyncd and rsync children, which run in sessions of their own).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

SESSIONS: set[int] = set()
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    SESSIONS.add(proc.pid)
    return proc


def adopt(proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    """Register a process started elsewhere in a session of its own."""
    SESSIONS.add(proc.pid)
    return proc


def signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


@dataclass(frozen=True)
class Stat:
    ppid: int
    start: int  # clock ticks after boot: with the pid, names one process
    cpu_s: float  # its own and its reaped children's
    rss_mb: float


def table() -> dict[int, Stat]:
    """Every process's /proc/PID/stat that could be read."""
    out: dict[int, Stat] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        f = text.rsplit(")", 1)[1].split()
        out[int(entry.name)] = Stat(int(f[1]), int(f[19]),
                                    sum(int(x) for x in f[11:15]) / TICK,
                                    int(f[21]) * PAGE / 2**20)
    return out


def tree(root: int, stats: dict[int, Stat] | None = None) -> list[int]:
    """``root`` and its descendants (an agent's lsyncd and rsync run in sessions
    of their own, so its process group does not hold them)."""
    stats = table() if stats is None else stats
    children: dict[int, list[int]] = {}
    for pid, st in stats.items():
        children.setdefault(st.ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out.append(pid)
            todo.extend(children.get(pid, ()))
    return out


def signal_tree(root: int, sig: int) -> None:
    """Signal ``root`` first (so it starts nothing new), then its descendants."""
    for _ in range(2):  # again, for a child forked while we went
        for pid in tree(root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the session's group, SIGKILL what is left of it and of the
    descendants it had (in sessions of their own) after ``timeout``."""
    stats = table()
    family = [(pid, stats[pid].start) for pid in tree(proc.pid, stats)]
    signal_tree(proc.pid, signal.SIGCONT)  # a frozen process cannot act on SIGTERM
    signal_group(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    signal_group(proc.pid, signal.SIGKILL)
    proc.wait()
    now = table()
    for pid, start in family:
        if pid in now and now[pid].start == start:  # the same process, still there
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    SESSIONS.discard(proc.pid)


def kill(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> list[int]:
    """SIGKILL the process with every descendant at once, as a crash or the kernel's
    OOM killer of a container would: all are stopped first (so that none forks,
    or sees another die and reacts), then killed. The pids it killed."""
    family: dict[int, int] = {}
    for _ in range(2):  # again, for a child forked before its parent stopped
        stats = table()
        for pid in tree(proc.pid, stats):
            if pid not in family:
                family[pid] = stats[pid].start
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
    now = table()
    for pid, start in family.items():
        if pid in now and now[pid].start == start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    signal_group(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    SESSIONS.discard(proc.pid)
    return sorted(family)


def sweep() -> None:
    for pid in list(SESSIONS):
        signal_group(pid, signal.SIGCONT)
        signal_group(pid, signal.SIGKILL)
        SESSIONS.discard(pid)


class Meter:
    """CPU seconds and peak memory of one node's processes (each root with its
    descendants) across restarts: a root that stops leaves its last CPU reading."""

    def __init__(self) -> None:
        self.roots: set[int] = set()
        self.last: dict[int, float] = {}
        self.done = 0.0
        self.start = 0.0
        self.peak_mb = 0.0

    def track(self, pid: int) -> None:
        self.roots.add(pid)

    def untrack(self, pid: int) -> None:
        self.roots.discard(pid)
        self.done += self.last.pop(pid, 0.0)

    def cpu_s(self) -> float:
        return self.done + sum(self.last.values()) - self.start

    def take(self, stats: dict[int, Stat]) -> None:
        total_mb = 0.0
        for root in self.roots:
            family = tree(root, stats)
            if not family:
                continue
            cpu = sum(stats[p].cpu_s for p in family)
            self.last[root] = max(self.last.get(root, 0.0), cpu)
            total_mb += sum(stats[p].rss_mb for p in family)
        self.peak_mb = max(self.peak_mb, total_mb)

    def reset(self) -> None:
        """Measure from now: CPU so far and the peak so far do not count."""
        self.start = self.done + sum(self.last.values())
        self.peak_mb = 0.0
