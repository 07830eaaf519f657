"""The real Swarm the end-to-end test runs on: started here, removed here, by id."""

from __future__ import annotations

import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from tests.e2e import images, lab
from tests.e2e.stack import AGENT, Stack, all_healthy, deploy, fully_linked


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "swarm: a real 3-node Docker Swarm (minutes; deselect with -m 'not swarm')"
    )


class _Clock:
    """Prints how long each step of the set-up took (shown with -s or on a failure)."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()

    def __call__(self, step: str) -> None:
        now = time.monotonic()
        print(f"[e2e {now - self.start:6.1f} s] {step} ({now - self.last:.1f} s)",
              file=sys.stderr, flush=True)
        self.last = now


def _engine(workdir: Path, cli: str, cleanup: lab.Cleanup,
            run_id: str) -> tuple[lab.Docker, str, IPv4Network]:
    """An engine (a reachable one, else our own), and the nodes' network and subnet."""
    with lab.subnet_pair() as (bridge, subnet):
        outer = lab.reachable_engine(cli)
        if outer is None:
            outer = lab.start_engine(workdir / "engine", cli, cleanup, bridge, subnet)
        network = lab.create_network(outer, cleanup, run_id, subnet)
    return outer, network, subnet


def _images(outer: lab.Docker, cleanup: lab.Cleanup, run_id: str,
            clock: _Clock) -> tuple[str, str]:
    """Import the two root filesystems, build the project image and the example
    service's; their tags."""
    tags = {name: f"meshsync-e2e-{name}:{run_id}" for name in ("base", "node", "app", "uploads")}
    for name, packages in (("base", images.BASE_PACKAGES), ("node", images.NODE_PACKAGES)):
        images.import_rootfs(outer, images.rootfs_tar(name, packages), tags[name])
        cleanup.add(f"image {tags[name]}", lambda t=tags[name]: outer("rmi", t))
    clock("base images")
    images.build_project_image(outer, tags["base"], tags["app"])
    cleanup.add(f"image {tags['app']}", lambda: outer("rmi", tags["app"]))
    images.build_example_image(outer, tags["base"], tags["uploads"])
    cleanup.add(f"image {tags['uploads']}", lambda: outer("rmi", tags["uploads"]))
    clock("project and example images built with no network")
    return tags["app"], tags["uploads"]


# One Swarm for the whole session: every test module that asks for it shares it, and each
# test leaves it as it found it (every node active, every agent healthy).
@pytest.fixture(scope="session")
def swarm() -> Iterator[Stack]:
    clock = _Clock()
    cleanup = lab.Cleanup()
    workdir = Path(tempfile.mkdtemp(prefix="mesh-e2e-"))
    cleanup.add(f"directory {workdir}", lambda: shutil.rmtree(workdir))
    run_id = secrets.token_hex(3)
    try:
        lab.ensure_packages()
        cli = lab.docker_cli()
        for name, packages in (("base", images.BASE_PACKAGES), ("node", images.NODE_PACKAGES)):
            images.rootfs_tar(name, packages)
        clock("packages and root filesystems")
        outer, network, subnet = _engine(workdir, cli, cleanup, run_id)
        clock("engine")
        app, uploads = _images(outer, cleanup, run_id, clock)
        nodes = lab.start_nodes(outer, f"meshsync-e2e-node:{run_id}", workdir, cleanup,
                                run_id, network, subnet)
        lab.form_swarm(nodes)
        clock("3 nodes in a swarm")
        image_file = workdir / "app.tar"
        outer("save", "-o", str(image_file), app, uploads, timeout=300)
        lab.load_image(image_file, nodes)
        clock("images loaded into every node")
        deploy(nodes[0], app, workdir / "pki")
        stack = Stack(nodes, example_image=uploads)
        with stack.explained():
            lab.wait_for(f"{AGENT} healthy and linked on every node",
                         lambda: all_healthy(stack) and fully_linked(stack), timeout=300, every=3)
        clock("stack deployed, every task healthy")
        yield stack
        clock("tests done")
    finally:
        failures = cleanup.run()
        clock("cleaned up")
    if failures:
        pytest.fail("clean-up failed: " + "; ".join(failures))
