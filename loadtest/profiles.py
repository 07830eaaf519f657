"""The profiles of issue 7, each a function of the planner, duration and rate.

Every profile draws sizes, nodes and paths from the planner's seeded random
generator only, so ``build(name, nodes, duration, rate, seed)`` is the same
plan every time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from loadtest.faults import FaultPlanner, faults
from loadtest.plan import KIB, MIB, Op, OpKind, Plan, Planner


@dataclass(frozen=True)
class Profile:
    name: str
    help: str
    duration: float  # default seconds of load
    rate: float  # default operations per second
    draw: Callable[[Planner, float, float], None]
    planner: type[Planner] = Planner
    join: bool = False  # after convergence, an empty node joins and must change nothing


def ticks(duration: float, rate: float, planner: Planner) -> list[float]:
    """Start times at ``rate`` per second, each jittered within its slot."""
    n = max(1, math.floor(duration * rate))
    return [round((k + planner.rng.random()) / rate, 4) for k in range(n)]


def small_size(p: Planner) -> int:
    """256 B to 64 KiB, log-uniform; one in fifty is 1 MiB."""
    if p.rng.random() < 0.02:
        return MIB
    return int(256 * 2 ** (p.rng.random() * 8))


def small(p: Planner, duration: float, rate: float) -> None:
    for t in ticks(duration, rate, p):
        if p.rng.random() < 0.3 and p.change(t, "write", "small/", p.rng.randint(256, 16 * KIB)):
            continue
        p.create(t, f"small/d{p.rng.randrange(16):02d}", p.rng.randint(256, 16 * KIB))


def burst(p: Planner, duration: float, rate: float) -> None:
    """Every 5 s, 5 s worth of files at once from one node."""
    every = 5.0
    for k in range(max(1, math.floor(duration / every))):
        t = k * every
        node = p.pick_node()
        for _ in range(max(1, round(rate * every))):
            p.create(t, f"burst/b{k:03d}", p.rng.randint(KIB, 8 * KIB), node)


def large(p: Planner, duration: float, rate: float) -> None:
    """One large file per node, then small in-place changes (4 KiB to 256 KiB)."""
    size = 32 * MIB
    for n in range(p.nodes):
        p.create(0.5 * n, "large", size, n)
    for t in ticks(duration, rate, p):
        if t > 2.0:
            p.change(t, "patch", "large/", p.rng.randint(4 * KIB, 256 * KIB))


def deep(p: Planner, duration: float, rate: float) -> None:
    """Files 4 to 12 directories deep in a narrow tree (three names per level)."""
    for t in ticks(duration, rate, p):
        if p.rng.random() < 0.2 and p.change(t, "write", "deep/", small_size(p)):
            continue
        depth = p.rng.randint(4, 12)
        folder = "deep/" + "/".join(f"l{k}{p.rng.choice('abc')}" for k in range(depth))
        p.create(t, folder, small_size(p))


def mixed(p: Planner, duration: float, rate: float) -> None:
    for t in ticks(duration, rate, p):
        p.mixed(t, "mixed", lambda: small_size(p))


def storm(p: Planner, duration: float, rate: float) -> None:
    """Mixed at half the rate; every 3 s, every node (or a few) writes the same
    fresh and settled paths at once."""
    mixed(p, duration, rate / 2)
    for k, t in enumerate(x * 3.0 + 1.0 for x in range(max(1, math.floor(duration / 3.0)))):
        writers = (list(range(p.nodes)) if k % 2 == 0 or p.nodes == 2
                   else sorted(p.rng.sample(range(p.nodes), p.rng.randint(2, p.nodes - 1))))
        p.storm(t, writers, new=4, old=2, freeze=True)
    p.steps.sort(key=lambda s: s.t)


def churn(p: Planner, duration: float, rate: float) -> None:
    """Mixed, while the last node is stopped from 1/3 to 2/3 of the run; it writes
    new files of its own meanwhile (offline edits found when it starts)."""
    down = p.nodes - 1
    off, on = duration / 3, 2 * duration / 3
    stopped = False
    for t in ticks(duration, rate, p):
        if not stopped and t >= off:
            p.stop(off, down)
            stopped = True
        if stopped and t >= on and down in p.down:
            p.start(on, down)
        if down in p.down and p.rng.random() < 0.2:
            p.create(t, f"mixed/offline-{p.rng.randrange(4)}", small_size(p), down)
        else:
            p.mixed(t, "mixed", lambda: small_size(p))
    if down in p.down:
        p.start(duration, down)


def partition(p: Planner, duration: float, rate: float) -> None:
    """Mixed, with the first node cut off from 1/3 to 2/3 of the run; at the middle
    one node on each side writes the same paths (conflicts once it heals)."""
    cut, heal, mid = duration / 3, 2 * duration / 3, duration / 2
    state = "before"
    for t in ticks(duration, rate, p):
        if state == "before" and t >= cut:
            p.partition(cut, frozenset({0}))
            state = "cut"
        if state == "cut" and t >= mid:
            p.storm(mid, [0, 1], new=2, old=3, freeze=False, folder="mixed")
            state = "stormed"
        if state == "stormed" and t >= heal:
            p.heal(heal)
            state = "healed"
        p.mixed(t, "mixed", lambda: small_size(p))
    if state != "healed":
        p.heal(duration)


def handoff(p: Planner, duration: float, rate: float) -> None:
    """Each new file is changed on another node the moment it lands there: deleted,
    overwritten or changed in place (the change saw the file: no conflict is due)."""
    for t in ticks(duration, rate, p):
        a = p.pick_node()
        b = p.rng.choice([n for n in range(p.nodes) if n != a])
        path = p.new_path("handoff")
        p.add(p.write(t, a, path, p.rng.randint(256, 8 * KIB)))
        kind: OpKind = p.rng.choice(("delete", "write", "patch"))
        p.add(Op(t + 0.001, kind, b, path, p.next_wid(), size=p.rng.randint(64, 4 * KIB)))
        p.live.pop(path)  # nothing else touches it


def quick(p: Planner, duration: float, rate: float) -> None:
    """For CI: mixed, and two storms of every node (the second on settled paths)."""
    mixed(p, duration, rate)
    p.storm(min(4.0, duration / 3), list(range(p.nodes)), new=3, old=0, freeze=True)
    p.storm(duration - 0.5, list(range(p.nodes)), new=1, old=3, freeze=True)
    p.steps.sort(key=lambda s: s.t)


PROFILES = {pr.name: pr for pr in (
    Profile("small", "small files (256 B - 16 KiB), some overwritten", 30, 40, small),
    Profile("burst", "bursts of files from one node every 5 s", 30, 100, burst),
    Profile("large", "32 MiB files with small in-place changes", 30, 2, large),
    Profile("deep", "files 4-12 directories deep", 30, 30, deep),
    Profile("mixed", "create, overwrite, patch, rename, delete", 30, 30, mixed),
    Profile("storm", "conflict storm: the same paths on several nodes at once", 30, 20, storm),
    Profile("churn", "mixed while a node is stopped and restarted", 30, 20, churn),
    Profile("partition", "mixed while a node is cut off; conflicts at heal", 30, 20, partition),
    Profile("handoff", "a file changed on another node as soon as it lands there", 30, 10,
            handoff),
    Profile("quick", "CI: mixed and two storms, well under a minute", 12, 15, quick),
    Profile("faults", "mixed with multi-MiB files, storms, folder deletes racing creates; "
            "SIGKILL (also mid-transfer), SIGSTOP, a node cut off; then an empty node joins",
            90, 6, faults, FaultPlanner, join=True),
)}


def build(name: str, nodes: int, duration: float | None, rate: float | None, seed: int) -> Plan:
    profile = PROFILES[name]
    d = profile.duration if duration is None else duration
    r = profile.rate if rate is None else rate
    planner = profile.planner(nodes, seed)
    profile.draw(planner, d, r)
    return dataclasses.replace(planner.plan(name, d, r), join=profile.join)
