"""One plan against one target: set up, load, converge, measure, tear down.

Operations start at their planned times, each as a task; operations on one
path run in plan order (a FIFO lock per path). An operation on a path waits,
up to ``Settings.wait_s``, for its node to hold the path's current heads
(``History.need``), so that it sees them; after that it writes anyway and the
history records what it did see. A storm first lets its writers catch up with
the paths, then freezes them (SIGSTOP of their processes) or relies on a
partition, makes every write at once, and thaws them. A race (a folder removed
on one node while another creates a file in it) lets the remover catch up with
the folder's files, then makes both at once, nothing frozen.

After the load and convergence come the checks (``_report``), each with the
history of every path it found wrong (``_histories``), and, when the plan says
so, an empty node joins (``_join``): once it has caught up, it must hold the
same tree and nothing may have changed on the others.
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

from loadtest.disk import DiskLog
from loadtest.history import SHOWN, History, conflicts, placed
from loadtest.jsonl import ChildError, JsonChild
from loadtest.measure import Seen, delivery, percentiles, timeline
from loadtest.plan import MIB, Fault, Op, Plan, Race, Storm
from loadtest.probe import original_of
from loadtest.targets import Target

SAMPLE_S = 1.0
LOGS_S = 30.0
IDLE_GRACE_S = 30.0
TRANSFER_BYTES = MIB  # a kill "during a push" waits until the link carried this much more


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
        self.events: list[dict[str, Any]] = []  # faults, mkdir and rmdir, as they happened
        self.disk = DiskLog()  # keep areas and indexes over the run (issue 14)

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
            block = self._report(start, end, outcome, wire, logged)
            if block["histories"]:  # before the agents stop: what they say of the findings
                block["explained"] = await self._explain([h["path"] for h in block["histories"]])
            if self.plan.join:
                self.progress.phase("an empty node joins")
                block["join"] = await self._join(logs, outcome)
            self._dump(logs / "history.json", start, outcome.trees, logged, block.get("join"))
            return block
        finally:
            if sampler is not None:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            for p in self.probes:
                await p.close()
            await self.target.down()

    async def _start_probes(self, logs: Path, first: int = 0) -> None:
        for i in range(first, self.target.size):
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
            usage = await self.target.disk_usage()
            if usage is not None:
                self.disk.take(time.time(), usage)
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
            elif isinstance(step, Race):
                tasks.append(asyncio.create_task(self._race(step, planned)))
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
        await self.target.recover()  # and with every node running and thawed

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
        elif op.kind == "append":
            req["length"] = op.size
        elif op.kind == "rename":
            req["dst"] = op.dst
        return req

    async def _op(self, op: Op, planned: float) -> None:
        if op.kind in ("mkdir", "rmdir"):
            await self._folder_op(op, planned)
            return
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

    async def _holds(self, node: int, paths: Sequence[str], deadline: float) -> bool:
        """Until ``node`` holds the current heads of every one of ``paths``, at most
        until ``deadline`` (loop time): whether it does."""
        loop = asyncio.get_running_loop()
        for path in paths:
            for _ in range(10_000):
                ans = await self.probes[node].request(
                    {"op": "holds", "path": path, "need": self.history.need(path)})
                remaining = deadline - loop.time()
                if ans.get("ok"):
                    break
                if remaining <= 0:
                    return False
                await self.seen.change_on(node, path, min(1.0, remaining))
        return True

    async def _folder_op(self, op: Op, planned: float) -> None:
        """mkdir, or rmdir once the node holds the latest of the folder's files."""
        loop = asyncio.get_running_loop()
        async with self._locked([op.path, *op.paths]):
            self.tally.lag_ms.append((loop.time() - planned) * 1000)
            forced = False
            if op.kind == "rmdir" and not await self._holds(
                    op.node, op.paths, loop.time() + self.settings.wait_s):
                forced = True
                self.tally.forced += 1
            ans = await self.probes[op.node].request(self._request(op, [], True))
            if ans.get("ok"):
                self._record(op, ans, forced)
            else:
                self.tally.skipped[_why(ans)] += 1
        self.progress.advance(1)

    async def _race(self, race: Race, planned: float) -> None:
        """Every op at once once the folder's remover holds its files; the creates
        are recorded first (the remover may have seen what they made)."""
        loop = asyncio.get_running_loop()
        paths = [p for o in race.ops for p in (o.path, *o.paths)]
        async with self._locked(paths):
            self.tally.lag_ms.append((loop.time() - planned) * 1000)
            forced = False
            for o in race.ops:
                if o.kind == "rmdir" and not await self._holds(
                        o.node, o.paths, loop.time() + self.settings.wait_s):
                    forced = True
                    self.tally.forced += 1
            answers = await asyncio.gather(*(
                self.probes[o.node].request(self._request(o, self.history.need(o.path), True))
                for o in race.ops))
            for o, ans in sorted(zip(race.ops, answers, strict=True),
                                 key=lambda x: x[0].kind == "rmdir"):
                if ans.get("ok"):
                    self._record(o, ans, forced and o.kind == "rmdir")
                else:
                    self.tally.skipped[_why(ans)] += 1
        self.progress.advance(len(race.ops))

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
        if op.kind in ("mkdir", "rmdir"):
            removed = ans.get("removed", [])
            self.events.append({"t": ans["t0"], "kind": op.kind, "node": op.node,
                                "path": op.path, "wid": op.wid, "files": len(removed),
                                "gone": ans.get("gone", True)})
            for path, held in removed:  # a delete of each file, that saw what it held
                self.history.add(path=path, hash=None, changed=0, held=held, kind="rmdir",
                                 **common)
            return
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
        event: dict[str, Any] = {"t": time.time(), "kind": fault.kind,
                                 "nodes": list(fault.nodes)}
        if fault.kind == "stop":
            await self.target.stop_node(fault.nodes[0])
        elif fault.kind == "start":
            await self.target.start_node(fault.nodes[0])
        elif fault.kind == "kill":
            if fault.during is not None:
                a, b = fault.during
                reached, count = await self.target.until_bytes(a, b, TRANSFER_BYTES,
                                                               fault.wait_s)
                event |= {"link": [a, b], "path": fault.path, "link_reached": reached,
                          "link_bytes": count, "waited_s": round(time.time() - event["t"], 3)}
                event["t"] = time.time()
            await self.target.kill_node(fault.nodes[0])
        elif fault.kind in ("freeze", "thaw"):
            await self.target.freeze(list(fault.nodes), fault.kind == "freeze")
        elif fault.kind == "partition":
            await self.target.partition(set(fault.nodes))
        else:
            await self.target.partition(None)
        self.events.append(event)

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
              logged: dict[int, list[tuple[str, str, str | None, str]]],
              join: dict[str, Any] | None = None) -> None:
        """Everything the analysis used, to look into a finding after the run."""
        doc = {"start": start, "names": self.target.names,
               "records": [asdict(r) | {"saw": sorted(r.saw)} for r in self.history.records],
               "trees": trees, "conflicts": {str(k): v for k, v in logged.items()},
               "conflict_docs": {str(k): v for k, v in
                                 getattr(self.target, "conflict_docs", {}).items()},
               "events": self.events, "join": join,
               "puts": [[*k, t] for k, t in self.seen.puts.items()],
               "dels": [[*k, ts] for k, ts in self.seen.dels.items()]}
        path.write_text(json.dumps(doc))

    # --- the checks' findings, path by path ----------------------------------------------

    def _content(self, path: str, h: str | None) -> str:
        """A content as the history names it: the write that made it at ``path``."""
        if h is None:
            return "-"
        rid = self.history.by_content.get((original_of(path) or path, h))
        return f"w{self.history.records[rid].wid}" if rid is not None else f"?{h[:10]}"

    def _events(self, start: float) -> list[dict[str, Any]]:
        names = self.target.names
        out = []
        for e in sorted(self.events, key=lambda e: e["t"]):
            doc = {k: v for k, v in e.items() if k not in ("t", "nodes", "node", "link")}
            doc["t_s"] = round(e["t"] - start, 3)
            if "node" in e:
                doc["node"] = names[e["node"]]
            if "nodes" in e:
                doc["nodes"] = [names[n] for n in e["nodes"]]
            if "link" in e:
                doc["link"] = "->".join(names[n] for n in e["link"])
            out.append(doc)
        return out

    def _kills(self, start: float) -> list[dict[str, Any]]:
        """Each kill timed on a push: whether the receiver got the file before it."""
        names = self.target.names
        out = []
        for e in self.events:
            if e["kind"] != "kill" or "link" not in e:
                continue
            a, b = e["link"]
            rids = self.history.by_path.get(e["path"], [])
            h = self.history.records[rids[0]].hash if rids else None
            got = self.seen.puts.get((b, e["path"], h)) if h else None
            out.append({"t_s": round(e["t"] - start, 3), "killed": names[e["nodes"][0]],
                        "side": "sender" if e["nodes"][0] == a else "receiver",
                        "link": f"{names[a]}->{names[b]}", "path": e["path"],
                        "link_reached": e["link_reached"], "waited_s": e["waited_s"],
                        "received_before_kill": got is not None and got <= e["t"],
                        "in_flight": bool(e["link_reached"]) and (got is None or got > e["t"])})
        return out

    def _histories(self, start: float, trees: list[dict[str, str]],
                   findings: dict[str, list[str]]) -> list[dict[str, Any]]:
        """For each path a check found wrong: every op on it (and on its folders),
        the faults meanwhile, what each node holds there, and its conflict log."""
        names, h = self.target.names, self.history
        docs = getattr(self.target, "conflict_docs", {})
        out = []
        for path, why in list(findings.items())[:SHOWN]:
            ops: list[dict[str, Any]] = []
            for rid in h.by_path.get(path, ()):
                r = h.records[rid]
                op: dict[str, Any] = {
                    "t_s": round(r.t - start, 3), "node": names[r.node], "kind": r.kind,
                    "wid": r.wid, "content": self._content(path, r.hash),
                    "saw": sorted(h.records[x].wid for x in r.saw)}
                if r.forced:
                    op["forced"] = True
                if r.kind == "rename-to":
                    op["from"] = next((x.path for x in h.records
                                       if x.wid == r.wid and x.kind == "rename-from"), None)
                ops.append(op)
            times = [o["t_s"] for o in ops] or [0.0]
            for e in self._events(start):
                folder_op = e["kind"] in ("mkdir", "rmdir") and path.startswith(e["path"] + "/")
                fault = e["kind"] not in ("mkdir", "rmdir")
                if folder_op or (fault and min(times) - 2 <= e["t_s"] <= max(times) + 15):
                    ops.append({"t_s": e["t_s"], "event": e})
            ops.sort(key=lambda o: o["t_s"])
            finals = {}
            for k, tree in enumerate(trees):
                copies = sorted((p, self._content(path, c)) for p, c in tree.items()
                                if original_of(p) == path)
                finals[names[k]] = {"at": self._content(path, tree.get(path))
                                    if path in tree else "absent",
                                    "copies": [f"{p.rsplit('/', 1)[-1]}: {c}" for p, c in copies]}
            log = []
            for k, entries in sorted(docs.items()):
                for d in entries:
                    if d.get("path") != path:
                        continue
                    w, lo = d.get("winner", {}), d.get("loser", {})
                    lost = ("deleted" if lo.get("deleted")
                            else self._content(path, lo.get("hash")))
                    log.append(
                        f"{names[k] if k < len(names) else k} {d.get('id', '')[:10]} "
                        f"{d.get('logged', '')} rule={d.get('rule')} "
                        f"winner={w.get('node')}:{self._content(path, w.get('hash'))} "
                        f"loser={lo.get('node')}:{lost}")
            out.append({"path": path, "why": why, "ops": ops, "final": finals,
                        "conflict_log": log})
        return out

    async def _explain(self, paths: list[str]) -> dict[str, Any]:
        """The target's account of ``paths``, each content it names as the history does
        (wN: made by write N)."""
        out = await self.target.explain(paths)
        for node in out.values():
            for path, rows in node.get("index", {}).items():
                for side in ("disk", "target"):
                    for head in rows.get(side) or ():
                        head["content"] = self._content(path, head.pop("hash"))
                cache = rows.get("stat_cache")
                if cache:
                    cache["content"] = self._content(path, cache.pop("hash"))
        return out

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
        scattered = [r for r in h.lost(trees, anywhere=True) if r not in lost]
        finals = [h.final_state(t) for t in trees]
        held = [placed(t) for t in trees]
        invented = sorted({(names[k], p, c) for k, t in enumerate(trees)
                           for p, c in h.invented(t)})
        logs = [set(entries) for entries in logged.values()]
        identical = all(x == logs[0] for x in logs[1:]) if logs else None  # None: no log
        spurious = self._conflicts(by_index)
        findings: dict[str, list[str]] = {}
        for r in lost:
            findings.setdefault(r.path, []).append(f"lost write w{r.wid}")
        for p in max((r for r, _ in finals), key=len):
            findings.setdefault(p, []).append("delete undone")
        for p in spurious["conflicts_unexpected_paths"]:
            findings.setdefault(p, []).append("spurious conflict")
        for node, p, _ in invented:
            orig = original_of(p) or p
            findings.setdefault(orig, []).append(f"invented content on {node}: "
                                                 f"{p.rsplit('/', 1)[-1]}")
        for r in scattered:  # not converged: what some nodes lack
            findings.setdefault(r.path, []).append(f"write w{r.wid} not on every node")
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
                      "t_s": round(r.t - start, 3),
                      "missing_on": [names[k] for k, at in enumerate(held)
                                     if r.hash not in at.get(r.path, ())]}
                     for r in lost[:SHOWN]],
            "writes_not_everywhere": len(scattered),
            "invented_content": len(invented),
            "invented": [{"node": n, "path": p, "content": c[:16]} for n, p, c in invented][:SHOWN],
            "conflict_logs_identical": identical,
            "resurrected_deletes": max(len(r) for r, _ in finals),
            "resurrected": max((r for r, _ in finals), key=len)[:SHOWN],
            "stale_paths": max(len(s) for _, s in finals),
            "stale": max((s for _, s in finals), key=len)[:SHOWN],
            "conflict_copies": max(sum(1 for p in t if original_of(p)) for t in trees),
            **spurious,
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
            "disk": self.disk.series(start),
            "disk_mb": self.disk.summary(),
            "latency_samples_ms": sorted(round(x, 1) for x in d.latency_ms),
            "faults": [e for e in self._events(start) if e["kind"] not in ("mkdir", "rmdir")],
            "kills_during_push": self._kills(start),
            "folder_ops": {k: sum(1 for e in self.events if e["kind"] == k)
                           for k in ("mkdir", "rmdir")},
            "histories": self._histories(start, trees, findings),
        }
        return block

    # --- an empty node joins ---------------------------------------------------------------

    async def _join(self, logs: Path, outcome: Converged) -> dict[str, Any]:
        """After convergence: start one more node with an empty folder; once every
        node holds the same tree (and the system is idle), the new node must hold
        the tree the others held before, and theirs and their conflict logs must be
        as they were."""
        if not self.target.can_join:
            return {"ok": None, "why": f"{self.target.system}: this target cannot add a node"}
        if not outcome.converged:
            return {"ok": False, "why": "not tried: the nodes had not converged"}
        names = self.target.names
        before = await self._snapshots()
        logs_before = {k: set(v) for k, v in (await self.target.conflicts()).items()}
        at = time.time()
        i = await self.target.join()
        await self._start_probes(logs, first=i)
        after = await self._converge(at)
        logs_after = {k: set(v) for k, v in (await self.target.conflicts()).items()}
        changed = {names[k]: sorted(p for p in set(before[k]) | set(after.trees[k])
                                    if before[k].get(p) != after.trees[k].get(p))
                   for k in range(i)}
        changed = {k: v for k, v in changed.items() if v}
        logs_changed = [names[k] for k in range(i) if logs_after.get(k) != logs_before.get(k)]
        new = after.trees[i] if len(after.trees) > i else {}
        same = new == before[0]
        return {
            "ok": after.converged and same and not changed and not logs_changed,
            "node": names[i], "caught_up": after.converged, "idle": after.idle,
            "catch_up_s": None if after.converge_s is None else round(after.converge_s, 2),
            "same_tree": same,
            "missing_on_new_node": sorted(set(before[0]) - set(new))[:SHOWN],
            "extra_on_new_node": sorted(set(new) - set(before[0]))[:SHOWN],
            "others_changed": {k: v[:SHOWN] for k, v in changed.items()},
            "conflict_logs_changed": logs_changed,
            "new_node_conflicts_logged": len(logs_after.get(i, ())),
            "new_node_log_as_the_others": logs_after.get(i) == logs_after.get(0),
        }


def _why(ans: dict[str, Any]) -> str:
    if ans.get("absent"):
        return "path absent on the node"
    if ans.get("exists"):
        return "rename target exists"
    if ans.get("error"):
        return "error"
    return "refused"
