"""meshsync as operators run it: ``docker stack deploy -c compose/stack.yml`` on a real
3-node Swarm (nodes are containers running their own dockerd; tests/e2e/lab.py).

The fixture (conftest.py) builds everything with no registry and no network for the
image, deploys the project's stack file unchanged and waits until every task is healthy.
Deselect with ``-m 'not swarm'``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from tests.e2e import lab
from tests.e2e.stack import (
    AGENT,
    ROOT,
    STACK,
    Stack,
    all_healthy,
    docker_with_stack_config,
    race,
    wait_converged,
)

pytestmark = pytest.mark.swarm


def test_the_stack_file_renders() -> None:
    cli = docker_with_stack_config()
    if cli is None:
        pytest.skip("no docker client with `docker stack config`")
    stack_file = str(ROOT / "compose" / "stack.yml")
    rendered = lab.run([cli, "stack", "config", "-c", stack_file]).stdout.decode()
    assert "meshsync-v1-ca.key" in rendered
    assert "dns:tasks.{{.Service.Name}}" in rendered
    env = {**os.environ, "MESH_SECRETS": "v2", "MESH_IMAGE": "registry.example/meshsync:9"}
    rotated = lab.run([cli, "stack", "config", "-c", stack_file], env=env).stdout.decode()
    assert "meshsync-v2-join" in rotated and "registry.example/meshsync:9" in rotated


@pytest.mark.timeout(900)
def test_a_swarm_keeps_one_volume_identical_on_every_node(swarm: Stack) -> None:
    n1 = swarm.nodes[0]
    with swarm.explained():
        # A write on node 1 reaches nodes 2 and 3.
        swarm.write(n1, "docs/from-sw1.txt", "written on sw1\n")
        wait_converged(swarm, "sw1's file everywhere", {"docs/from-sw1.txt": "written on sw1"},
                       timeout=60)

        _concurrent_writes_conflict(swarm)
        _a_node_that_was_away_catches_up(swarm)

        lab.wait_for("every task running and healthy", lambda: all_healthy(swarm), timeout=180,
                     every=3)
        tasks = swarm.manager.docker("service", "ps", AGENT, "--filter", "desired-state=running",
                                     "--format", "{{.Node}} {{.CurrentState}}")
        print(tasks)
        assert sorted(line.split()[0] for line in tasks.splitlines()) == ["sw1", "sw2", "sw3"]
        verify = swarm.exec(n1, "mesh", "verify", "--json", check=False)
        assert json.loads(verify)["converged"], verify


def _concurrent_writes_conflict(swarm: Stack) -> None:
    """Nodes 2 and 3 write one path at once: one winner everywhere, the loser kept as a
    conflict copy everywhere, and node 1's conflict log says so."""
    n1, n2, n3 = swarm.nodes
    texts = {"sw2": "sw2 says ship on Monday", "sw3": "sw3 says ship on Friday"}
    race(swarm, [n2, n3], "plan.txt", [texts["sw2"], texts["sw3"]])

    def settled() -> bool:
        seen = set()
        for node in swarm.nodes:
            copies = [f for f in swarm.files(node) if f.startswith("plan.conflict-")]
            if len(copies) != 1:
                return False
            seen.add((swarm.read(node, "plan.txt"), copies[0], swarm.read(node, copies[0])))
        return len(seen) == 1

    lab.wait_for("one winner and one conflict copy on every node", settled, timeout=90)
    copy = next(f for f in swarm.files(n1) if f.startswith("plan.conflict-"))
    winner_text, loser_text = swarm.read(n1, "plan.txt"), swarm.read(n1, copy)
    assert {winner_text, loser_text} == set(texts.values())
    lines = swarm.exec(n1, "mesh", "conflicts", "list", "--json", "--path", "plan.txt")
    conflicts = [json.loads(line) for line in lines.splitlines()]
    assert len(conflicts) == 1, lines
    conflict = conflicts[0]
    assert {conflict["winner"]["node"], conflict["loser"]["node"]} == {"sw2", "sw3"}
    assert texts[conflict["winner"]["node"]] == winner_text
    assert conflict["loser_kept_at"] == copy
    assert conflict["winner"]["hash"] == hashlib.sha256(f"{winner_text}\n".encode()).hexdigest()


def _a_node_that_was_away_catches_up(swarm: Stack) -> None:
    """Drain node 3 (its task stops; its volume stays), change files on node 1, make it
    active again: its new task, on the old volume, catches up."""
    n1, _, n3 = swarm.nodes
    manager = swarm.manager.docker
    copy = next(f for f in swarm.files(n1) if f.startswith("plan.conflict-"))
    manager("node", "update", "--availability", "drain", n3.name)
    lab.wait_for("sw3's task to stop", lambda: swarm.task(n3) is None, timeout=90)
    lab.wait_for("sw1 to drop sw3", lambda: n3.name not in swarm.links_up(n1), timeout=60)

    swarm.write(n1, "docs/from-sw1.txt", "changed while sw3 was away\n")
    swarm.write(n1, "new/while-away.txt", "made while sw3 was away\n")
    swarm.exec(n1, "rm", f"/data/{copy}")
    changes: dict[str, str | None] = {
        "docs/from-sw1.txt": "changed while sw3 was away",
        "new/while-away.txt": "made while sw3 was away",
        copy: None,
    }
    manager("node", "update", "--availability", "active", n3.name)
    lab.wait_for("sw3's new task", lambda: swarm.task(n3) is not None, timeout=120)
    wait_converged(swarm, "sw3 to catch up", changes, timeout=180)


@pytest.mark.timeout(600)
def test_the_load_harness_runs_against_the_deployed_stack(swarm: Stack, tmp_path: Path) -> None:
    """``python -m loadtest run --target swarm``: the same stack, through ``docker exec``
    into each node's task (one Docker host per Swarm node here)."""
    hosts = [arg for node in swarm.nodes for arg in ("--docker-host", node.docker.host)]
    report = tmp_path / "report"
    cli_dir = str(Path(swarm.manager.docker.cli).parent)
    env = {**os.environ, "PATH": f"{cli_dir}:{os.environ.get('PATH', os.defpath)}"}
    with swarm.explained():
        done = lab.run([sys.executable, "-m", "loadtest", "run", "--target", "swarm",
                        "--stack", STACK, *hosts, "--profile", "small", "--duration", "10",
                        "--rate", "10", "--report", str(report)],
                       timeout=400, env=env, check=False)
        print(done.stdout.decode(errors="replace")[-3000:])
        print(done.stderr.decode(errors="replace")[-3000:])
        assert done.returncode == 0
        doc = json.loads((report / "report.json").read_text())
        assert doc["target"] == "swarm" and doc["nodes"] == 3
        assert doc["converged"] and doc["lost_writes"] == 0
        assert doc["writes"] > 0
        assert sorted(doc["peak_rss_mb"]) == ["sw1", "sw2", "sw3"]
