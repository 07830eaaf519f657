"""``mesh gate`` and ``mesh tunnel-rsh``: the two commands rsync's side of a push runs.

Neither is for people: lsyncd runs ``mesh gate`` as its rsync binary (through the wrapper
script ``mesh.adapters.lsyncd`` writes), and rsync runs ``mesh tunnel-rsh`` as its remote
shell. ``register`` adds them to the ``mesh`` command; ``python -m mesh.cli_gate`` runs
them without it, which is what the wrapper and ``mesh.gate.push`` do.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from mesh.adapters.tunnel import (
    MAX_HEADER_BYTES,
    PushHello,
    TunnelError,
    credentials_from_env,
    open_push,
    relay_stdio,
)
from mesh.errors import MeshError
from mesh.gate import run_gate
from mesh.pki import NodeCredentials

_RAW_ARGS = {
    "ignore_unknown_options": True,
    "allow_extra_args": True,
    "allow_interspersed_args": False,
    "help_option_names": [],
}
# Everything after HOST is the remote command, "--server" and all.
_RSH_ARGS = {"ignore_unknown_options": True, "allow_interspersed_args": False}
_EXIT_RSH = 255  # what ssh exits with when it cannot connect; lsyncd retries on it


def gate(ctx: typer.Context) -> None:
    """lsyncd's rsync binary: push the changed paths the agent allows (see mesh.gate)."""
    _log_to_stderr("mesh gate")
    raise typer.Exit(run_gate(ctx.args, sys.stdin.buffer, os.environ))


def tunnel_rsh(
    host: Annotated[str, typer.Argument(help="The peer's address, as rsync passes it.")],
    command: Annotated[
        list[str] | None,
        typer.Argument(help="The command rsync asks for; ignored: the peer runs its own."),
    ] = None,
    port: Annotated[int, typer.Option("--port", envvar="MESH_PUSH_PORT")] = 0,
    peer: Annotated[str, typer.Option("--peer", envvar="MESH_PUSH_PEER")] = "",
    push_id: Annotated[str, typer.Option("--push-id", envvar="MESH_PUSH_ID")] = "",
    header_file: Annotated[
        Path | None, typer.Option("--header-file", envvar="MESH_PUSH_HEADER_FILE")
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1)] = 10.0,
) -> None:
    """rsync's remote shell: carry its daemon protocol to PEER's tunnel over mutual TLS."""
    try:
        if not (0 < port < 65536 and peer and push_id and header_file):
            raise MeshError("MESH_PUSH_PORT, _PEER, _ID and _HEADER_FILE must all be set")
        hello = PushHello(push_id, _read_header(header_file))
        creds = credentials_from_env(os.environ)
        asyncio.run(_tunnel(host, port, creds, peer, hello, timeout))
    except (MeshError, TunnelError) as err:
        typer.echo(f"mesh tunnel-rsh: {err}", err=True)
        raise typer.Exit(_EXIT_RSH) from None


def _read_header(path: Path) -> bytes:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_HEADER_BYTES + 1)
    except OSError as err:
        raise MeshError(f"read push header {path}: {err.strerror or err}") from None
    if len(data) > MAX_HEADER_BYTES:
        raise MeshError(f"push header {path} is over {MAX_HEADER_BYTES} bytes")
    return data


async def _tunnel(
    host: str, port: int, creds: NodeCredentials, peer: str, hello: PushHello, within: float
) -> None:
    reader, writer = await open_push(host, port, creds, peer, hello, within=within)
    await relay_stdio(reader, writer)


def _log_to_stderr(prefix: str) -> None:
    level = os.environ.get("MESH_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(stream=sys.stderr, level=level, format=f"{prefix}: %(message)s")


def register(app: typer.Typer) -> None:
    """Add ``gate`` and ``tunnel-rsh`` to ``app`` (the ``mesh`` command)."""
    app.command("gate", context_settings=_RAW_ARGS, hidden=True)(gate)
    app.command("tunnel-rsh", context_settings=_RSH_ARGS, hidden=True)(tunnel_rsh)


app = typer.Typer(name="mesh", add_completion=False, no_args_is_help=True)
register(app)

if __name__ == "__main__":
    app()
