"""``mesh local up``: a cluster of real agents on this machine's loopback.

Node K is named nK, listens on 127.0.0.(10+K), keeps its synced folder at
D/nK/data and its state at D/nK/state, with one PKI for all under D/pki.
Run again on the same D, it reuses the PKI and the data. Every agent runs in
its own process group, so stopping one stops its lsyncd and rsync children.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mesh import pki
from mesh.errors import ConfigError

FIRST_HOST = 11
STOP_S = 10.0


@dataclass(frozen=True)
class LocalNode:
    name: str
    host: str
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def log(self) -> Path:
        return self.root / "agent.log"


def plan(nodes: int, base: Path) -> list[LocalNode]:
    if not 1 <= nodes <= 200:
        raise ConfigError(f"--nodes {nodes}: expected 1 to 200")
    return [LocalNode(f"n{k}", f"127.0.0.{FIRST_HOST - 1 + k}", base / f"n{k}")
            for k in range(1, nodes + 1)]


def ensure_pki(base: Path, cluster: str, members: list[LocalNode]) -> Path:
    folder = base / "pki"
    if not (folder / "ca.crt").exists():
        pki.init_ca(folder, cluster)
    missing = [m for m in members if not (folder / f"{m.name}.crt").exists()]
    if missing:
        pki.issue(folder, [m.name for m in missing],
                  ip_addresses=[m.host for m in members])
    return folder


def command(member: LocalNode, members: list[LocalNode], pki_dir: Path, cluster: str
            ) -> list[str]:
    peers = ",".join(f"{m.host}:8883" for m in members if m is not member)
    return [
        sys.executable, "-m", "mesh", "agent",
        "--node-id", member.name, "--cluster", cluster,
        "--data-dir", str(member.data), "--state-dir", str(member.state),
        "--pki-dir", str(pki_dir), "--listen", f"{member.host}:8883",
        "--tunnel-listen", f"{member.host}:8873",
        "--metrics-listen", f"{member.host}:9108", "--peers", peers,
    ]


def linked(member: LocalNode, expected: int) -> bool:
    try:
        doc = json.loads((member.state / "agent.json").read_text())
    except (OSError, ValueError):
        return False
    peers = doc.get("peers", {}).values()
    return sum(1 for p in peers if p.get("state") == "up") >= expected


def start(member: LocalNode, argv: list[str]) -> subprocess.Popen[bytes]:
    member.data.mkdir(parents=True, exist_ok=True)
    member.state.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (member.state / "agent.json").unlink()
    log = member.log.open("ab")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_S
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.1, deadline - time.monotonic()))
    for p in procs:  # whatever did not stop in time, and any children left behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
