"""What a workload runs against: N nodes the harness can write on, watch, fault
and measure.

``MeshLocal`` is meshsync as ``mesh local up`` runs it (mesh.deploy.local), on
addresses of the harness's own; ``LsyncdLocal`` is the stop-gap people use
today — lsyncd on every node pushing to every other with ``default.rsync``
(startup sync included, as shipped), into an rsync daemon on every node.
Both reach their peers only through the harness's proxies (loadtest.proxy),
node i to node j through ``proxy_host(i, j)``: that is how a partition cuts
links and how the bytes on the wire are counted, the same way for both.

Addresses: node i (0-based) listens on NET.(i+1); the proxy of the link
i -> j is NET.(10(i+1) + j+1). NET defaults to 127.0.3, away from the
addresses the test suite uses, so a load test can run beside it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from loadtest import disk, explain, probe, procs, proxy
from loadtest.jsonl import JsonChild

BROKER_PORT = 8883
TUNNEL_PORT = 8873
LSYNCD_DELAY = 0.0  # the agent's default (mesh.config): both systems batch alike
MAX_LOCAL_NODES = 9
CLUSTER = "loadtest"
SETTLE_S = 60.0

Logged = list[tuple[str, str, str | None, str]]  # (path, loser node, loser hash, conflict id)


class TargetError(Exception):
    """A target could not be set up or driven."""


class Target(ABC):
    system: str
    size: int
    names: list[str]  # node ids as the system knows them
    prefix: str = ""  # the run's folder inside each node's data dir

    @abstractmethod
    async def up(self) -> None: ...

    @abstractmethod
    async def down(self) -> None: ...

    @abstractmethod
    async def settle(self) -> None:
        """After ``up``: until the system is done starting."""

    @abstractmethod
    def probe_argv(self, i: int) -> list[str]: ...

    @abstractmethod
    async def stop_node(self, i: int) -> None: ...

    @abstractmethod
    async def start_node(self, i: int) -> None: ...

    @abstractmethod
    async def freeze(self, nodes: list[int], on: bool) -> None: ...

    @abstractmethod
    async def partition(self, side: set[int] | None) -> None:
        """Cut every link between ``side`` and the other nodes; None heals all."""

    @abstractmethod
    async def sample(self) -> None:
        """Take a CPU and memory reading of every node."""

    async def disk_usage(self) -> dict[str, disk.Usage] | None:
        """Per node: keep area and index bytes, paths indexed, tombstones collected; for
        a system that has them."""
        return None

    @abstractmethod
    def reset_meters(self) -> None: ...

    @abstractmethod
    def usage(self) -> dict[str, dict[str, float]]:
        """Per node: ``cpu_s`` since ``reset_meters`` and ``peak_rss_mb``."""

    @abstractmethod
    async def wire_bytes(self, reset: bool = False) -> int | None: ...

    @abstractmethod
    async def conflicts(self) -> dict[int, Logged]: ...

    @abstractmethod
    async def quiescent(self) -> bool:
        """Whether the system says it has nothing left to do (True if it cannot say)."""

    # --- what the faults profile needs besides (loadtest.faults) ---------------------------

    can_join: bool = False  # join() can start an empty node
    conflict_docs: dict[int, list[dict[str, Any]]]  # the last conflicts() as the system gave

    async def kill_node(self, i: int) -> None:
        """SIGKILL node i's processes, all at once (then ``start_node``)."""
        raise TargetError(f"{self.system}: this target cannot kill a node")

    async def until_bytes(self, i: int, j: int, more: int, within: float
                          ) -> tuple[bool, int | None]:
        """Until the link i -> j has carried ``more`` bytes from now, at most ``within``
        s: (whether it did, the link's count then)."""
        raise TargetError(f"{self.system}: this target cannot watch a link")

    async def recover(self) -> None:
        """After the load: every node running and thawed, whatever the plan left."""
        return None

    async def join(self) -> int:
        """Start one more node, with an empty folder; its index."""
        raise TargetError(f"{self.system}: this target cannot add a node")

    async def explain(self, paths: list[str]) -> dict[str, Any]:
        """Per node, what the system says about ``paths`` (run-relative), while it runs;
        nothing from a system that cannot say."""
        return {}


# The probe and the proxies run as ``python -c SOURCE``: no import path needed, and the
# probe's source is what runs inside a swarm task too.
PROBE_SOURCE = Path(probe.__file__).read_text()
PROXY_SOURCE = Path(proxy.__file__).read_text()


class LocalTarget(Target):
    """N nodes on this machine's loopback, linked through the harness's proxies."""

    def __init__(self, work: Path, size: int, net: str) -> None:
        if not 2 <= size <= MAX_LOCAL_NODES:
            raise TargetError(f"--nodes {size}: the local target runs 2 to {MAX_LOCAL_NODES}")
        self.work, self.size, self.net = work, size, net
        self.names = [f"n{i + 1}" for i in range(size)]
        self.proxies = JsonChild("proxies")
        self.meters = [procs.Meter() for _ in range(size)]
        self.procs: list[list[subprocess.Popen[bytes]]] = [[] for _ in range(size)]
        self.frozen = [0] * size  # how many freezes (a storm's, a fault's) hold node i
        self.conflict_docs = {}

    def host(self, i: int) -> str:
        return f"{self.net}.{i + 1}"

    def proxy_host(self, i: int, j: int) -> str:
        return f"{self.net}.{10 * (i + 1) + j + 1}"

    def root(self, i: int) -> Path:
        return self.work / f"n{i + 1}"

    def data(self, i: int) -> Path:
        return self.root(i) / "data"

    def probe_argv(self, i: int) -> list[str]:
        return [sys.executable, "-c", PROBE_SOURCE, str(self.data(i))]

    # --- the proxies ----------------------------------------------------------------------

    async def _start_proxies(self) -> None:
        await self.proxies.start([sys.executable, "-c", PROXY_SOURCE], self.work / "proxies.log")
        for i in range(self.size):
            for j in range(self.size):
                if i != j:
                    await self._add_proxy(i, j)

    async def _add_proxy(self, i: int, j: int) -> None:
        for port in (BROKER_PORT, TUNNEL_PORT):
            ans = await self.proxies.request({
                "op": "add", "key": f"{i}-{j}", "listen": [self.proxy_host(i, j), port],
                "target": [self.host(j), port]})
            if not ans.get("ok"):
                raise TargetError(f"proxy {i}->{j}: {ans.get('error')}")

    async def until_bytes(self, i: int, j: int, more: int, within: float
                          ) -> tuple[bool, int | None]:
        ans = await self.proxies.request({"op": "until", "key": f"{i}-{j}", "more": more,
                                          "within": within}, within + 30)
        return bool(ans.get("reached")), ans.get("bytes")

    async def partition(self, side: set[int] | None) -> None:
        for i in range(self.size):
            for j in range(self.size):
                if i != j:
                    cut = side is not None and ((i in side) != (j in side))
                    await self.proxies.request({"op": "mode", "key": f"{i}-{j}",
                                                "mode": "refuse" if cut else "open"})

    async def wire_bytes(self, reset: bool = False) -> int | None:
        if reset:
            await self.proxies.request({"op": "reset"})
            return 0
        ans = await self.proxies.request({"op": "stats"})
        return sum(int(v) for v in ans["bytes"].values())

    # --- processes ------------------------------------------------------------------------

    @abstractmethod
    def _spawn(self, i: int) -> list[subprocess.Popen[bytes]]:
        """Start node i's processes."""

    async def up(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        for i in range(self.size):
            self.data(i).mkdir(parents=True, exist_ok=True)
        await self._start_proxies()
        for i in range(self.size):
            await self.start_node(i)

    async def start_node(self, i: int) -> None:
        self.procs[i] = self._spawn(i)
        for p in self.procs[i]:
            self.meters[i].track(p.pid)

    async def stop_node(self, i: int) -> None:
        await self.sample()
        for p in self.procs[i]:
            await asyncio.to_thread(procs.stop, p)
            self.meters[i].untrack(p.pid)
        self.procs[i] = []
        self.frozen[i] = 0

    async def kill_node(self, i: int) -> None:
        await self.sample()
        for p in self.procs[i]:
            await asyncio.to_thread(procs.kill, p)
            self.meters[i].untrack(p.pid)
        self.procs[i] = []
        self.frozen[i] = 0

    async def freeze(self, nodes: list[int], on: bool) -> None:
        """SIGSTOP (``on``) or SIGCONT node i's processes; freezes nest (a storm's
        inside a fault's): a node thaws when the last one ends."""
        for i in nodes:
            if not on and self.frozen[i] == 0:
                continue
            self.frozen[i] += 1 if on else -1
            if self.frozen[i] == (1 if on else 0):
                for p in self.procs[i]:
                    procs.signal_tree(p.pid, signal.SIGSTOP if on else signal.SIGCONT)

    async def recover(self) -> None:
        for i in range(self.size):
            if self.frozen[i]:
                self.frozen[i] = 1
                await self.freeze([i], False)
            if not self.procs[i]:
                await self.start_node(i)

    async def down(self) -> None:
        for i in range(self.size):
            if self.procs[i]:
                await self.stop_node(i)
        await self.proxies.close()

    async def sample(self) -> None:
        stats = await asyncio.to_thread(procs.table)
        for m in self.meters:
            m.take(stats)

    def reset_meters(self) -> None:
        for m in self.meters:
            m.reset()

    def usage(self) -> dict[str, dict[str, float]]:
        return {n: {"cpu_s": round(m.cpu_s(), 2), "peak_rss_mb": round(m.peak_mb, 1)}
                for n, m in zip(self.names, self.meters, strict=True)}


class MeshLocal(LocalTarget):
    """meshsync's agents as ``mesh local up`` runs them. With ``spares``, that many
    more nodes are planned from the start — certificates issued, and every agent's
    ``--peers`` naming them (through their proxies, which do not listen yet, so
    the links to them fail and retry, as a static list of peers does for a node
    that is down) — and ``join`` starts one, with an empty folder: a node added
    to the cluster, as Swarm's ``dns:tasks.<service>`` peers would find it."""

    system = "meshsync"
    can_join = True

    def __init__(self, work: Path, size: int, net: str, spares: int = 0) -> None:
        if size + spares > MAX_LOCAL_NODES:
            raise TargetError(f"--nodes {size} and {spares} to join: the local target runs "
                              f"at most {MAX_LOCAL_NODES}")
        super().__init__(work, size, net)
        from mesh.deploy import local

        self.local = local
        self.total = size + spares
        self.can_join = spares > 0
        self.members = [local.LocalNode(f"n{i + 1}", self.host(i), self.root(i))
                        for i in range(self.total)]
        self.pki_dir = local.ensure_pki(work, CLUSTER, self.members)

    def argv(self, i: int) -> list[str]:
        argv = self.local.command(self.members[i], self.members, self.pki_dir, CLUSTER)
        peers = ",".join(f"{self.proxy_host(i, j)}:{BROKER_PORT}"
                         for j in range(self.total) if j != i)
        argv[argv.index("--peers") + 1] = peers
        return [*argv, "--lsyncd-delay", str(LSYNCD_DELAY)]

    async def join(self) -> int:
        if self.size >= self.total:
            raise TargetError("no node left to join")
        i = self.size
        self.names.append(self.members[i].name)
        self.meters.append(procs.Meter())
        self.procs.append([])
        self.frozen.append(0)
        self.size += 1
        self.data(i).mkdir(parents=True, exist_ok=True)
        for j in range(i):
            await self._add_proxy(i, j)
            await self._add_proxy(j, i)
        await self.start_node(i)
        return i

    def _spawn(self, i: int) -> list[subprocess.Popen[bytes]]:
        return [procs.adopt(self.local.start(self.members[i], self.argv(i)))]

    async def disk_usage(self) -> dict[str, disk.Usage] | None:
        def usage() -> dict[str, disk.Usage]:
            return {m.name: disk.node_usage(m.data, m.state) for m in self.members[:self.size]}

        return await asyncio.to_thread(usage)

    async def explain(self, paths: list[str]) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            return {m.name: explain.explain(m.state, m.log, paths)
                    for m in self.members[:self.size]}

        return await asyncio.to_thread(read)

    def status(self, i: int) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = json.loads((self.members[i].state / "agent.json").read_text())
        except (OSError, ValueError):
            return None
        return doc

    async def settle(self) -> None:
        """Until every agent has a link up to every peer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_S
        while not all(self.local.linked(m, self.size - 1) for m in self.members[:self.size]):
            if loop.time() > deadline:
                raise TargetError(f"the agents did not link up in {SETTLE_S:.0f} s")
            await asyncio.sleep(0.1)

    async def quiescent(self) -> bool:
        """As ``mesh health --max-lag 0`` decides, from each agent's agent.json."""
        for i in range(self.size):
            doc = self.status(i)
            if doc is None or not self.procs[i] or doc.get("pid") != self.procs[i][0].pid:
                return False
            unborn = {f"{self.proxy_host(i, j)}:{BROKER_PORT}"
                      for j in range(self.size, self.total)}  # spares not joined yet
            peers = [p for k, p in doc["peers"].items() if k not in unborn]
            if (doc["backlog"] or doc["pending_content"] or sum(doc["pushes"]["pending"].values())
                    or any(p["state"] != "up" or p["catching_up"] or p.get("inbox_pending")
                           for p in peers)):
                return False
        return True

    async def conflicts(self) -> dict[int, Logged]:
        out: dict[int, Logged] = {}
        for i, m in enumerate(self.members[:self.size]):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mesh", "conflicts", "list", "--json",
                "--state-dir", str(m.state), stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
            if proc.returncode != 0:
                raise TargetError(f"mesh conflicts list on {m.name}: {stderr.decode().strip()}")
            out[i] = parse_conflicts(stdout.decode(), self.prefix)
            self.conflict_docs[i] = [json.loads(line) for line in stdout.decode().splitlines()
                                     if line.strip()]
        return out


async def wait_listening(host: str, port: int, within: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if loop.time() > deadline:
                raise TargetError(f"nothing listens on {host}:{port} after {within:.0f} s"
                                  ) from None
            await asyncio.sleep(0.05)
        else:
            writer.close()
            return


def parse_conflicts(text: str, prefix: str) -> Logged:
    """``mesh conflicts list --json`` lines as (path, loser node, loser hash, id), paths
    relative to the run's folder ``prefix``."""
    out: Logged = []
    for line in text.splitlines():
        if not line.strip():
            continue
        doc = json.loads(line)
        path: str = doc["path"]
        if prefix:
            if not path.startswith(prefix + "/"):
                continue
            path = path[len(prefix) + 1:]
        loser = doc["loser"]
        out.append((path, loser["node"], None if loser["deleted"] else loser["hash"], doc["id"]))
    return out


RSYNCD_CONF = """\
use chroot = no
uid = root
gid = root
[data]
    path = {data}
    read only = no
"""
LSYNCD_CONF = """\
settings {{ nodaemon = true, logfile = "{log}", statusFile = "{status}" }}
{syncs}"""
LSYNCD_SYNC = ('sync {{ default.rsync, source = "{src}/", target = "{dst}", delay = {delay}, '
               'rsync = {{ archive = true }} }}\n')


class LsyncdLocal(LocalTarget):
    """Plain lsyncd + rsync multi-master: no versions, no gate, no conflict log."""

    system = "lsyncd+rsync"

    async def up(self) -> None:
        """Every node's daemon listens before any lsyncd starts: lsyncd's startup
        sync to a peer that refuses would stop it."""
        self.work.mkdir(parents=True, exist_ok=True)
        await self._start_proxies()
        for i in range(self.size):
            self.data(i).mkdir(parents=True, exist_ok=True)
            self.procs[i] = [self._daemon(i)]
        for i in range(self.size):
            await wait_listening(self.host(i), TUNNEL_PORT, 30)
        for i in range(self.size):
            self.procs[i].append(self._lsyncd(i))
            for p in self.procs[i]:
                self.meters[i].track(p.pid)

    def _spawn(self, i: int) -> list[subprocess.Popen[bytes]]:
        return [self._daemon(i), self._lsyncd(i)]

    def _daemon(self, i: int) -> subprocess.Popen[bytes]:
        root = self.root(i)
        (root / "rsyncd.conf").write_text(RSYNCD_CONF.format(data=self.data(i)))
        return procs.spawn(
            ["rsync", "--daemon", "--no-detach", f"--config={root / 'rsyncd.conf'}",
             f"--address={self.host(i)}", f"--port={TUNNEL_PORT}",
             f"--log-file={root / 'rsyncd.log'}"], root / "rsyncd.out")

    def _lsyncd(self, i: int) -> subprocess.Popen[bytes]:
        root = self.root(i)
        syncs = "".join(
            LSYNCD_SYNC.format(src=self.data(i), delay=LSYNCD_DELAY,
                               dst=f"rsync://{self.proxy_host(i, j)}:{TUNNEL_PORT}/data/")
            for j in range(self.size) if j != i)
        (root / "lsyncd.lua").write_text(LSYNCD_CONF.format(
            log=root / "lsyncd.log", status=root / "lsyncd.status", syncs=syncs))
        return procs.spawn(["lsyncd", str(root / "lsyncd.lua")], root / "lsyncd.out")

    async def settle(self) -> None:
        """Until every lsyncd finished its startup sync (``rsync --delete`` of its whole
        tree to each peer, which deletes what a peer wrote meanwhile)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_S
        while not all(self._started(i) for i in range(self.size)):
            if loop.time() > deadline:
                raise TargetError(f"lsyncd did not finish its startup syncs in {SETTLE_S:.0f} s")
            await asyncio.sleep(0.1)

    def _started(self, i: int) -> bool:
        try:
            text = (self.root(i) / "lsyncd.log").read_text(errors="replace")
        except FileNotFoundError:
            return False
        return text.count("Normal: Startup of") >= self.size - 1

    async def quiescent(self) -> bool:
        return True

    async def conflicts(self) -> dict[int, Logged]:
        return {}
