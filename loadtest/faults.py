"""The ``faults`` profile (issue 11): the mixed load with multi-MiB files, writes
of one path on 2-3 nodes at once, folder deletes racing creates, and one fault
at a time, then an empty node joins.

The load, about 6 ops/s: creates, overwrites, appends, in-place patches,
renames, deletes, mkdir and rmdir (of a folder with every file in it its node
knows), 2-8 MiB files; 1 tick in 17 is a storm (one path written or deleted
on 2-3 nodes frozen together, so none sees another's write: about 10 % of the
ops); 1 in 33 a race (one node removes a folder - empty there, or with the
files it holds - while another creates a file in it, nothing frozen).

The faults, one after another from 10 % of the run to its last seconds, each
kind at least once (shorter in short runs): ``kill`` (SIGKILL of the node's
agent with its lsyncd and rsync children, restart 2-8 s later), ``kill-send``
and ``kill-recv`` (a 3-8 MiB file written, then the sender, or the receiver,
killed once a push of it is under way: as soon as the link carried 1 MiB more,
within the fault's 2.5-10 s, whose end is the restart), ``freeze`` (SIGSTOP
of the node's processes for 2-6 s) and ``partition`` (the node cut off for
5-20 s). Faults happen to the agents only: each node's probe goes on writing,
so what a killed, frozen or cut-off node's user does is an offline edit.

The planner's model: for every file and folder, from when each node surely
holds its latest version (``Known.holders``). A write's node holds it at
once, the nodes it can reach ``COOLDOWN_S`` later. A fault on node X splits
the nodes into two sides, {X} and the others: what one side wrote and the
other did not hold yet reaches the other side only when the fault is over,
``SETTLE_AFTER`` (a restarted agent starts, links and catches up) plus
``COOLDOWN_S`` later. A node changes a path only once it holds it, so the
only concurrent writes are the storms' and the races' (a delete of what the
remover held, against a create it did not see) — the history tells them apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from loadtest.plan import COOLDOWN_S, KIB, MIB, Fault, Op, OpKind, Planner, Race, Storm

TOP = "faults"
BIG = (2 * MIB, 8 * MIB)
TRANSFER_BIG = (3 * MIB, 8 * MIB)  # the file whose push a kill cuts short
# (kind, shortest, longest) seconds of each fault; restarts come at the end
FAULTS = (("kill", 2.0, 8.0), ("kill-send", 2.5, 10.0), ("kill-recv", 2.5, 10.0),
          ("freeze", 2.0, 6.0), ("partition", 5.0, 20.0))
GAP = (2.0, 5.0)  # seconds between two faults (in a 90 s run)
# after a fault, how long (beyond COOLDOWN_S) the others leave what the two sides
# changed meanwhile: a restarted agent starts, links and catches up; links that were
# refused come back within their backoff (mesh.adapters.mqtt.links: up to 10 s)
SETTLE_AFTER = {"kill": 3.0, "kill-send": 3.0, "kill-recv": 3.0, "freeze": 1.0,
                "partition": 3.0}
MIX = (("storm", 0.06), ("race", 0.03), ("rmdir", 0.02), ("mkdir", 0.03), ("big", 0.03),
       ("append", 0.06), ("patch", 0.06), ("write", 0.15), ("rename", 0.08),
       ("delete", 0.10))  # the rest: creates


@dataclass(frozen=True)
class Episode:
    start: float
    end: float
    kind: str
    node: int  # the node the fault hits
    other: int  # kill-send: the receiver; kill-recv: the sender


@dataclass
class Known:
    """A file or a folder as the planner knows it."""

    size: int
    holders: dict[int, float]  # node -> from when it surely holds the latest version


@dataclass
class FaultPlanner(Planner):
    files: dict[str, Known] = field(default_factory=dict)
    folders: dict[str, Known] = field(default_factory=dict)  # top-level folders alive
    folders_gone: dict[str, Known] = field(default_factory=dict)  # removed ones
    folder_serial: int = 0
    hit: int | None = None  # the node the current fault hits

    # --- who holds what --------------------------------------------------------------------

    def together(self, a: int, b: int) -> bool:
        """Whether a change on ``a`` reaches ``b`` now."""
        return self.hit is None or (a == self.hit) == (b == self.hit)

    def made(self, writers: list[int], t: float, spread: float = COOLDOWN_S) -> Known:
        """What a change made by ``writers`` at ``t`` is known as: each writer holds
        its own (and a lone writer the result) at once; a node holds the result
        ``spread`` s after, if every writer reaches it; else only after the fault."""
        holders: dict[int, float] = {}
        for n in range(self.nodes):
            if all(self.together(w, n) for w in writers):
                holders[n] = t if writers == [n] else t + spread
        return Known(0, holders)

    def may(self, node: int, t: float, k: Known) -> bool:
        return k.holders.get(node, math.inf) <= t

    def pick(self, node: int, t: float) -> str | None:
        ok = [p for p, k in self.files.items() if self.may(node, t, k)]
        return self.rng.choice(sorted(ok)) if ok else None

    def usable_folders(self, node: int, t: float) -> list[str]:
        return sorted(f for f, k in self.folders.items() if self.may(node, t, k))

    # --- operations ------------------------------------------------------------------------

    def new_folder(self, node: int, t: float) -> str:
        self.folder_serial += 1
        folder = f"{TOP}/d{self.folder_serial:03d}"
        self.folders[folder] = self.made([node], t)
        return folder

    def file_path(self, node: int, t: float) -> str:
        """A new file's path: in a folder ``node`` holds (85 in 100), else a new one;
        one in seven a level deeper."""
        usable = self.usable_folders(node, t)
        if usable and self.rng.random() < 0.85:
            folder = self.rng.choice(usable)
        else:
            folder = self.new_folder(node, t)
        if self.rng.random() < 0.15:
            folder += f"/sub{self.rng.randrange(3)}"
        return self.new_path(folder)

    def small(self) -> int:
        """256 B to 64 KiB, log-uniform."""
        return int(256 * 2 ** (self.rng.random() * 8))

    def big(self, sizes: tuple[int, int] = BIG) -> int:
        return self.rng.randint(*sizes)

    def put(self, t: float, node: int, path: str, size: int) -> Op:
        """A write of ``path`` (new or not) on ``node``."""
        style: Literal["replace", "truncate"] = (
            "truncate" if path in self.files and self.rng.random() < 0.3 else "replace")
        op = Op(t, "write", node, path, self.next_wid(), size=size, style=style)
        self.files[path] = self.made([node], t)
        self.files[path].size = size
        return op

    def create_at(self, t: float, node: int, size: int) -> Op:
        op = self.put(t, node, self.file_path(node, t), size)
        self.add(op)
        return op

    def change_on(self, t: float, node: int, kind: OpKind, size: int = 0) -> bool:
        path = self.pick(node, t)
        if path is None:
            return False
        if kind == "write":
            self.add(self.put(t, node, path, size))
            return True
        known = self.files.pop(path)
        wid = self.next_wid()
        if kind == "patch":
            length = self.rng.randint(16, 4 * KIB)
            offset = self.rng.randrange(0, max(1, known.size - length))
            self.add(Op(t, kind, node, path, wid, size=length, offset=offset))
            self.files[path] = self.made([node], t)
            self.files[path].size = known.size
        elif kind == "append":
            length = self.rng.randint(KIB, 64 * KIB)
            self.add(Op(t, kind, node, path, wid, size=length))
            self.files[path] = self.made([node], t)
            self.files[path].size = known.size + length
        elif kind == "rename":
            dst = self.new_path(path.rsplit("/", 1)[0], ".ren")
            self.add(Op(t, kind, node, path, wid, dst=dst))
            self.files[dst] = self.made([node], t)
            self.files[dst].size = known.size
        else:
            self.add(Op(t, kind, node, path, wid))
        return True

    def mkdir(self, t: float, node: int) -> None:
        self.add(Op(t, "mkdir", node, self.new_folder(node, t), self.next_wid()))

    def rmdir(self, t: float, node: int, race: bool) -> bool:
        """``node`` removes a folder with every file it holds there; with ``race``,
        another node creates a file in it at the same moment. Half the races take
        a folder with no file (as mkdir left it) when there is one."""
        usable = [f for f in self.usable_folders(node, t)
                  if all(self.may(node, t, k) for p, k in self.files.items()
                         if p.startswith(f + "/"))]
        if not usable:
            return False
        empty = [f for f in usable if not any(p.startswith(f + "/") for p in self.files)]
        folder = self.rng.choice(empty if race and empty and self.rng.random() < 0.5
                                 else usable)
        files = tuple(sorted(p for p in self.files if p.startswith(folder + "/")))
        for p in files:
            del self.files[p]
        self.folders_gone[folder] = self.folders.pop(folder)  # no new file goes there
        # any more (but the race's)
        op = Op(t, "rmdir", node, folder, self.next_wid(), paths=files)
        if not race:
            self.add(op)
            return True
        others = [n for n in range(self.nodes) if n != node]
        holding = [n for n in others if self.may(n, t, self.folders_gone[folder])]
        other = self.rng.choice(holding or others)  # one that has the folder, if any
        size = self.big() if self.rng.random() < 0.2 else self.small()
        child = self.put(t, other, self.new_path(folder), size)
        self.add(Race(t, (child, op)))  # the create is recorded first
        return True

    def storm1(self, t: float) -> bool:
        """One path written by 2 or 3 nodes frozen together (one of them may delete an
        existing path instead): a new file in a folder they all hold, or a file they
        all hold."""
        writers = sorted(self.rng.sample(range(self.nodes),
                                         min(self.nodes, self.rng.choice((2, 2, 3)))))
        if self.rng.random() < 0.5:
            folders = [f for f, k in sorted(self.folders.items())
                       if all(self.may(w, t, k) for w in writers)]
            if not folders:
                return False
            path = self.new_path(self.rng.choice(folders))
        else:
            held = [p for p, k in sorted(self.files.items())
                    if all(self.may(w, t, k) for w in writers)]
            if not held:
                return False
            path = self.rng.choice(held)
        deleter = (self.rng.choice(writers)
                   if path in self.files and self.rng.random() < 0.3 else None)
        ops: list[Op] = []
        for n in writers:
            if n == deleter:
                ops.append(Op(t, "delete", n, path, self.next_wid()))
            else:
                size = self.big((BIG[0], BIG[0] * 2)) if self.rng.random() < 0.15 else self.small()
                ops.append(Op(t, "write", n, path, self.next_wid(), size=size))
        # no writer holds the outcome (the winner, the losers' copies) before it spread
        self.files[path] = self.made(writers, t, 2 * COOLDOWN_S)
        self.files[path].size = BIG[0] * 2
        self.add(Storm(t, tuple(ops), freeze=True))
        return True

    def tick(self, t: float) -> None:
        node = self.pick_node()
        r = self.rng.random()
        kind = "create"
        for name, share in MIX:
            if r < share:
                kind = name
                break
            r -= share
        done = False
        if kind == "storm":
            done = self.storm1(t)
        elif kind in ("race", "rmdir"):
            done = self.rmdir(t, node, race=kind == "race")
        elif kind == "mkdir":
            self.mkdir(t, node)
            done = True
        elif kind == "big":
            if self.rng.random() < 0.6:
                self.create_at(t, node, self.big())
                done = True
            else:
                done = self.change_on(t, node, "write", self.big())
        elif kind == "write":
            done = self.change_on(t, node, "write", self.small())
        elif kind in ("append", "patch", "rename", "delete"):
            done = self.change_on(t, node, kind)  # type: ignore[arg-type]
        if not done:
            self.create_at(t, node, self.small())

    # --- faults ----------------------------------------------------------------------------

    def isolate(self, t: float, node: int) -> None:
        """From ``t`` ``node`` is cut from the others: a node that does not hold a
        version yet gets it during the fault only from its own side."""
        for k in [*self.files.values(), *self.folders.values()]:
            have = [n for n, since in k.holders.items() if since <= t]
            for n in [n for n, since in k.holders.items() if since > t]:
                if not any((a == node) == (n == node) for a in have):
                    del k.holders[n]
        self.hit = node

    def rejoin(self, t: float, settle: float) -> None:
        """The fault is over at ``t``: every node gets what it lacks ``settle`` +
        ``COOLDOWN_S`` s later."""
        for k in [*self.files.values(), *self.folders.values()]:
            for n in range(self.nodes):
                k.holders.setdefault(n, t + settle + COOLDOWN_S)
        self.hit = None

    def begin(self, ep: Episode) -> None:
        t, x = ep.start, ep.node
        if ep.kind == "kill":
            self.add(Fault(t, "kill", (x,)))
        elif ep.kind in ("kill-send", "kill-recv"):
            sender, receiver = (x, ep.other) if ep.kind == "kill-send" else (ep.other, x)
            op = self.create_at(t, sender, self.big(TRANSFER_BIG))
            self.add(Fault(round(t + 0.001, 4), "kill", (x,), during=(sender, receiver),
                           wait_s=round(max(0.5, ep.end - ep.start - 0.5), 3), path=op.path))
        elif ep.kind == "freeze":
            self.add(Fault(t, "freeze", (x,)))
        else:
            self.add(Fault(t, "partition", (x,)))
        self.isolate(t, x)

    def end(self, ep: Episode) -> None:
        if ep.kind == "freeze":
            self.add(Fault(ep.end, "thaw", (ep.node,)))
        elif ep.kind == "partition":
            self.add(Fault(ep.end, "heal"))
        else:
            self.add(Fault(ep.end, "start", (ep.node,)))
        self.rejoin(ep.end, SETTLE_AFTER[ep.kind])

    def episodes(self, duration: float) -> list[Episode]:
        """Faults one after another in [10 % of the run, the run's end - 15 %]: each
        kind once in a random order (shortened toward its shortest if the window is
        small), then random kinds while there is room."""
        first, last = 0.1 * duration, duration - min(8.0, 0.15 * duration)
        scale = min(1.0, duration / 90)
        kinds = list(FAULTS)
        self.rng.shuffle(kinds)
        lengths = [lo + (hi - lo) * scale * self.rng.random() for _, lo, hi in kinds]
        gaps = [(GAP[0] + (GAP[1] - GAP[0]) * self.rng.random()) * scale for _ in kinds]
        room = last - first
        need = sum(lengths) + sum(gaps[:-1])
        if need > room:  # shrink what is above the shortest, and the gaps, alike
            floor = sum(lo for _, lo, _ in kinds)
            f = max(0.0, (room - floor) / max(1e-9, need - floor))
            lengths = [lo + (length - lo) * f for (_, lo, _), length in zip(kinds, lengths,
                                                                               strict=True)]
            gaps = [g * f for g in gaps]
        out: list[Episode] = []
        t = first
        for k in range(100):
            if k < len(kinds):
                (kind, lo, _), length, gap = kinds[k], lengths[k], gaps[k]
            else:
                kind, lo, hi = self.rng.choice(FAULTS)
                length = lo + (hi - lo) * scale * self.rng.random()
                gap = (GAP[0] + (GAP[1] - GAP[0]) * self.rng.random()) * scale
            if t + length > last + 1e-6:
                if k < len(kinds):
                    continue  # does not fit even shortened: a very short run
                break
            node = self.rng.randrange(self.nodes)
            other = self.rng.choice([n for n in range(self.nodes) if n != node])
            out.append(Episode(round(t, 3), round(t + length, 3), kind, node, other))
            t += length + gap
        return out


def faults(p: Planner, duration: float, rate: float) -> None:
    assert isinstance(p, FaultPlanner)
    if p.nodes < 2:
        raise ValueError("the faults profile needs at least 2 nodes")
    n = max(1, math.floor(duration * rate))
    times = [round((k + p.rng.random()) / rate, 4) for k in range(n)]
    bounds: list[tuple[float, int, Episode]] = []  # (time, 0 begin / 1 end, episode)
    for ep in p.episodes(duration):
        bounds += [(ep.start, 0, ep), (ep.end, 1, ep)]
    bounds.sort(key=lambda b: (b[0], b[1]))
    k = 0
    for t in times:
        while k < len(bounds) and bounds[k][0] <= t:
            _, which, ep = bounds[k]
            (p.begin if which == 0 else p.end)(ep)
            k += 1
        p.tick(t)
    for _, which, ep in bounds[k:]:
        (p.begin if which == 0 else p.end)(ep)
    p.steps.sort(key=lambda s: s.t)
