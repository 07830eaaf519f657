"""A Docker engine and a 3-node Swarm on this machine, for the end-to-end test.

What works on the development machine: an engine started by hand, Swarm nodes as
containers running their own dockerd (``--privileged`` fails there; the capabilities
in ``_SWARM_NODE`` work), addresses from 198.18.0.0/15 only (198.19.0.0/16 for
Swarm's overlays). Everything started is registered with a ``Cleanup`` and removed by
its id, in reverse order, even when the test fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import random
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

OVERLAY_POOL = "198.19.0.0/16"
# Inside each node's own network namespace: its dockerd's bridges. The host-side
# networks are carved from 198.18.0.0/17, so these never meet them.
NODE_BIP = "198.18.254.1/24"
NODE_POOL = "base=198.18.240.0/21,size=24"
_SUBNET_LOCK = Path("/tmp/meshsync-e2e-subnets.lock")
_SWARM_NODE = [
    "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
    "--security-opt", "systempaths=unconfined",
    "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "--tmpfs", "/var/lib/docker:exec",
    # Nothing answers on 127.0.0.1:53 in the node: lookups of outside names fail at once
    # instead of timing out, and no query leaves this machine.
    "--dns", "127.0.0.1",
]


class LabError(Exception):
    """The lab could not be set up; the message says which step and why."""


def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    timeout: float = 120.0,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    try:
        done = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout,
                              check=False, env=env)
    except subprocess.TimeoutExpired as err:
        raise LabError(f"{' '.join(argv)[:200]}: no answer within {timeout:g} s") from err
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)[:200]}: exit {done.returncode}: "
                       f"{done.stderr.decode(errors='replace').strip()[-2000:]}")
    return done


def wait_for(what: str, check: Callable[[], bool], *, timeout: float, every: float = 1.0) -> None:
    """Poll ``check`` until it holds; at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / every) + 2):
        if check():
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(every)
    raise LabError(f"timed out after {timeout:g} s waiting for {what}")


@dataclass
class Cleanup:
    """Undo steps, run newest first; every step runs even if another fails."""

    steps: list[tuple[str, Callable[[], object]]] = field(default_factory=list)

    def add(self, what: str, undo: Callable[[], object]) -> None:
        self.steps.append((what, undo))

    def run(self) -> list[str]:
        failures = []
        while self.steps:
            what, undo = self.steps.pop()
            try:
                undo()
            except Exception as err:  # report each, go on with the rest
                failures.append(f"{what}: {err}")
        return failures


@dataclass(frozen=True)
class Docker:
    """The docker CLI bound to one engine."""

    cli: str
    host: str  # a DOCKER_HOST value

    def __call__(self, *args: str, input: bytes | None = None, timeout: float = 120.0,
                 check: bool = True) -> str:
        done = run([self.cli, "-H", self.host, *args], input=input, timeout=timeout, check=check)
        return done.stdout.decode(errors="replace").strip()

    def ok(self, *args: str, timeout: float = 30.0) -> bool:
        return run([self.cli, "-H", self.host, *args], timeout=timeout, check=False).returncode == 0


def docker_cli() -> str:
    # The engine's own client first: Debian's docker.io pairs them.
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and Path(candidate).exists():
            return candidate
    raise LabError("no docker client")


def ensure_packages() -> None:
    """docker.io (dockerd) and debootstrap, from Debian, if missing."""
    missing = [pkg for pkg, binary in (("docker.io", "dockerd"), ("debootstrap", "debootstrap"))
               if shutil.which(binary) is None and not Path("/usr/sbin", binary).exists()]
    if not missing:
        return
    if os.geteuid() != 0:
        raise LabError(f"need root to install {', '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], timeout=300, env=env)
    run(["apt-get", "install", "-y", "-qq", *missing], timeout=600, env=env)


def reachable_engine(cli: str) -> Docker | None:
    """The engine DOCKER_HOST (or the default socket) names, if it answers."""
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    docker = Docker(cli, host)
    return docker if docker.ok("version", timeout=10) else None


# --- addresses ---------------------------------------------------------------------------------


def _in_use() -> list[ipaddress.IPv4Network]:
    nets = []
    for argv in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
        for line in run(argv).stdout.decode().splitlines():
            for word in line.split():
                with contextlib.suppress(ValueError):
                    net = ipaddress.ip_network(word, strict=False)
                    if isinstance(net, ipaddress.IPv4Network) and net.prefixlen > 0:
                        nets.append(net)
    return nets


@contextlib.contextmanager
def subnet_pair() -> Iterator[tuple[ipaddress.IPv4Network, ipaddress.IPv4Network]]:
    """Two /24s of 198.18.0.0/17 no interface or route of this host uses, held under a
    lock (other runs of this test may be choosing too) while the caller takes them."""
    with _SUBNET_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        used = _in_use()
        blocks = list(range(64))
        random.shuffle(blocks)
        for k in blocks:
            pair = (ipaddress.IPv4Network(f"198.18.{2 * k}.0/24"),
                    ipaddress.IPv4Network(f"198.18.{2 * k + 1}.0/24"))
            if not any(p.overlaps(u) for p in pair for u in used):
                yield pair
                return
        raise LabError("no free pair of /24s in 198.18.0.0/17")


# --- the engine --------------------------------------------------------------------------------


def start_engine(workdir: Path, cli: str, cleanup: Cleanup, bridge: ipaddress.IPv4Network,
                 pool: ipaddress.IPv4Network) -> Docker:
    """A dockerd of our own: its own dirs and socket, a bridge of its own in ``bridge``,
    networks from ``pool``, no iptables rules and no sysctl changes on the host."""
    name = "mse2e" + secrets.token_hex(4)
    run(["ip", "link", "add", "name", name, "type", "bridge"])
    cleanup.add(f"bridge {name}", lambda: run(["ip", "link", "del", name]))
    run(["ip", "addr", "add", f"{bridge[1]}/{bridge.prefixlen}", "dev", name])
    run(["ip", "link", "set", name, "up"])
    workdir.mkdir(parents=True)
    sock = workdir / "docker.sock"
    log = (workdir / "dockerd.log").open("wb")
    proc = subprocess.Popen(
        ["dockerd", "--data-root", str(workdir / "data"), "--exec-root", str(workdir / "exec"),
         "-H", f"unix://{sock}", "--pidfile", str(workdir / "docker.pid"),
         "--bridge", name, "--default-address-pool", f"base={pool},size=24",
         "--iptables=false", "--ip-masq=false", "--ip-forward=false", "--userland-proxy=false"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    cleanup.add(f"dockerd {proc.pid}", lambda: stop_process(proc, 60))
    docker = Docker(cli, f"unix://{sock}")

    def answers() -> bool:
        if proc.poll() is not None:
            tail = (workdir / "dockerd.log").read_text(errors="replace")[-2000:]
            raise LabError(f"dockerd exited with {proc.returncode}: {tail}")
        return docker.ok("version", timeout=10)

    wait_for("our dockerd to answer", answers, timeout=90)
    return docker


def stop_process(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, then SIGKILL to its process group if it outlives ``grace``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


# --- the swarm ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    name: str  # its hostname: the Swarm node's name and the agent's node id
    address: str
    container: str  # its id on the outer engine
    docker: Docker  # its own engine


def create_network(outer: Docker, cleanup: Cleanup, run_id: str,
                   subnet: ipaddress.IPv4Network) -> str:
    """The nodes' network. Internal: no route out of this machine."""
    network = outer("network", "create", "--driver", "bridge", "--internal",
                    "--subnet", str(subnet), f"mesh-e2e-{run_id}")
    cleanup.add(f"network {network[:12]}", lambda: outer("network", "rm", network))
    return network


def start_nodes(outer: Docker, image: str, workdir: Path, cleanup: Cleanup, run_id: str,
                network: str, subnet: ipaddress.IPv4Network, count: int = 3) -> list[Node]:
    nodes = []
    for n in range(1, count + 1):
        name, address = f"sw{n}", str(subnet[10 + n])
        sockets = workdir / name
        sockets.mkdir()
        container = outer(
            "run", "-d", "--name", f"mesh-e2e-{run_id}-{name}", "--hostname", name,
            *_SWARM_NODE, "--network", network, "--ip", address,
            "-v", f"{sockets}:/run/outer", image,
            "dockerd", "--host", "unix:///var/run/docker.sock",
            "--host", "unix:///run/outer/docker.sock",
            "--bip", NODE_BIP, "--default-address-pool", NODE_POOL)
        cleanup.add(f"container {container[:12]}",
                    lambda c=container: outer("rm", "-f", "-v", c, timeout=120))
        nodes.append(Node(name, address, container,
                          Docker(outer.cli, f"unix://{sockets}/docker.sock")))
    for node in nodes:
        wait_for(f"dockerd in {node.name}", lambda n=node: n.docker.ok("version"), timeout=90)
    return nodes


def form_swarm(nodes: list[Node]) -> None:
    manager, *workers = nodes
    manager.docker("swarm", "init", "--advertise-addr", manager.address,
                   "--default-addr-pool", OVERLAY_POOL)
    token = manager.docker("swarm", "join-token", "-q", "worker")
    for node in workers:
        node.docker("swarm", "join", "--advertise-addr", node.address,
                    "--token", token, f"{manager.address}:2377")
    wait_for("every node Ready", lambda: manager.docker(
        "node", "ls", "--format", "{{.Status}}").split() == ["Ready"] * len(nodes), timeout=60)


def load_image(image_file: Path, nodes: list[Node]) -> None:
    """``docker load`` into every node at once."""
    procs = [subprocess.Popen([n.docker.cli, "-H", n.docker.host, "load", "-q", "-i",
                               str(image_file)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for n in nodes]
    try:
        for node, proc in zip(nodes, procs, strict=True):
            _, err = proc.communicate(timeout=300)
            if proc.returncode:
                raise LabError(f"load the image into {node.name}: {err.decode()[-500:]}")
    finally:
        for proc in procs:
            stop_process(proc, 5)
