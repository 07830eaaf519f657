"""Operator commands (issue 5): ``mesh conflicts``, ``mesh status``, ``mesh verify``,
``mesh health``. Register them with ``register(app)``.

Each finds the local agent through its state directory (``--state-dir`` or
``MESH_STATE_DIR``, else the config file or the default, as for ``mesh agent``):
``agent.json`` there says whether it runs (its pid is alive and it rewrote the
file lately), and ``ctl.sock`` answers what needs the agent itself.

Exit codes: 0 done; 1 the agent refused (unknown id...), or ``verify`` found the
trees differ, or ``health`` is unhealthy (Docker reads only 0 and 1, so a stopped
agent is 1 there too); 2 ``verify`` could not reach every peer, or a bad flag;
3 the local agent is not running.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from mesh import config
from mesh.engine.ops import control
from mesh.engine.ops.health import DEFAULT_MAX_LAG, health_problems, lag_of
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
ConflictId = Annotated[str, typer.Argument(
    metavar="ID", help="A conflict id (or a unique prefix of at least 4 characters).")]


class AgentDown(MeshError):
    """The local agent is not running, or not responding."""


# --- finding the agent --------------------------------------------------------------------


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
                        f"has exited; last status {_ago(now - written)})")
    if now - written > STALE_S:
        raise AgentDown(f"the agent of {state_dir} (pid {pid}) is not responding: its "
                        f"status was last written {_ago(now - written)}")
    return doc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _running(state_dir: str | None, config_file: str | None) -> tuple[Path, dict[str, Any]]:
    try:
        where = state_dir_of(state_dir, config_file)
        return where, running_status(where, time.time())
    except ConfigError as err:
        _fail(f"error: {err}", 2)
    except AgentDown as err:
        _fail(f"error: {err}", EXIT_NOT_RUNNING)


def _ask(state_dir: str | None, config_file: str | None, op: str, args: dict[str, Any],
         within: float = 30.0) -> Any:
    where, _ = _running(state_dir, config_file)
    try:
        return asyncio.run(control.ask(where, op, args, within=within))
    except control.AgentUnavailable as err:
        _fail(f"error: {err}", EXIT_NOT_RUNNING)
    except control.ControlError as err:
        _fail(f"error: {err}", 1)


def _console() -> Console:
    # Piped output is not cut to 80 columns: tables are read by scripts and pasted.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 1000)


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(code)


# --- mesh conflicts -----------------------------------------------------------------------

conflicts_app = typer.Typer(
    help="The conflict log: what was resolved, by which rule, where the loser went.",
    no_args_is_help=True)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float) -> int:
    """``90s``, ``15m``, ``1h``, ``2d``, ``1w`` ago, or an ISO 8601 time (UTC if no
    offset is given), as Unix milliseconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if match:
        return int((now - float(match[1]) * _UNITS[match[2]]) * 1000)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter("expected a duration such as 90s, 15m, 1h, 2d, 1w, or an "
                                 "ISO 8601 time such as 2024-05-01T12:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


@conflicts_app.command("list")
def conflicts_list(
    since: Annotated[str | None, typer.Option(
        metavar="1h|ISO", help="Only conflicts logged since then: 90s, 15m, 1h, 2d, 1w ago, "
        "or an ISO 8601 time (UTC without an offset).", show_default=False)] = None,
    path: Annotated[str | None, typer.Option(
        "--path", metavar="GLOB", help="Only paths matching this shell pattern ('*' also "
        "matches '/').", show_default=False)] = None,
    node: Annotated[str | None, typer.Option(
        "--node", metavar="N", help="Only conflicts that node N's write won or lost.",
        show_default=False)] = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", metavar="K", min=1, help="At most K, newest first.",
        show_default=False)] = None,
    as_json: Json = False,
    state_dir: StateDir = None,
    config_file: ConfigFile = None,
) -> None:
    """List conflicts, newest first: a table, or JSON lines with --json."""
    args = {"since_ms": None if since is None else parse_since(since, time.time()),
            "path": path, "node": node, "limit": limit}
    docs: list[dict[str, Any]] = _ask(state_dir, config_file, "conflicts", args)
    if as_json:
        for doc in docs:
            typer.echo(json.dumps(doc))
        return
    if not docs:
        typer.echo("no conflicts" + (" match" if any(args.values()) else " logged"))
        return
    table = Table("id", "logged (UTC)", "path", "winner", "loser", "rule", "loser went to",
                  "restored", box=None, pad_edge=False)
    for d in docs:
        table.add_row(d["id"][:12], _short(d["logged"]), d["path"], d["winner"]["node"],
                      d["loser"]["node"], d["rule"], _went(d), _short(d["restored"]) or "")
    _console().print(table)


def _went(doc: dict[str, Any]) -> str:
    if doc["loser_kept_at"]:
        return str(doc["loser_kept_at"])
    return "(a delete: nothing to keep)" if doc["loser"]["deleted"] else "(a directory)"


def _short(iso: str | None) -> str:
    """``2024-05-01T12:00:03.123Z`` -> ``2024-05-01 12:00:03``."""
    return "" if iso is None else iso[:19].replace("T", " ")


@conflicts_app.command("show")
def conflicts_show(
    conflict_id: ConflictId,
    as_json: Json = False,
    state_dir: StateDir = None,
    config_file: ConfigFile = None,
) -> None:
    """Everything recorded of one conflict: both versions, the rule, the copy."""
    d: dict[str, Any] = _ask(state_dir, config_file, "conflict", {"id": conflict_id})
    if as_json:
        typer.echo(json.dumps(d))
        return
    lines = [
        f"conflict {d['id']} on {d['path']}",
        f"  rule      {d['rule']}",
        f"  winner    {_version(d['winner'])}",
        f"  loser     {_version(d['loser'])}",
        f"  loser at  {_went(d)}",
        f"  resolved  vector {_vector(d['resolved_vector'])}",
        f"  logged    {d['logged']} (here)",
        f"  restored  {d['restored'] or 'no'}",
    ]
    typer.echo("\n".join(lines))


def _version(v: dict[str, Any]) -> str:
    what = ("deleted" if v["deleted"] else
            f"{v['kind']} {v['mode']} {v['size']} B sha256:{(v['hash'] or '')[:16]}")
    return f"{v['node']}'s write of {v['written']}: {what}, vector {_vector(v['vector'])}"


def _vector(vector: dict[str, int]) -> str:
    return "{" + ", ".join(f"{n}:{c}" for n, c in sorted(vector.items())) + "}"


@conflicts_app.command("restore")
def conflicts_restore(
    conflict_id: ConflictId,
    state_dir: StateDir = None,
    config_file: ConfigFile = None,
) -> None:
    """Bring the losing content back at its path, as a new local edit.

    The edit then wins and syncs to every node; this node's log records the restore."""
    d: dict[str, Any] = _ask(state_dir, config_file, "restore", {"id": conflict_id})
    if not d["changed"]:
        typer.echo(f"{d['path']} already holds the losing content of conflict {d['id']}; "
                   "nothing to do")
    else:
        typer.echo(f"restored {d['path']} from {d['source']} as a new local edit "
                   f"(vector {_vector(d['vector'] or {})}); it syncs to every node")


# --- mesh status --------------------------------------------------------------------------


def status(as_json: Json = False, state_dir: StateDir = None,
           config_file: ConfigFile = None) -> None:
    """This node, its links to the peers, and what is still on its way."""
    _, doc = _running(state_dir, config_file)
    if as_json:
        typer.echo(json.dumps(doc))
        return
    now = float(doc["now"])
    pushes = doc["pushes"]
    lsyncd = doc["lsyncd"]
    typer.echo(
        f"node {doc['node']} (cluster {doc['cluster']}), pid {doc['pid']}, up "
        f"{_duration(now - doc['started'])}, broker {doc['broker']}, metrics "
        f"{doc.get('metrics') or 'off'}\n"
        f"index {doc['index_size']} paths; unpublished {doc['backlog']}; waiting for content "
        f"of {doc['pending_content']}; pushed {pushes.get('sent_paths', 0)} paths in "
        f"{pushes.get('sent', 0)} pushes ({pushes.get('send_failures', 0)} failed); lsyncd's "
        f"gate allowed {pushes['allowed']} and denied {pushes['denied']} paths; "
        f"{pushes['received']} pushes received\n"
        f"lsyncd " + (f"pid {lsyncd['pid']}, syncing to {', '.join(lsyncd['peers']) or 'nobody'}"
                      if lsyncd["pid"] else "not running"))
    table = Table("peer", "address", "link", "since", "last message", "lag", "catching up",
                  "reconnects", box=None, pad_edge=False)
    for address, p in sorted(doc["peers"].items()):
        table.add_row(p["node"] or "?", address, p["state"],
                      _ago(now - p["since"]) if p["since"] else "",
                      _ago(now - p["last_message"]) if p["last_message"] else "never",
                      str(pushes["pending"].get(p["node"], 0) + p.get("inbox_pending", 0)),
                      "yes" if p["catching_up"] else "no", str(p["reconnects"]))
    if doc["peers"]:
        _console().print(table)
    else:
        typer.echo("no peers")
    for note in stalled_notes(doc):
        typer.echo(f"stalled, not counted against health: {note}")
    keep = doc.get("keep")
    if keep:
        cap = "no cap" if keep["cap_bytes"] is None else f"cap {keep['cap_bytes']} B"
        typer.echo(f"keep area {keep['bytes']} B in {keep['objects']} objects ({cap}), "
                   f"{keep['held_bytes']} B needed by pending restores, {keep['versions']} "
                   f"versions listed; freed {keep['freed_bytes']} B, "
                   f"{keep['tombstones_collected']} tombstones collected since start")
    for note in keep_notes(doc):
        typer.echo(f"warning: {note}")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _ago(seconds: float) -> str:
    return f"{seconds:.1f} s ago" if seconds < 120 else f"{_duration(seconds)} ago"


# --- mesh health --------------------------------------------------------------------------


def stalled_notes(doc: dict[str, Any]) -> list[str]:
    """One line per peer whose content or queue is stalled, hence not counted."""
    stalled = doc.get("stalled")
    if not stalled:
        return []
    after = _duration(stalled["after_s"])
    notes = [f"{n} paths {'no peer holds' if not peer else peer + ' announced'} have not "
             f"come for over {after}" for peer, n in sorted(stalled["content"].items())]
    notes += [f"{q['paths']} paths queued for {peer} have not moved for "
              f"{_duration(q['for_s'])} ({q['why']})"
              for peer, q in sorted(stalled["queues"].items())]
    notes += [f"the catch-up with {peer} has run for {_duration(seconds)}"
              for peer, seconds in sorted(stalled.get("catch_ups", {}).items())]
    return notes


def keep_notes(doc: dict[str, Any]) -> list[str]:
    """Warnings about the keep area (issue 14): over its cap is not unhealthy (the
    collector frees the oldest versions; what stays is needed), but worth a look."""
    keep = doc.get("keep")
    if not keep or keep.get("cap_bytes") is None or keep["bytes"] <= keep["cap_bytes"]:
        return []
    mib = 1 << 20
    return [f"keep area over its cap: {keep['bytes'] / mib:.1f} MiB of "
            f"{keep['cap_bytes'] / mib:.1f} MiB, {keep['held_bytes'] / mib:.1f} MiB of it "
            "needed by pending restores"]


def health(
    max_lag: Annotated[int, typer.Option(
        "--max-lag", min=0, help="Most entries not yet exchanged that still count as caught "
        "up.")] = DEFAULT_MAX_LAG,
    state_dir: StateDir = None,
    config_file: ConfigFile = None,
) -> None:
    """Exit 0 when the agent runs, its links are up and it has caught up; else 1.

    Suitable for Docker's HEALTHCHECK: one line says why it is unhealthy."""
    try:
        doc = running_status(state_dir_of(state_dir, config_file), time.time())
    except (ConfigError, AgentDown) as err:
        _fail(f"unhealthy: {err}", 1)
    problems = health_problems(doc, max_lag)
    notes = stalled_notes(doc)
    stalled = f"; stalled, not counted: {'; '.join(notes)}" if notes else ""
    stalled += "".join(f"; warning: {w}" for w in keep_notes(doc))
    if problems:
        _fail(f"unhealthy: {'; '.join(problems)}{stalled}", 1)
    up = sum(1 for p in doc["peers"].values() if p["state"] == "up")
    typer.echo(f"healthy: {doc['node']}, {up}/{len(doc['peers'])} links up, lag "
               f"{sum(lag_of(doc).values())}{stalled}")


# --- mesh verify --------------------------------------------------------------------------


def verify(as_json: Json = False, state_dir: StateDir = None,
           config_file: ConfigFile = None) -> None:
    """Compare this node's tree with every reachable peer's; name the paths that differ.

    Exit 0 converged, 1 not, 2 some peers could not be asked."""
    result: dict[str, Any] = _ask(state_dir, config_file, "verify", {}, within=60.0)
    code = 1 if result["differences"] else 2 if result["unreachable"] else 0
    if as_json:
        typer.echo(json.dumps({**result, "converged": code == 0}))
        raise typer.Exit(code)
    echo = typer.echo
    counts = result["paths"]
    held = ", ".join(f"{n} {counts[n]}" for n in [result["node"], *result["answered"]])
    echo(f"verify from {result['node']}: paths held by each node asked: {held}")
    for peer, why in sorted(result["unreachable"].items()):
        echo(f"could not ask {peer}: {why}")
    for diff in result["differences"]:
        echo(f"differs: {diff['path']}")
        width = max(len(node) for node in diff["held"])
        for node, held in diff["held"].items():
            echo(f"  {node:<{width}}  {_held(held)}")
    if code == 1:
        echo(f"not converged: {len(result['differences'])} path(s) differ")
    elif code == 2:
        echo("no differences among the nodes asked, but not every peer answered")
    else:
        echo("converged")
    raise typer.Exit(code)


def _held(held: dict[str, Any] | None) -> str:
    if held is None:
        return "(absent)"
    what = "" if held["kind"] == "dir" else f" sha256:{(held['hash'] or '')[:12]}"
    return (f"{held['kind']} {held['mode']}{what} {held['size']} B, vector "
            f"{_vector(held['vector'])}, written by {held['node']} at {held['written']}")


def register(app: typer.Typer) -> None:
    app.add_typer(conflicts_app, name="conflicts")
    app.command("status")(status)
    app.command("verify")(verify)
    app.command("health")(health)


# Shared with mesh.cli.versions (issue 14: `mesh versions`, `mesh restore`).
ask_agent = _ask
console = _console
fail = _fail
short_time = _short
vector_text = _vector
