"""One plan against one target: set up, load, converge, measure, tear down.

Operations start at their planned times, each as a task; operations on one
path run in plan order (a FIFO lock per path). An operation on a path waits,
up to ``Settings.wait_s``, for its node to hold the path's current heads
(``History.need``), so that it sees them; after that it writes anyway and the
history records what it did see. A storm first lets its writers catch up with
the paths, then freezes them (SIGSTOP of their processes) or relies on a
partition, makes every write at once, and thaws them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.history import SHOWN, History, conflicts
from loadtest.jsonl import ChildError, JsonChild
from loadtest.measure import Seen, delivery, percentiles, timeline
from loadtest.plan import Fault, Op, Plan, Storm
from loadtest.probe import original_of
from loadtest.targets import Target

SAMPLE_S = 1.0
LOGS_S = 30.0
IDLE_GRACE_S = 30.0


@dataclass(frozen=True)
class Settings:
    wait_s: float = 20.0  # an op waits this long for its node to hold the path
    converge_s: float = 120.0  # after the load, at most this long for identical trees
    ready_s: float = 90.0  # cluster start-up, until a file written anywhere is everywhere
    poll_s: float = 0.5


@dataclass(frozen=True)
class Converged:
    converged: bool  # identical trees, twice in a row
    converge_s: float | None  # from the end of the load to the first of those
    idle: bool  # and the system said it had nothing left to do
    trees: list[dict[str, str]]


@dataclass
class Progress:
    """What the runner tells the terminal: ``advance`` per op, ``phase`` changes."""

    advance: Callable[[int], None] = lambda n: None
    phase: Callable[[str], None] = lambda text: None


@dataclass
class Tally:
    forced: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    lag_ms: list[float] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)


class Runner:
    def __init__(self, target: Target, plan: Plan, key: str, settings: Settings,
                 progress: Progress | None = None) -> None:
        self.target, self.plan, self.key, self.settings = target, plan, key, settings
        self.progress = progress or Progress()
        self.seen = Seen()
        self.history = History()
        self.tally = Tally()
        self.probes: list[JsonChild] = []
        self.locks: dict[str, asyncio.Lock] = {}
        self._ready: list[asyncio.Event] = []
        self._faults: asyncio.Task[None] | None = None

    # --- the run ------------------------------------------------------------------------

    async def run(self, logs: Path) -> dict[str, Any]:
        """The system's block of the report; probe logs go to ``logs``."""
        sampler: asyncio.Task[None] | None = None
        try:
            self.progress.phase("starting")
            await self.target.up()
            await self.target.settle()
            await self._start_probes(logs)
            await self._wait_ready()
            self.target.reset_meters()
            await self.target.wire_bytes(reset=True)
            await self.target.sample()
            self.target.reset_meters()
            sampler = asyncio.create_task(self._sample())
            start = time.time()
            self.progress.phase("load")
            await self._execute()
            end = time.time()
            self.progress.phase("converging")
            outcome = await self._converge(end)
            await self.target.sample()
            wire = await self.target.wire_bytes()
            logged = await self._conflict_logs()
            self._dump(logs / "history.json", start, outcome.trees, logged)
            return self._report(start, end, outcome, wire, logged)
        finally:
            if sampler is not None:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            for p in self.probes:
                await p.close()
            await self.target.down()

    async def _start_probes(self, logs: Path) -> None:
        for i in range(self.target.size):
            ready = asyncio.Event()
            self._ready.append(ready)

            def on_event(doc: dict[str, Any], i: int = i, ready: asyncio.Event = ready) -> None:
                if doc.get("ev") == "ready":
                    ready.set()
                self.seen.on_event(i, doc)

            child = JsonChild(f"probe {self.target.names[i]}", on_event)
            self.probes.append(child)
            await child.start(self.target.probe_argv(i), logs / f"probe-{self.target.names[i]}.log")
        for i, ready in enumerate(self._ready):
            try:
                await asyncio.wait_for(ready.wait(), self.settings.ready_s)
            except TimeoutError:
                raise ChildError(f"probe {self.target.names[i]} did not start") from None

    async def _wait_ready(self) -> None:
        """Every node writes a marker; the cluster is ready when each is everywhere."""
        marks = []
        for i, p in enumerate(self.probes):
            path = f"ready/{self.target.names[i]}"
            ans = await p.request({"op": "write", "path": path, "key": f"ready-{self.key}",
                                   "wid": -1 - i, "size": 64, "force": True})
            if not ans.get("ok"):
                raise ChildError(f"marker on {self.target.names[i]}: {ans}")
            marks.append((path, ans["hash"]))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.ready_s
        n = self.target.size
        while not all((j, path, h) in self.seen.puts
                      for path, h in marks for j in range(n)
                      if not path.endswith(f"/{self.target.names[j]}")):
            if loop.time() > deadline:
                raise ChildError(f"{self.target.system}: the nodes did not exchange a file "
                                 f"within {self.settings.ready_s:.0f} s")
            await asyncio.sleep(0.1)

    async def _sample(self) -> None:
        while True:
            await self.target.sample()
            await asyncio.sleep(SAMPLE_S)

    async def _execute(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tasks: list[asyncio.Task[None]] = []
        for step in self.plan.steps:
            delay = t0 + step.t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            planned = t0 + step.t
            if isinstance(step, Fault):
                self._faults = asyncio.create_task(self._fault(step, self._faults))
            elif isinstance(step, Storm):
                tasks.append(asyncio.create_task(self._storm(step, planned)))
            else:
                tasks.append(asyncio.create_task(self._op(step, planned)))
        limit = self.settings.wait_s + 600
        if self._faults is not None:
            tasks.append(self._faults)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=limit)
            for t in pending:
                t.cancel()
                self.tally.skipped["timed out"] += 1
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        await self.target.partition(None)  # the plans end healed; make sure

    # --- operations ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked(self, paths: Sequence[str]) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for p in sorted(set(paths)):
                await stack.enter_async_context(self.locks.setdefault(p, asyncio.Lock()))
            yield

    def _request(self, op: Op, need: list[str | None], force: bool) -> dict[str, Any]:
        req: dict[str, Any] = {"op": op.kind, "path": op.path, "key": self.key, "wid": op.wid,
                               "need": need, "force": force}
        if op.kind == "write":
            req |= {"size": op.size, "style": op.style}
        elif op.kind == "patch":
            req |= {"offset": op.offset, "length": op.size}
        elif op.kind == "rename":
            req["dst"] = op.dst
        return req

    async def _op(self, op: Op, planned: float) -> None:
        paths = [op.path, op.dst] if op.dst else [op.path]
        loop = asyncio.get_running_loop()
        async with self._locked(paths):
            self.tally.lag_ms.append((loop.time() - planned) * 1000)
            deadline = loop.time() + self.settings.wait_s
            force = False
            for _ in range(10_000):  # each round waits up to 1 s for a change
                need = self.history.need(op.path)
                ans = await self.probes[op.node].request(self._request(op, need, force))
                if ans.get("ok"):
                    self._record(op, ans, force)
                    break
                if ans.get("absent") or ans.get("exists") or ans.get("error") or force:
                    self.tally.skipped[_why(ans)] += 1
                    break
                remaining = deadline - loop.time()
                if remaining <= 0:
                    force = True
                    self.tally.forced += 1
                    continue
                await self.seen.change_on(op.node, op.path, min(1.0, remaining))
        self.progress.advance(1)

    async def _storm(self, storm: Storm, planned: float) -> None:
        paths = sorted({o.path for o in storm.ops})
        loop = asyncio.get_running_loop()
        async with self._locked(paths):
            self.tally.lag_ms.append((loop.time() - planned) * 1000)
            base = {p: self.history.need(p) for p in paths}
            await self._until_held(storm.ops, base)
            writers = sorted({o.node for o in storm.ops})
            if storm.freeze:
                await self.target.freeze(writers, True)
            try:
                answers = await asyncio.gather(*(
                    self.probes[o.node].request(self._request(o, base[o.path], True))
                    for o in storm.ops))
            finally:
                if storm.freeze:
                    await self.target.freeze(writers, False)
            for o, ans in zip(storm.ops, answers, strict=True):
                if ans.get("ok"):
                    self._record(o, ans, False)
                else:
                    self.tally.skipped[_why(ans)] += 1
        self.progress.advance(len(storm.ops))

    async def _until_held(self, ops: Sequence[Op], base: dict[str, list[str | None]]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.wait_s
        for o in ops:
            for _ in range(10_000):
                ans = await self.probes[o.node].request(
                    {"op": "holds", "path": o.path, "need": base[o.path]})
                remaining = deadline - loop.time()
                if ans.get("ok") or remaining <= 0:
                    break
                await self.seen.change_on(o.node, o.path, min(1.0, remaining))

    def _record(self, op: Op, ans: dict[str, Any], forced: bool) -> None:
        self.tally.kinds[op.kind] += 1
        common = {"wid": op.wid, "node": op.node, "t0": ans["t0"], "t": ans["t"],
                  "forced": forced}
        if op.kind == "rename":
            self.history.add(path=op.path, hash=None, changed=0, held=ans["held"],
                             kind="rename-from", **common)
            self.history.add(path=op.dst, hash=ans["hash"], changed=0, held=[],
                             kind="rename-to", **common)
            return
        self.history.add(path=op.path, hash=ans["hash"], changed=ans["size"],
                         held=ans["held"], kind=op.kind, **common)

    async def _fault(self, fault: Fault, before: asyncio.Task[None] | None) -> None:
        if before is not None:
            await before
        if fault.kind == "stop":
            await self.target.stop_node(fault.nodes[0])
        elif fault.kind == "start":
            await self.target.start_node(fault.nodes[0])
        elif fault.kind == "partition":
            await self.target.partition(set(fault.nodes))
        else:
            await self.target.partition(None)

    # --- after the load --------------------------------------------------------------------

    async def _snapshots(self) -> list[dict[str, str]]:
        answers = await asyncio.gather(*(p.request({"op": "snapshot"}) for p in self.probes))
        return [a["files"] for a in answers]

    async def _converge(self, end: float) -> Converged:
        """Until every node holds the same tree twice in a row and the system says it
        is idle. ``converge_s`` counts from the load's end to the first of those
        snapshots. Trees that stay the same ``IDLE_GRACE_S`` while the system still
        says it is busy count as converged, not idle."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.converge_s
        same_since: float | None = None
        previous: dict[str, str] | None = None
        trees: list[dict[str, str]] = []
        while loop.time() < deadline:
            at = time.time()
            trees = await self._snapshots()
            if all(t == trees[0] for t in trees[1:]):
                if trees[0] != previous:
                    same_since, previous = at, trees[0]
                else:
                    assert same_since is not None
                    converge_s = max(0.0, same_since - end)
                    if await self.target.quiescent():
                        return Converged(True, converge_s, True, trees)
                    if at - same_since > IDLE_GRACE_S:
                        return Converged(True, converge_s, False, trees)
            else:
                previous = None
            await asyncio.sleep(self.settings.poll_s)
        return Converged(False, None, False, trees or await self._snapshots())

    async def _conflict_logs(self) -> dict[int, list[tuple[str, str, str | None, str]]]:
        """The nodes' conflict logs, once they hold the same conflicts (a node logs one
        when it learns both versions, which can follow the trees' convergence), or
        as they are after ``LOGS_S``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOGS_S
        while True:
            logged = await self.target.conflicts()
            ids = [{c[3] for c in entries} for entries in logged.values()]
            if all(i == ids[0] for i in ids[1:]) or loop.time() > deadline:
                return logged
            await asyncio.sleep(self.settings.poll_s)

    def _dump(self, path: Path, start: float, trees: list[dict[str, str]],
              logged: dict[int, list[tuple[str, str, str | None, str]]]) -> None:
        """Everything the analysis used, to look into a finding after the run."""
        doc = {"start": start, "names": self.target.names,
               "records": [asdict(r) | {"saw": sorted(r.saw)} for r in self.history.records],
               "trees": trees, "conflicts": {str(k): v for k, v in logged.items()},
               "puts": [[*k, t] for k, t in self.seen.puts.items()],
               "dels": [[*k, ts] for k, ts in self.seen.dels.items()]}
        path.write_text(json.dumps(doc))

    def _conflicts(self, logged: dict[int, list[tuple[str, int, str | None, str]]]
                   ) -> dict[str, Any]:
        out = conflicts(self.history, logged)
        out["conflicts_logged_per_node"] = {
            self.target.names[int(k)]: v for k, v in out["conflicts_logged_per_node"].items()}
        return out

    def _report(self, start: float, end: float, outcome: Converged, wire: int | None,
                logged: dict[int, list[tuple[str, str, str | None, str]]]) -> dict[str, Any]:
        h, n = self.history, self.target.size
        trees, converge_s = outcome.trees, outcome.converge_s
        names = self.target.names
        by_index = {node: [(p, names.index(ln) if ln in names else -1, lh, cid)
                           for p, ln, lh, cid in entries]
                    for node, entries in logged.items()}
        lost = h.lost(trees)
        finals = [h.final_state(t) for t in trees]
        d = delivery(h, self.seen, n)
        changed = sum(r.changed for r in h.records)
        window = (max(t for t, _ in d.complete) - start) if d.complete else None
        block: dict[str, Any] = {
            "system": self.target.system,
            "converged": outcome.converged,
            "idle": outcome.idle,
            "converge_s": None if converge_s is None else round(converge_s, 2),
            "lost_writes": len(lost),
            "lost": [{"wid": r.wid, "node": names[r.node], "path": r.path, "kind": r.kind,
                      "t_s": round(r.t - start, 3)} for r in lost[:SHOWN]],
            "resurrected_deletes": max(len(r) for r, _ in finals),
            "resurrected": max((r for r, _ in finals), key=len)[:SHOWN],
            "stale_paths": max(len(s) for _, s in finals),
            "stale": max((s for _, s in finals), key=len)[:SHOWN],
            "conflict_copies": max(sum(1 for p in t if original_of(p)) for t in trees),
            **self._conflicts(by_index),
            "latency_ms": percentiles(d.latency_ms),
            "latency_all_ms": percentiles(d.all_ms),
            "throughput_files_s": round(len(d.complete) / window, 2) if window else None,
            "throughput_mb_s": (round(sum(b for _, b in d.complete) / 2**20 / window, 3)
                                if window else None),
            "load_s": round(end - start, 2),
            "writes": len(h.records),
            "ops": dict(self.tally.kinds),
            "offered_ops_s": round(sum(self.tally.kinds.values()) / max(0.001, end - start), 2),
            "forced_writes": self.tally.forced,
            "skipped_ops": dict(self.tally.skipped),
            "issue_lag_ms": percentiles(self.tally.lag_ms),
            "bytes_changed": changed,
            "wire_bytes": wire,
            "wire_per_changed_per_peer": (round(wire / (changed * (n - 1)), 2)
                                          if wire is not None and changed else None),
            "cpu_s": {k: v["cpu_s"] for k, v in self.target.usage().items()},
            "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in self.target.usage().items()},
            "timeline": timeline(d.arrivals, start, n - 1),
            "latency_samples_ms": sorted(round(x, 1) for x in d.latency_ms),
        }
        return block


def _why(ans: dict[str, Any]) -> str:
    if ans.get("absent"):
        return "path absent on the node"
    if ans.get("exists"):
        return "rename target exists"
    if ans.get("error"):
        return "error"
    return "refused"
