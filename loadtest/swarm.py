"""A deployed Docker stack as the target, through ``docker exec`` into its tasks.

Tested by tests/e2e/test_swarm.py (a short ``small`` run against the stack the
end-to-end test deploys, one Docker host per Swarm node). What it assumes: the
agent service's containers carry
the label ``com.docker.stack.namespace=<stack>`` and the service name
``<stack>_<service>``; inside, the synced folder is /data, ``mesh`` and
``python3`` (with the agent's packages) are on PATH, and ``mesh`` finds the
agent's state directory by itself (MESH_STATE_DIR in the image).

``docker ps`` lists the containers of one Docker host: a stack spread over
several hosts needs each host given with ``--docker-host`` (``docker -H``).
The run writes under /data/loadtest/<run id>, so it leaves the rest of the
folder alone (and leaves its files behind). Differences from the local
target: a node is "stopped" and "frozen" with ``docker pause`` (Swarm would
replace a task that exits); links cannot be cut (no partition profile); the
wire is the sum of the containers' received bytes on their non-loopback
interfaces, and CPU and memory come from each container's cgroup (v2), both
read by the probe; times are each host's clock, so latencies across hosts
include their clock offsets.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from loadtest.targets import PROBE_SOURCE, Logged, Target, TargetError, parse_conflicts

DATA = "/data"


@dataclass(frozen=True)
class Task:
    host: str | None  # the docker -H value, None for the default
    container: str
    node: str  # the agent's node id


async def docker(host: str | None, *args: str, within: float = 120) -> str:
    argv = ["docker", *(["-H", host] if host else []), *args]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise TargetError(f"{' '.join(argv[:4])}...: no answer in {within:.0f} s") from None
    if proc.returncode != 0:
        raise TargetError(f"{' '.join(argv[:5])}...: {err.decode().strip()}")
    return out.decode()


class SwarmStack(Target):
    system = "meshsync"

    def __init__(self, stack: str, service: str, hosts: list[str | None], run_id: str) -> None:
        self.stack, self.service, self.hosts = stack, service, hosts or [None]
        self.prefix = f"loadtest/{run_id}"
        self.tasks: list[Task] = []
        self.names: list[str] = []
        self.size = 0
        self._usage: list[dict[str, float]] = []
        self._start: list[dict[str, float]] = []

    async def up(self) -> None:
        found: list[Task] = []
        for host in self.hosts:
            out = await docker(host, "ps", "--filter",
                               f"label=com.docker.stack.namespace={self.stack}",
                               "--format", '{{.ID}} {{.Label "com.docker.swarm.service.name"}}')
            for line in out.splitlines():
                cid, _, service = line.partition(" ")
                if service == f"{self.stack}_{self.service}":
                    doc = json.loads(await docker(host, "exec", cid, "mesh", "status", "--json"))
                    found.append(Task(host, cid, doc["node"]))
        if len(found) < 2:
            raise TargetError(f"stack {self.stack}: found {len(found)} running "
                              f"{self.stack}_{self.service} task(s); need 2 or more")
        self.tasks = sorted(found, key=lambda t: t.node)
        self.names = [t.node for t in self.tasks]
        self.size = len(self.tasks)
        self._usage = [{} for _ in self.tasks]
        self._start = [{} for _ in self.tasks]

    async def settle(self) -> None:
        """A stack is up already; its links are what ``quiescent`` checks."""

    async def down(self) -> None:
        await self.freeze(list(range(self.size)), False)

    def _exec(self, i: int, *args: str, stdin: bool = False) -> list[str]:
        t = self.tasks[i]
        return ["docker", *(["-H", t.host] if t.host else []), "exec",
                *(["-i"] if stdin else []), t.container, *args]

    def probe_argv(self, i: int) -> list[str]:
        return self._exec(i, "python3", "-c", PROBE_SOURCE, f"{DATA}/{self.prefix}", stdin=True)

    async def stop_node(self, i: int) -> None:
        await self.freeze([i], True)

    async def start_node(self, i: int) -> None:
        await self.freeze([i], False)

    async def freeze(self, nodes: list[int], on: bool) -> None:
        for i in nodes:
            t = self.tasks[i]
            try:
                await docker(t.host, "pause" if on else "unpause", t.container)
            except TargetError:
                if on:
                    raise  # unpausing a running container fails: that is fine

    async def partition(self, side: set[int] | None) -> None:
        if side is not None:
            raise TargetError("the swarm target cannot cut links (no partition profile)")

    async def sample(self) -> None:
        for i, t in enumerate(self.tasks):
            text = await docker(t.host, "exec", t.container, "sh", "-c", USAGE_SH)
            u = parse_usage(text)
            u["rss_mb"] = max(self._usage[i].get("rss_mb", 0.0), u.get("rss_mb", 0.0))
            self._usage[i] = u

    def reset_meters(self) -> None:
        self._start = [dict(u) for u in self._usage]

    def usage(self) -> dict[str, dict[str, float]]:
        return {n: {"cpu_s": round(u.get("cpu_s", 0) - s.get("cpu_s", 0), 2),
                    "peak_rss_mb": round(u.get("rss_mb", 0), 1)}
                for n, u, s in zip(self.names, self._usage, self._start, strict=True)}

    async def wire_bytes(self, reset: bool = False) -> int | None:
        await self.sample()
        if reset:
            self.reset_meters()
            return 0
        return int(sum(u.get("net_rx", 0) - s.get("net_rx", 0)
                       for u, s in zip(self._usage, self._start, strict=True)))

    async def conflicts(self) -> dict[int, Logged]:
        return {i: parse_conflicts(await docker(t.host, "exec", t.container, "mesh",
                                                "conflicts", "list", "--json"), self.prefix)
                for i, t in enumerate(self.tasks)}

    async def quiescent(self) -> bool:
        for t in self.tasks:
            try:
                await docker(t.host, "exec", t.container, "mesh", "health", "--max-lag", "0")
            except TargetError:
                return False
        return True


# The container's cgroup (v2) and network namespace, read from inside it.
USAGE_SH = ("cat /sys/fs/cgroup/cpu.stat; echo peak $(cat /sys/fs/cgroup/memory.peak "
            "2>/dev/null || cat /sys/fs/cgroup/memory.current); cat /proc/net/dev")


def parse_usage(text: str) -> dict[str, float]:
    """CPU seconds, memory (peak, else current) and bytes received off loopback."""
    out = {"cpu_s": 0.0, "rss_mb": 0.0, "net_rx": 0.0}
    for line in text.splitlines():
        head, _, rest = line.strip().partition(" ")
        if head == "usage_usec":
            out["cpu_s"] = int(rest) / 1e6
        elif head == "peak" and rest.strip().isdigit():
            out["rss_mb"] = int(rest) / 2**20
        elif ":" in line and not line.strip().startswith(("lo:", "Inter", "face")):
            counters = line.partition(":")[2]
            fields = counters.split()
            if fields and fields[0].isdigit():
                out["net_rx"] += int(fields[0])
    return out
