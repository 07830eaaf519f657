"""The meshsync stack on the lab's Swarm: deploy compose/stack.yml as an operator would,
and look into the agents' tasks (``docker exec``), as the end-to-end test needs."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.e2e.lab import LabError, Node, run, stop_process, wait_for

ROOT = Path(__file__).resolve().parents[2]
STACK = "mesh"
AGENT = f"{STACK}_agent"
SIGNER = f"{STACK}_signer"
CLUSTER = "e2e"
KEEP = ".mesh-keep"


def mesh_cli(*args: str, env: dict[str, str] | None = None) -> str:
    done = run([sys.executable, "-m", "mesh", *args], env={**os.environ, **(env or {})})
    return done.stdout.decode()


def deploy(manager: Node, image: str, pki_dir: Path) -> None:
    """The README's steps: a CA, the Swarm secrets, ``docker stack deploy``."""
    mesh_cli("pki", "init", "--dir", str(pki_dir), "--cluster", CLUSTER)
    mesh_cli("pki", "swarm-secrets", "--dir", str(pki_dir), "--docker", manager.docker.cli,
             env={"DOCKER_HOST": manager.docker.host})
    # The project's stack file unchanged; settings through the environment only. No
    # registry: the image is on every node already, so do not ask one for its digest.
    run([manager.docker.cli, "-H", manager.docker.host, "stack", "deploy", "--resolve-image",
         "never", "-c", str(ROOT / "compose" / "stack.yml"), STACK],
        env={**os.environ, "MESH_IMAGE": image, "MESH_CLUSTER": CLUSTER})


@dataclass(frozen=True)
class Stack:
    nodes: list[Node]
    example_image: str = ""  # compose/examples/uploads, loaded on every node

    @property
    def manager(self) -> Node:
        return self.nodes[0]

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    # --- tasks ----------------------------------------------------------------------------

    def task(self, node: Node, service: str = AGENT) -> str | None:
        """The id of the service's running container on ``node``, if there is one."""
        ids = node.docker("ps", "-q", "--filter", f"label=com.docker.swarm.service.name={service}",
                          "--filter", "status=running").split()
        if len(ids) > 1:
            raise LabError(f"{len(ids)} {service} containers run on {node.name}")
        return ids[0] if ids else None

    def exec(self, node: Node, *argv: str, input: bytes | None = None, check: bool = True) -> str:
        task = self.task(node)
        if task is None:
            raise LabError(f"no agent task runs on {node.name}")
        return node.docker("exec", "-i", task, *argv, input=input, timeout=60, check=check)

    def health(self, node: Node, service: str = AGENT) -> str | None:
        task = self.task(node, service)
        if task is None:
            return None
        return node.docker("inspect", "--format", "{{.State.Health.Status}}", task, check=False)

    def status(self, node: Node) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.exec(node, "mesh", "status", "--json"))
        return doc

    def links_up(self, node: Node) -> set[str]:
        return {p["node"] for p in self.status(node)["peers"].values() if p["state"] == "up"}

    # --- the data volume ------------------------------------------------------------------

    def write(self, node: Node, path: str, text: str) -> None:
        self.exec(node, "sh", "-c", f'mkdir -p "$(dirname "/data/{path}")" && cat > "/data/{path}"',
                  input=text.encode())

    def read(self, node: Node, path: str) -> str | None:
        out = self.exec(node, "sh", "-c", f'cat "/data/{path}" 2>/dev/null || echo "<absent>"')
        return None if out == "<absent>" else out

    def files(self, node: Node) -> list[str]:
        """Every file under /data but the keep area, relative, sorted."""
        script = f"cd /data && find . -path ./{KEEP} -prune -o -type f -print"
        out = self.exec(node, "sh", "-c", script)
        return sorted(line.removeprefix("./") for line in out.splitlines() if line)

    # --- for the reader of a failure ------------------------------------------------------

    def diagnostics(self) -> str:
        parts = [self.manager.docker("service", "ps", "--no-trunc", AGENT, SIGNER, check=False)]
        for node in self.nodes:
            task = self.task(node)
            parts.append(f"--- {node.name}: task {task}")
            if task is None:
                continue
            parts.append(node.docker("exec", task, "mesh", "status", check=False))
            listing = f"cd /data && find . -path ./{KEEP} -prune -o -type f -exec md5sum {{}} +"
            parts.append(node.docker("exec", task, "sh", "-c", listing, check=False))
            logs = run([node.docker.cli, "-H", node.docker.host, "logs", "--tail", "200", task],
                       check=False)
            # lsyncd's lists of paths say little and would push the rest out of sight.
            lines = (logs.stdout + logs.stderr).decode(errors="replace").splitlines()
            parts.extend(line for line in lines if '"lsyncd: /' not in line)
        return "\n".join(parts)

    @contextlib.contextmanager
    def explained(self) -> Iterator[None]:
        """On a failure, print what the nodes say (pytest shows it with the failure)."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                print(self.diagnostics(), flush=True)
            raise


def race(stack: Stack, nodes: Sequence[Node], path: str, texts: Sequence[str]) -> None:
    """Write ``path`` on every node at once: each writer waits at a barrier (a line on its
    stdin) in its task, and the lines go out together once every writer is ready."""
    with contextlib.ExitStack() as stack_of_procs:
        procs: list[subprocess.Popen[bytes]] = []
        for node, text in zip(nodes, texts, strict=True):
            task = stack.task(node)
            if task is None:
                raise LabError(f"no agent task runs on {node.name}")
            script = f'echo ready; read go; printf "%s\\n" "{text}" > "/data/{path}"'
            proc = stack_of_procs.enter_context(subprocess.Popen(
                [node.docker.cli, "-H", node.docker.host, "exec", "-i", task, "sh", "-c", script],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
            # Registered after the Popen: runs before its exit closes the pipes and waits.
            stack_of_procs.callback(stop_process, proc, 5)
            procs.append(proc)
        _through_barrier(procs)


def _through_barrier(procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 30
    for proc in procs:
        assert proc.stdout is not None
        left = max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready or proc.stdout.readline().strip() != b"ready":
            raise LabError("a writer did not reach the barrier")
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
    for proc in procs:
        _, errors = proc.communicate(timeout=30)
        if proc.returncode != 0:
            raise LabError(f"a writer failed: {errors.decode(errors='replace')}")


def docker_with_stack_config(candidates: Sequence[str] | None = None) -> str | None:
    """A docker client that has ``docker stack config`` (added after 20.10), among
    ``candidates`` (default: the one on PATH, /usr/local/bin's, /usr/bin's)."""
    if candidates is None:
        candidates = [c for c in (shutil.which("docker"), "/usr/local/bin/docker",
                                  "/usr/bin/docker") if c and Path(c).exists()]
    for cli in candidates:
        if run([cli, "stack", "config", "--help"], check=False).returncode == 0:
            return cli
    return None


def all_healthy(stack: Stack) -> bool:
    tasks = stack.manager.docker("service", "ps", AGENT, "--filter", "desired-state=running",
                                 "--format", "{{.Node}} {{.CurrentState}}").splitlines()
    running = sorted(t.split()[0] for t in tasks if t.split()[1:2] == ["Running"])
    agents = [stack.health(n) for n in stack.nodes]
    return (running == sorted(n.name for n in stack.nodes)
            and agents == ["healthy"] * len(stack.nodes)
            and stack.health(stack.manager, SIGNER) == "healthy")


def fully_linked(stack: Stack) -> bool:
    """Every agent has a link up to every other: `mesh health` alone says healthy with no
    peers at all (before the first DNS answer)."""
    names = {n.name for n in stack.nodes}
    return all(stack.links_up(node) == names - {node.name} for node in stack.nodes)


def wait_converged(stack: Stack, what: str, expected: dict[str, str | None], *,
                   timeout: float) -> None:
    """Until every node holds ``expected`` (path -> text, None: absent)."""

    wrong: list[str] = []

    def holds() -> bool:
        wrong.clear()
        for node in stack.nodes:
            for path, text in expected.items():
                found = stack.read(node, path)
                if found != (None if text is None else text.rstrip("\n")):
                    wrong.append(f"{node.name} has {path}: {found!r}")
        return not wrong

    try:
        wait_for(what, holds, timeout=timeout, every=1.0)
    except LabError as err:
        raise LabError(f"{err}; still {'; '.join(wrong)}") from None
