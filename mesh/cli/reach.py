"""How an operator command reaches the local agent (``mesh.cli.ops``, ``mesh.cli.conflicts``,
``mesh.cli.versions``): its state directory, whether it runs (``agent.json``), asking it
over ``ctl.sock``, and failing with the exit codes of ``mesh.cli.ops``."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from mesh import config
from mesh.engine.ops import control
from mesh.errors import ConfigError, MeshError

EXIT_NOT_RUNNING = 3


STALE_S = 10.0  # agent.json is rewritten every second; older than this, the agent is stuck


StateDir = Annotated[str | None, typer.Option(
    "--state-dir", metavar="DIR", show_default=False,
    help="The agent's state directory (env MESH_STATE_DIR; default as for `mesh agent`; "
         "with `mesh local up --dir D`, node K's is D/nK/state).")]


ConfigFile = Annotated[str | None, typer.Option(
    "--config", metavar="FILE", show_default=False,
    help="The agent's TOML config file, to find its state directory (env MESH_CONFIG).")]


Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


class AgentDown(MeshError):
    """The local agent is not running, or not responding."""


def state_dir_of(state_dir: str | None, config_file: str | None) -> Path:
    flags: dict[str, object | None] = {
        "state_dir": str(Path(state_dir).absolute()) if state_dir else None,
        "config_file": config_file,
    }
    return config.load(flags, os.environ, hostname=socket.gethostname()).state_dir


def running_status(state_dir: Path, now: float) -> dict[str, Any]:
    """The agent's status document, or ``AgentDown`` saying why there is none."""
    path = state_dir / "agent.json"
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
        pid, written = int(doc["pid"]), float(doc["now"])
    except FileNotFoundError:
        raise AgentDown(f"no agent is running with state dir {state_dir} (no {path.name} "
                        "there; is --state-dir right?)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AgentDown(f"cannot read the agent's status {path}: {err}") from None
    if not _alive(pid):
        raise AgentDown(f"the agent of {state_dir} is not running (pid {pid} in {path.name} "
                        f"has exited; last status {ago(now - written)})")
    if now - written > STALE_S:
        raise AgentDown(f"the agent of {state_dir} (pid {pid}) is not responding: its "
                        f"status was last written {ago(now - written)}")
    return doc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def running(state_dir: str | None, config_file: str | None) -> tuple[Path, dict[str, Any]]:
    try:
        where = state_dir_of(state_dir, config_file)
        return where, running_status(where, time.time())
    except ConfigError as err:
        fail(f"error: {err}", 2)
    except AgentDown as err:
        fail(f"error: {err}", EXIT_NOT_RUNNING)


def ask_agent(state_dir: str | None, config_file: str | None, op: str, args: dict[str, Any],
         within: float = 30.0) -> Any:
    where, _ = running(state_dir, config_file)
    try:
        return asyncio.run(control.ask(where, op, args, within=within))
    except control.AgentUnavailable as err:
        fail(f"error: {err}", EXIT_NOT_RUNNING)
    except control.ControlError as err:
        fail(f"error: {err}", 1)


def console() -> Console:
    # Piped output is not cut to 80 columns: tables are read by scripts and pasted.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 1000)


def fail(message: str, code: int) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(code)


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def ago(seconds: float) -> str:
    return f"{seconds:.1f} s ago" if seconds < 120 else f"{duration(seconds)} ago"
