"""``mesh local``: run a cluster of nodes on this machine (the embedded default)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from mesh.deploy import local
from mesh.errors import MeshError

local_app = typer.Typer(help="Run a cluster of meshsync nodes on this machine's loopback.",
                        no_args_is_help=True)

LINK_TIMEOUT = 60.0


@local_app.command("up")
def up(
    nodes: Annotated[int, typer.Option(help="How many nodes (n1..nN on 127.0.0.11...).")] = 3,
    dir: Annotated[Path, typer.Option("--dir", help="Where the PKI and the nodes' folders live.")
                   ] = Path("local"),
    cluster: Annotated[str, typer.Option(help="Cluster name (in the certificates).")] = "local",
) -> None:
    """Start N agents, print each as it starts, then one line when all are linked.
    Ctrl-C or SIGTERM stops all of them and their lsyncd and rsync children."""
    base = dir.absolute()
    try:
        members = local.plan(nodes, base)
        pki_dir = local.ensure_pki(base, cluster, members)
    except MeshError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for m in members:
            procs.append(local.start(m, local.command(m, members, pki_dir, cluster)))
            typer.echo(f"{m.name}: pid {procs[-1].pid}, broker {m.host}:8883, "
                       f"folder {m.data}, log {m.log}")
        code = _supervise(members, procs, lambda: stopping)
    finally:
        typer.echo("stopping all nodes")
        local.stop_all(procs)
    raise typer.Exit(code)


def _supervise(members: list[local.LocalNode], procs: list[subprocess.Popen[bytes]],
               stopping: Callable[[], bool]) -> int:
    announced = False
    started = time.monotonic()
    while not stopping():
        for m, p in zip(members, procs, strict=True):
            if p.poll() is not None:
                typer.echo(f"{m.name} exited with status {p.returncode}; see {m.log}", err=True)
                return 1
        if not announced and all(local.linked(m, len(members) - 1) for m in members):
            announced = True
            typer.echo(f"all {len(members)} nodes linked; write into any of "
                       f"{members[0].data.parent.parent}/n*/data — Ctrl-C stops them")
        if not announced and time.monotonic() - started > LINK_TIMEOUT:
            typer.echo(f"not all nodes linked after {LINK_TIMEOUT:.0f} s; see the logs",
                       err=True)
            announced = True
        time.sleep(0.2)
    return 0
