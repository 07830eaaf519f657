"""Images for the end-to-end test, made on this machine: nothing is pulled.

Two Debian root filesystems from debootstrap (the project image's base, and a Swarm
node with its own dockerd), kept as tarballs in the git-ignored ``.cache/swarm`` of the
repository; the project image, built by compose/build.sh with no network from a
wheelhouse in ``.cache/wheelhouse``; and the example service's image
(compose/examples/uploads), built on the same base with no network. A cache is rebuilt
when its package list changes; delete ``.cache`` to start from nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.e2e.lab import Docker, LabError, run

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "swarm"
SUITE = "bookworm"
MIRROR = os.environ.get("MESH_E2E_MIRROR", "http://deb.debian.org/debian")
# The Dockerfile's BASE: Python 3.11 (as the host's, for the wheels), lsyncd, rsync, tini.
BASE_PACKAGES = ("python3", "python3-venv", "rsync", "lsyncd", "tini", "ca-certificates")
NODE_PACKAGES = ("docker.io", "iptables", "ca-certificates", "procps", "iproute2")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Other runs of this test may fill the same cache at the same time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def rootfs_tar(name: str, packages: tuple[str, ...]) -> Path:
    """A tarball of a minimal Debian with ``packages``, from the cache or debootstrap."""
    key = hashlib.sha256(f"{SUITE} {MIRROR} {sorted(packages)}".encode()).hexdigest()[:12]
    tar = CACHE / f"{name}-{SUITE}-{key}.tar"
    with _locked(CACHE / f"{name}.lock"):
        if tar.exists():
            return tar
        root = CACHE / f"{name}-rootfs.tmp"
        shutil.rmtree(root, ignore_errors=True)
        try:
            run(["debootstrap", "--variant=minbase", f"--include={','.join(packages)}",
                 SUITE, str(root), MIRROR], timeout=900)
            partial = tar.with_suffix(".partial")
            run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."],
                timeout=300)
            partial.replace(tar)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        for stale in CACHE.glob(f"{name}-{SUITE}-*.tar"):
            if stale != tar:
                stale.unlink()
    return tar


def import_rootfs(docker: Docker, tar: Path, tag: str) -> None:
    with tar.open("rb") as file:
        done = subprocess.run([docker.cli, "-H", docker.host, "import", "-", tag], stdin=file,
                              capture_output=True, timeout=300, check=False)
    if done.returncode:
        raise LabError(f"docker import {tar.name}: {done.stderr.decode()[-1000:]}")


def build_project_image(docker: Docker, base: str, tag: str) -> None:
    """compose/build.sh, as an operator runs it, with our base and no network."""
    env = {**os.environ, "PYTHON": sys.executable, "DOCKER": docker.cli,
           "DOCKER_HOST": docker.host, "MESH_BASE_IMAGE": base, "MESH_IMAGE": tag,
           "MESH_BUILD_NETWORK": "none"}
    with _locked(ROOT / ".cache" / "wheelhouse.lock"):
        run([str(ROOT / "compose" / "build.sh")], env=env, timeout=600)


EXAMPLE = ROOT / "compose" / "examples" / "uploads"


def build_example_image(docker: Docker, base: str, tag: str) -> None:
    """The example service, as its Dockerfile says to build it, on our base."""
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    run([docker.cli, "-H", docker.host, "build", "--network", "none", "--build-arg",
         f"BASE={base}", "--tag", tag, str(EXAMPLE)], env=env, timeout=300)
