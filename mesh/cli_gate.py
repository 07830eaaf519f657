"""``mesh gate`` and ``mesh tunnel-rsh``: the two commands rsync's side of a push runs.

Neither is for people: lsyncd runs ``mesh gate`` as its rsync binary (through the wrapper
script ``mesh.adapters.lsyncd`` writes), and rsync runs ``mesh tunnel-rsh`` as its remote
shell. ``register`` adds them to the ``mesh`` command; ``python -m mesh.cli_gate`` runs
them without it, which is what the wrapper and ``mesh.gate.push`` do.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from mesh import rsh
from mesh.gatecall import run_gate

_RAW_ARGS = {
    "ignore_unknown_options": True,
    "allow_extra_args": True,
    "allow_interspersed_args": False,
    "help_option_names": [],
}
# Everything after HOST is the remote command, "--server" and all.


def gate(ctx: typer.Context) -> None:
    """lsyncd's rsync binary: push the changed paths the agent allows (see mesh.gate)."""
    _log_to_stderr("mesh gate")
    raise typer.Exit(run_gate(ctx.args, sys.stdin.buffer, os.environ))


def tunnel_rsh(ctx: typer.Context) -> None:
    """rsync's remote shell: carry its daemon protocol to the peer's tunnel over mutual TLS
    (the same as ``python -m mesh.rsh``, which the push path runs for a faster start)."""
    raise typer.Exit(rsh.main(ctx.args, os.environ))


def _log_to_stderr(prefix: str) -> None:
    level = os.environ.get("MESH_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(stream=sys.stderr, level=level, format=f"{prefix}: %(message)s")


def register(app: typer.Typer) -> None:
    """Add ``gate`` and ``tunnel-rsh`` to ``app`` (the ``mesh`` command)."""
    app.command("gate", context_settings=_RAW_ARGS, hidden=True)(gate)
    app.command("tunnel-rsh", context_settings=_RAW_ARGS, hidden=True)(tunnel_rsh)


app = typer.Typer(name="mesh", add_completion=False, no_args_is_help=True)
register(app)

if __name__ == "__main__":
    app()
