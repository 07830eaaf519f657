"""A real local cluster for tests: agents as processes, faults on demand.

Each node runs ``python -m mesh agent`` in its own process group on
127.0.0.(20+K). Node i reaches node j only through a TCP proxy owned by the
test (one per ordered pair, on 127.0.1.(10*i+j), forwarding both the broker
and the tunnel port), so a test can partition any set of nodes, silently
(packets stop, sockets stay open) or loudly (connections reset). Every wait
is a condition with a deadline; every process is stopped by its group id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh import pki
from mesh.adapters.lsyncd.supervisor import end_stale

BROKER_PORT = 8883
TUNNEL_PORT = 8873


def wait_for(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


# --- proxies -------------------------------------------------------------------------


class Proxy:
    """Forwards host:port -> target; can go silent (drop) or refuse (reset)."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.listen, self.target = listen, target
        self.mode = "open"  # open | silent | refuse
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._conns: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, *self.listen, reuse_address=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._reset_all()

    def _reset_all(self) -> None:
        for w in list(self._conns):
            w.transport.abort()
        self._conns.clear()

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode == "silent":
            self._flowing.clear()  # hold the bytes: a black hole with open sockets
        else:
            self._flowing.set()
        if mode == "refuse":
            self._reset_all()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._conns |= {writer, up_w}
        await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer),
                             return_exceptions=True)
        for w in (writer, up_w):
            self._conns.discard(w)
            w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            await self._flowing.wait()
            if self.mode == "refuse":
                return
            writer.write(data)
            await writer.drain()


class ProxyThread:
    """Runs proxies on an event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxies: dict[tuple[int, int], list[Proxy]] = {}

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def add(self, key: tuple[int, int], listen_host: str, target_host: str) -> None:
        pair = [Proxy((listen_host, port), (target_host, port))
                for port in (BROKER_PORT, TUNNEL_PORT)]
        for p in pair:
            self.call(p.start())
        self.proxies[key] = pair

    def set_mode(self, key: tuple[int, int], mode: str) -> None:
        for p in self.proxies[key]:
            self.loop.call_soon_threadsafe(p.set_mode, mode)

    def close(self) -> None:
        for pair in self.proxies.values():
            for p in pair:
                self.call(p.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


# --- nodes ---------------------------------------------------------------------------


@dataclass
class Node:
    index: int
    root: Path
    proc: subprocess.Popen[bytes] | None = None
    log_file: Any = None
    net: str = "127.0.0"  # the node listens on <net>.<20 + index>

    @property
    def name(self) -> str:
        return f"n{self.index}"

    @property
    def host(self) -> str:
        return f"{self.net}.{20 + self.index}"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def log(self) -> Path:
        return self.root / "agent.log"

    def status(self) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = json.loads((self.state / "agent.json").read_text())
        except (OSError, ValueError):
            return None
        if self.proc is None or doc.get("pid") != self.proc.pid:
            return None  # a status file left by an earlier run
        return doc

    def up_peers(self) -> int:
        doc = self.status()
        if doc is None:
            return -1
        return sum(1 for p in doc["peers"].values() if p["state"] == "up")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Cluster:
    base: Path
    size: int
    cluster: str = "test"
    extra_args: list[str] = field(default_factory=list)
    # The 127.0.x networks of the nodes and of the proxies between them: a test file
    # on networks of its own can run while another runs a cluster (ports are fixed).
    nets: tuple[str, str] = ("127.0.0", "127.0.1")
    # Brokers outside the cluster every node also takes for a peer (``host:port``): a
    # node the test plays itself, such as a hostile one (tests/integration/test_hostile).
    extra_peers: list[str] = field(default_factory=list)
    nodes: list[Node] = field(init=False)
    proxies: ProxyThread = field(init=False)

    def __post_init__(self) -> None:
        self.nodes = [Node(k, self.base / f"n{k}", net=self.nets[0])
                      for k in range(1, self.size + 1)]
        pki_dir = self.base / "pki"
        pki.init_ca(pki_dir, self.cluster)
        pki.issue(pki_dir, [n.name for n in self.nodes],
                  ip_addresses=[n.host for n in self.nodes])
        self.proxies = ProxyThread()
        try:
            for a in self.nodes:
                for b in self.nodes:
                    if a is not b:
                        self.proxies.add((a.index, b.index), self.proxy_host(a, b), b.host)
        except BaseException:
            self.proxies.close()  # the caller never gets a cluster to close
            raise

    def proxy_host(self, a: Node, b: Node) -> str:
        return f"{self.nets[1]}.{10 * a.index + b.index}"

    def argv(self, node: Node) -> list[str]:
        peers = ",".join([f"{self.proxy_host(node, other)}:{BROKER_PORT}"
                          for other in self.nodes if other is not node] + self.extra_peers)
        return [sys.executable, "-m", "mesh", "agent", "--node-id", node.name,
                "--cluster", self.cluster, "--data-dir", str(node.data),
                "--state-dir", str(node.state), "--pki-dir", str(self.base / "pki"),
                "--listen", f"{node.host}:{BROKER_PORT}",
                "--tunnel-listen", f"{node.host}:{TUNNEL_PORT}",
                "--metrics-listen", "off", "--peers", peers, "--log-level", "debug",
                *self.extra_args]

    def start(self, node: Node) -> None:
        assert not node.alive(), f"{node.name} is running"
        node.data.mkdir(parents=True, exist_ok=True)
        node.state.mkdir(parents=True, exist_ok=True)
        node.log_file = node.log.open("ab")
        node.proc = subprocess.Popen(self.argv(node), stdout=node.log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def start_all(self) -> None:
        for node in self.nodes:
            self.start(node)
        self.wait_linked()

    def wait_linked(self, nodes: list[Node] | None = None, timeout: float = 30) -> None:
        group = nodes or [n for n in self.nodes if n.alive()]
        wait_for(lambda: all(n.up_peers() >= len(group) - 1 for n in group), timeout,
                 "all nodes linked")

    def stop(self, node: Node, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        assert node.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.proc.pid, sig)
        try:
            code = node.proc.wait(timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGKILL)  # lsyncd, rsync left behind
            node.proc.wait()
            if node.log_file is not None:
                node.log_file.close()
        return code

    def kill(self, node: Node) -> None:
        """As a crash: its lsyncd (a process group of its own) goes on running until the
        node's next start ends it, or ``close``."""
        self.stop(node, signal.SIGKILL)

    def pause(self, node: Node) -> None:
        assert node.proc is not None
        os.killpg(node.proc.pid, signal.SIGSTOP)

    def resume(self, node: Node) -> None:
        assert node.proc is not None
        os.killpg(node.proc.pid, signal.SIGCONT)

    def partition(self, group: list[Node], mode: str = "refuse") -> None:
        """Cut every link between ``group`` and the other nodes."""
        inside = {n.index for n in group}
        for (a, b) in self.proxies.proxies:
            if (a in inside) != (b in inside):
                self.proxies.set_mode((a, b), mode)

    def heal(self) -> None:
        for key in self.proxies.proxies:
            self.proxies.set_mode(key, "open")

    def close(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                with contextlib.suppress(Exception):
                    self.resume(node)
                self.stop(node)
            elif node.proc is not None:  # it ended by itself
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGKILL)
                if node.log_file is not None:
                    node.log_file.close()
            end_lsyncd(node)
        self.proxies.close()

    # --- what is on disk -------------------------------------------------------------

    def tree(self, node: Node) -> dict[str, tuple[str, int, str]]:
        """``snapshot``, again when a file went away while it was listed (a temp file
        that rsync renamed between the listing and its ``lstat``)."""
        for _ in range(100):
            with contextlib.suppress(FileNotFoundError):
                return snapshot(node.data)
        raise AssertionError(f"{node.name}'s tree never held still")

    def converged(self, nodes: list[Node] | None = None) -> bool:
        group = nodes or [n for n in self.nodes if n.alive()]
        trees = [self.tree(n) for n in group]
        return all(t == trees[0] for t in trees[1:])

    def wait_converged(self, nodes: list[Node] | None = None, timeout: float = 60,
                       stable: float = 1.0) -> None:
        """Until the nodes' trees are identical, and stay so, unchanged, for ``stable``
        seconds: a moment of agreement mid-way (every node briefly holding a loser that a
        restore is about to replace, say) is not convergence."""
        seen: list[tuple[float, dict[str, tuple[str, int, str]]]] = []

        def settled() -> bool:
            group = nodes or [n for n in self.nodes if n.alive()]
            trees = [self.tree(n) for n in group]
            if any(t != trees[0] for t in trees[1:]):
                seen.clear()
                return False
            now = time.monotonic()
            if not seen or seen[0][1] != trees[0]:
                seen[:] = [(now, trees[0])]
            return now - seen[0][0] >= stable

        wait_for(settled, timeout, "identical trees", step=0.2)

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.log.read_text(errors='replace')[-6000:]}"
                         for n in self.nodes if n.log.exists())



@contextlib.contextmanager
def running(base: Path, *, size: int = 3, start: bool = True,
            nets: tuple[str, str] = ("127.0.0", "127.0.1"), extra_args: list[str] | None = None,
            extra_peers: list[str] | None = None) -> Iterator[Cluster]:
    """A cluster (started unless ``start`` is False), stopped whatever happens; its logs
    are printed when the body fails."""
    c = Cluster(base, size, extra_args=extra_args or [], nets=nets,
                extra_peers=extra_peers or [])
    try:
        if start:
            c.start_all()
        yield c
    except BaseException:
        print(c.logs())
        print("full logs:", *(n.log for n in c.nodes))
        raise
    finally:
        c.close()

def snapshot(root: Path) -> dict[str, tuple[str, int, str]]:
    """path -> (kind, permission bits, sha256 of content or link target)."""
    out: dict[str, tuple[str, int, str]] = {}
    for rel in walk(root):
        p = root / rel
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", 0, hashlib.sha256(os.fsencode(p.readlink())).hexdigest())
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode), "")
        else:
            try:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            except FileNotFoundError:
                continue
            out[rel] = ("file", stat.S_IMODE(st.st_mode), digest)
    return out


def walk(root: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if rel.parts[:1] == (".mesh-keep",):
            continue
        dirnames[:] = [d for d in dirnames if not (rel == Path() and d == ".mesh-keep")]
        for name in [*dirnames, *filenames]:
            yield str(rel / name) if str(rel) != "." else name


def end_lsyncd(node: Node) -> None:
    """The lsyncd a node's agent left running when it was killed."""
    end_stale(node.state / "lsyncd.conf.lua")
