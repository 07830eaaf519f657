"""The example service (compose/examples/uploads) on the lab's Swarm, as an operator runs
it: ``docker stack deploy`` of its stack file, HTTP to the node its task runs on (a
host-mode port: the lab's kernel has no IPVS for Swarm's routing mesh)."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tests.e2e.lab import LabError, Node, run, wait_for
from tests.e2e.stack import ROOT, STACK, Stack

APP_STACK = "uploads"
APP = f"{APP_STACK}_uploads"
APP_FILE = ROOT / "compose" / "examples" / "uploads" / "stack.yml"
PORT = 8080


@dataclass(frozen=True)
class Reply:
    status: int
    served_by: str
    body: bytes


def request(node: Node, method: str, path: str, body: bytes | None = None) -> Reply:
    conn = http.client.HTTPConnection(node.address, PORT, timeout=30)
    try:
        conn.request(method, path, body=body)
        reply = conn.getresponse()
        return Reply(reply.status, reply.getheader("X-Served-By", ""), reply.read())
    finally:
        conn.close()


def put(node: Node, name: str, body: bytes) -> Reply:
    reply = request(node, "PUT", f"/files/{name}", body)
    if reply.status != 201 or reply.body.split()[0].decode() != hashlib.sha256(body).hexdigest():
        raise LabError(f"PUT {name} on {node.name}: {reply}")
    return reply


def get(node: Node, name: str) -> Reply:
    return request(node, "GET", f"/files/{name}")


def deploy(stack: Stack) -> None:
    """The stack file unchanged; its settings through the environment only."""
    manager = stack.manager.docker
    run([manager.cli, "-H", manager.host, "stack", "deploy", "--resolve-image", "never",
         "-c", str(APP_FILE), APP_STACK],
        env={**os.environ, "UPLOADS_IMAGE": stack.example_image, "MESH_STACK": STACK})


def remove(stack: Stack) -> None:
    """``docker stack rm``, then until no node has a container of it left."""
    stack.manager.docker("stack", "rm", APP_STACK)

    def gone() -> bool:
        return all(not node.docker("ps", "-aq", "--filter",
                                   f"label=com.docker.stack.namespace={APP_STACK}")
                   for node in stack.nodes)

    wait_for(f"{APP_STACK}'s containers to go", gone, timeout=120, every=2)


@contextlib.contextmanager
def deployed(stack: Stack) -> Iterator[None]:
    deploy(stack)
    try:
        yield
    finally:
        remove(stack)


def running_on(stack: Stack) -> list[Node]:
    """The nodes where a task of the app runs and is healthy (sorted by name)."""
    lines = stack.manager.docker("service", "ps", APP, "--filter", "desired-state=running",
                                 "--format", "{{.Node}} {{.CurrentState}}").splitlines()
    names = sorted(line.split()[0] for line in lines if line.split()[1:2] == ["Running"])
    nodes = [stack.node(name) for name in names]
    return [n for n in nodes if stack.health(n, APP) == "healthy"]


def wait_running(stack: Stack, replicas: int, *, not_on: Node | None = None,
                 timeout: float = 180) -> list[Node]:
    """Until ``replicas`` healthy tasks run (none on ``not_on``); their nodes."""
    found: list[Node] = []

    def ready() -> bool:
        found[:] = running_on(stack)
        return len(found) == replicas and not_on not in found

    where = f" (not on {not_on.name})" if not_on else ""
    wait_for(f"{replicas} healthy task(s) of {APP}{where}", ready, timeout=timeout, every=2)
    return found


def race_puts(targets: Sequence[tuple[Node, bytes]], name: str) -> None:
    """PUT ``name`` on every node at once: every request is sent but for its last byte,
    then the last bytes go out together (the app writes once the body is complete)."""
    conns: list[http.client.HTTPConnection] = []
    try:
        for node, body in targets:
            conn = http.client.HTTPConnection(node.address, PORT, timeout=30)
            conns.append(conn)
            conn.putrequest("PUT", f"/files/{name}")
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders()
            conn.send(body[:-1])
        for conn, (_, body) in zip(conns, targets, strict=True):
            conn.send(body[-1:])
        for conn, (node, _) in zip(conns, targets, strict=True):
            reply = conn.getresponse()
            if reply.status != 201:
                raise LabError(f"PUT {name} on {node.name}: {reply.status} {reply.read()!r}")
            reply.read()
    finally:
        for conn in conns:
            conn.close()
