"""Workloads: a profile, the node count, duration, rate and seed give a fixed plan.

A plan is a list of steps in time order — single operations, storms (the same
paths written on several nodes at once) and faults (stop or start a node, cut
or heal links) — made by ``random.Random(seed)`` alone, so a run can be
repeated exactly and the baseline gets the same steps. Content is made from
the seed and the write id when it is written (``loadtest.probe.content``).

What the plan cannot decide is when a node holds a path: an operation on a
path another node wrote waits, at run time, until its node holds the path's
latest contents (``loadtest.runner``). The planner keeps such operations
apart in time (``COOLDOWN_S``) so that waits stay short, never reuses a
deleted path's name, and writes a partitioned or stopped node's paths only
from the side that can see them — so that the only concurrent writes are the
ones it makes on purpose (storms), whose conflicts it can then count exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

OpKind = Literal["write", "patch", "append", "delete", "rename", "mkdir", "rmdir"]
FaultKind = Literal["stop", "start", "partition", "heal", "kill", "freeze", "thaw"]
KIB = 1024
MIB = 1 << 20
COOLDOWN_S = 3.0  # an op by another node than the last writer waits this long after it


@dataclass(frozen=True)
class Op:
    t: float
    kind: OpKind
    node: int
    path: str
    wid: int
    size: int = 0  # write: file size; patch, append: bytes changed
    offset: int = 0  # patch
    dst: str = ""  # rename
    style: Literal["replace", "truncate"] = "replace"
    paths: tuple[str, ...] = ()  # rmdir (path: the folder): the files the plan has in it


@dataclass(frozen=True)
class Storm:
    """``ops`` on different nodes, made while the writers cannot see each other:
    frozen (``freeze``), or on both sides of a partition."""

    t: float
    ops: tuple[Op, ...]
    freeze: bool


@dataclass(frozen=True)
class Race:
    """``ops`` on different nodes at once, nothing frozen: a folder removed on one
    node while another creates a file in it. What each op saw is what its node
    held (``loadtest.history``), whichever way the race went."""

    t: float
    ops: tuple[Op, ...]


@dataclass(frozen=True)
class Fault:
    t: float
    kind: FaultKind
    nodes: tuple[int, ...] = ()  # stop/start/kill/freeze/thaw: the node; partition: one side
    # kill: first wait (up to ``wait_s``) until the link (sender, receiver) has carried
    # TRANSFER_BYTES more, i.e. a push of ``path`` (a multi-MiB file) is under way
    during: tuple[int, int] | None = None
    wait_s: float = 0.0
    path: str = ""


Step = Op | Storm | Race | Fault


@dataclass(frozen=True)
class Plan:
    profile: str
    nodes: int
    duration: float
    rate: float
    seed: int
    steps: tuple[Step, ...]
    join: bool = False  # after convergence, an empty node joins (loadtest.runner)

    def ops(self) -> list[Op]:
        out: list[Op] = []
        for s in self.steps:
            if isinstance(s, Op):
                out.append(s)
            elif isinstance(s, Storm | Race):
                out.extend(s.ops)
        return out


@dataclass
class PathState:
    node: int  # last writer
    t: float  # last op
    size: int
    side: frozenset[int] | None = None  # during a partition: who may touch it


@dataclass
class Planner:
    """The model a plan is drawn from: which paths live, who wrote them last, when."""

    nodes: int
    seed: int
    rng: random.Random = field(init=False)
    live: dict[str, PathState] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    wid: int = 0
    serial: int = 0
    down: set[int] = field(default_factory=set)
    sides: tuple[frozenset[int], frozenset[int]] | None = None
    cut_at: float | None = None

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    # --- names and ids ----------------------------------------------------------------

    def next_wid(self) -> int:
        self.wid += 1
        return self.wid

    def new_path(self, folder: str, ext: str = ".dat") -> str:
        self.serial += 1
        return f"{folder}/f{self.serial:06d}{ext}"

    def up(self) -> list[int]:
        return [n for n in range(self.nodes) if n not in self.down]

    def side_of(self, node: int) -> frozenset[int] | None:
        if self.sides is None:
            return None
        return self.sides[0] if node in self.sides[0] else self.sides[1]

    # --- choosing ---------------------------------------------------------------------

    def pick_node(self) -> int:
        return self.rng.choice(self.up() or list(range(self.nodes)))

    def pick_path(self, node: int, t: float, prefix: str = "") -> str | None:
        """A live path ``node`` may touch at ``t``: its own last write, or one that has
        had time to spread, on its side of a partition, and not a stopped node's."""
        side = self.side_of(node)
        ok = [p for p, st in self.live.items()
              if p.startswith(prefix)
              and (st.node == node or t - st.t >= COOLDOWN_S)
              and (st.side is None or node in st.side)
              and (st.node not in self.down or st.node == node)
              and (side is None or st.side is None or st.side == side)]
        if not ok:
            return None
        return self.rng.choice(sorted(ok))

    # --- operations -------------------------------------------------------------------

    def _touch(self, path: str, node: int, t: float, size: int) -> None:
        side = self.side_of(node)
        self.live[path] = PathState(node, t, size, side)

    def write(self, t: float, node: int, path: str, size: int) -> Op:
        style: Literal["replace", "truncate"] = (
            "truncate" if path in self.live and self.rng.random() < 0.3 else "replace")
        op = Op(t, "write", node, path, self.next_wid(), size=size, style=style)
        self._touch(path, node, t, size)
        return op

    def add(self, step: Step) -> None:
        self.steps.append(step)

    def create(self, t: float, folder: str, size: int, node: int | None = None) -> None:
        n = self.pick_node() if node is None else node
        self.add(self.write(t, n, self.new_path(folder), size))

    def change(self, t: float, kind: OpKind, prefix: str = "", size: int = 0) -> bool:
        """``kind`` on a live path under ``prefix`` by a random node that may touch it
        (``size``: of a write, or bytes of a patch); False if there is none."""
        node = self.pick_node()
        path = self.pick_path(node, t, prefix)
        if path is None:
            return False
        if kind == "write":
            self.add(self.write(t, node, path, size))
            return True
        st = self.live.pop(path)
        op = Op(t, kind, node, path, self.next_wid())
        if kind == "patch":
            offset = self.rng.randrange(0, max(1, st.size - size))
            op = Op(t, kind, node, path, op.wid, size=size, offset=offset)
            self._touch(path, node, t, st.size)
        elif kind == "rename":
            op = Op(t, kind, node, path, op.wid, dst=self.new_path(path.rsplit("/", 1)[0], ".ren"))
            self._touch(op.dst, node, t, st.size)
        self.add(op)
        return True

    def mixed(self, t: float, folder: str, sizes: Callable[[], int]) -> None:
        """Create 35 %, overwrite 20 %, patch 10 %, rename 15 %, delete 20 %."""
        r = self.rng.random()
        prefix = folder + "/"
        if r < 0.35:
            done = False
        elif r < 0.55:
            done = self.change(t, "write", prefix, sizes())
        elif r < 0.65:
            done = self.change(t, "patch", prefix, self.rng.randint(16, 4 * KIB))
        elif r < 0.80:
            done = self.change(t, "rename", prefix)
        else:
            done = self.change(t, "delete", prefix)
        if not done:  # a create, or nothing was there to change
            self.create(t, f"{folder}/d{self.rng.randrange(8)}", sizes())

    def storm(self, t: float, writers: list[int], new: int, old: int, freeze: bool,
              folder: str = "storm") -> None:
        """``new`` fresh paths and up to ``old`` settled ones, written by every node of
        ``writers`` at once; on a settled path one writer may delete instead (an edit
        beats a delete)."""
        paths = [self.new_path(folder) for _ in range(new)]
        # settled: had time to reach every node (before the links were cut, if they are)
        limit = t - 2 * COOLDOWN_S
        if self.cut_at is not None:
            limit = min(limit, self.cut_at - COOLDOWN_S)
        settled = sorted(p for p, st in self.live.items()
                         if p.startswith(folder + "/") and st.t <= limit and st.side is None)
        paths += self.rng.sample(settled, min(old, len(settled)))
        ops: list[Op] = []
        for path in paths:
            deleter = (self.rng.choice(writers)
                       if path in self.live and self.rng.random() < 0.3 else None)
            for n in writers:
                if n == deleter:
                    ops.append(Op(t, "delete", n, path, self.next_wid()))
                else:
                    ops.append(Op(t, "write", n, path, self.next_wid(),
                                  size=self.rng.randint(64, 8 * KIB)))
            self._touch(path, writers[0], t, 8 * KIB)
            # every writer's content ends up on every node, so anyone may touch it
            # later — once the links are back if they are cut
            self.live[path].side = None if self.cut_at is None else frozenset()
        self.add(Storm(t, tuple(ops), freeze))

    # --- faults -----------------------------------------------------------------------

    def stop(self, t: float, node: int) -> None:
        self.down.add(node)
        self.add(Fault(t, "stop", (node,)))

    def start(self, t: float, node: int) -> None:
        self.down.discard(node)
        self.add(Fault(t, "start", (node,)))
        for st in self.live.values():
            st.t = max(st.t, t)  # give what it wrote alone time to spread

    def partition(self, t: float, side: frozenset[int]) -> None:
        other = frozenset(range(self.nodes)) - side
        self.sides = (side, other)
        self.cut_at = t
        self.add(Fault(t, "partition", tuple(sorted(side))))

    def heal(self, t: float) -> None:
        self.sides = None
        self.cut_at = None
        self.add(Fault(t, "heal"))
        for st in self.live.values():
            st.side = None
            st.t = max(st.t, t)

    def plan(self, profile: str, duration: float, rate: float) -> Plan:
        return Plan(profile, self.nodes, duration, rate, self.seed, tuple(self.steps))
