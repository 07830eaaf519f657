"""The operator's story (issue 15, README "Use it from your service"): a service whose
files live on meshsync's volume is moved to another node by Swarm and finds its files
there; two replicas writing one file get one winner everywhere, a conflict copy and one
conflict log entry on every node.

The service is compose/examples/uploads, deployed with its own stack file next to the
meshsync stack the session's Swarm runs (tests/e2e/conftest.py), and used over HTTP on
the node its task runs on. The test leaves the Swarm as it found it: every node active,
every agent healthy, the example stack removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e import app, lab
from tests.e2e.lab import Node
from tests.e2e.stack import ROOT, Stack, all_healthy, docker_with_stack_config, fully_linked

pytestmark = pytest.mark.swarm


def test_the_example_stack_files_render() -> None:
    """The example's own stack mounts meshsync's volume by its stack's name; deployed with
    meshsync's stack file, it mounts the stack's own ``data``."""
    cli = docker_with_stack_config()
    if cli is None:
        pytest.skip("no docker client with `docker stack config`")

    def config(*files: Path, **env: str) -> dict[str, object]:
        argv = [cli, "stack", "config", *(a for f in files for a in ("-c", str(f)))]
        doc: dict[str, object] = yaml.safe_load(
            lab.run(argv, env={**os.environ, **env}).stdout.decode())
        return doc

    own = config(app.APP_FILE, MESH_STACK="prod")
    assert own["volumes"] == {"synced": {"name": "prod_data", "external": True}}
    same = config(ROOT / "compose" / "stack.yml", app.APP_FILE.with_name("same-stack.yml"))
    services = same["services"]
    assert isinstance(services, dict) and {"agent", "signer", "uploads"} <= set(services)
    mounts = [(m["source"], m["target"]) for m in services["uploads"]["volumes"]]
    assert mounts == [("data", "/data")] and ("data", "/data") in [
        (m["source"], m["target"]) for m in services["agent"]["volumes"]]


def mesh_ok(swarm: Stack, node: Node, *args: str) -> bool:
    """Whether ``mesh ARGS`` in ``node``'s agent task exits 0."""
    task = swarm.task(node)
    if task is None:
        return False
    docker = node.docker
    done = lab.run([docker.cli, "-H", docker.host, "exec", task, "mesh", *args], check=False)
    return done.returncode == 0


@contextlib.contextmanager
def drained(swarm: Stack, node: Node) -> Iterator[None]:
    """``node`` drained, then active again with every agent healthy and linked."""
    swarm.manager.docker("node", "update", "--availability", "drain", node.name)
    try:
        yield
    finally:
        swarm.manager.docker("node", "update", "--availability", "active", node.name)
        lab.wait_for("every agent healthy and linked again",
                     lambda: all_healthy(swarm) and fully_linked(swarm), timeout=300, every=3)


@pytest.mark.timeout(900)
def test_a_service_finds_its_files_on_the_node_it_is_moved_to(swarm: Stack) -> None:
    with swarm.explained(), app.deployed(swarm):
        # Names of this run's own: the session's volumes outlive a test.
        run = secrets.token_hex(3)
        (first,) = app.wait_running(swarm, 1)
        photo = random.Random(15).randbytes(256 * 1024)
        assert app.put(first, f"photo-{run}.bin", photo).served_by == first.name

        # Before moving it (README): on the node it leaves, `mesh verify` says every
        # node holds what this one holds; on the others, `mesh health` sees nothing left
        # to exchange.
        others = [n for n in swarm.nodes if n is not first]
        lab.wait_for(f"mesh verify on {first.name}: converged",
                     lambda: mesh_ok(swarm, first, "verify"), timeout=120, every=2)
        for node in others:
            lab.wait_for(f"mesh health --max-lag 0 on {node.name}",
                         lambda n=node: mesh_ok(swarm, n, "health", "--max-lag", "0"),  # type: ignore[misc]
                         timeout=60, every=2)

        with drained(swarm, first):
            (second,) = app.wait_running(swarm, 1, not_on=first)
            reply = app.get(second, f"photo-{run}.bin")
            assert (reply.status, reply.served_by) == (200, second.name)
            assert reply.body == photo, "the moved service serves other bytes"

        _two_replicas_write_one_file(swarm, f"notes-{run}")


def _two_replicas_write_one_file(swarm: Stack, stem: str) -> None:
    """Scaled to 2 (one per node), both replicas write STEM.txt at once: one winner on
    every node, the loser in one conflict copy on every node, one log entry on each."""
    swarm.manager.docker("service", "scale", "--detach", f"{app.APP}=2")
    x, y = app.wait_running(swarm, 2)
    texts = {x.name: f"{x.name} wrote this first", y.name: f"{y.name} wrote this first"}
    app.race_puts([(x, texts[x.name].encode()), (y, texts[y.name].encode())], f"{stem}.txt")

    seen: set[tuple[str | None, str, str | None]] = set()

    def settled() -> bool:
        seen.clear()
        for node in swarm.nodes:
            copies = [f for f in swarm.files(node) if f.startswith(f"uploads/{stem}.conflict-")]
            if len(copies) != 1:
                return False
            seen.add((swarm.read(node, f"uploads/{stem}.txt"), copies[0],
                      swarm.read(node, copies[0])))
        return len(seen) == 1

    lab.wait_for("one winner and one conflict copy on every node", settled, timeout=120)
    ((winner, copy, loser),) = seen
    assert {winner, loser} == set(texts.values())
    for node in (x, y):  # what the service serves, on both replicas
        assert app.get(node, f"{stem}.txt").body.decode() == winner
        assert app.get(node, copy.removeprefix("uploads/")).body.decode() == loser

    ids = set()
    for node in swarm.nodes:
        lines = swarm.exec(node, "mesh", "conflicts", "list", "--json", "--path",
                           f"uploads/{stem}.txt")
        conflicts = [json.loads(line) for line in lines.splitlines()]
        assert len(conflicts) == 1, f"{node.name}: {lines}"
        (conflict,) = conflicts
        assert {conflict["winner"]["node"], conflict["loser"]["node"]} == {x.name, y.name}
        assert texts[conflict["winner"]["node"]] == winner
        assert conflict["winner"]["hash"] == hashlib.sha256(winner.encode()).hexdigest()
        assert conflict["loser_kept_at"] == copy
        ids.add(conflict["id"])
    assert len(ids) == 1, f"the nodes logged different conflicts: {ids}"
