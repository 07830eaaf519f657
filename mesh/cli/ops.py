"""Operator commands (issue 5): ``mesh status``, ``mesh verify``, ``mesh health``, and
``mesh conflicts`` (``mesh.cli.conflicts``). Register them with ``register(app)``.

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

import json
import time
from typing import Annotated, Any

import typer
from rich.table import Table

from mesh.cli.conflicts import conflicts_app, vector_text
from mesh.cli.reach import (
    AgentDown,
    ConfigFile,
    Json,
    StateDir,
    ago,
    ask_agent,
    console,
    duration,
    fail,
    running,
    running_status,
    state_dir_of,
)
from mesh.engine.ops.health import DEFAULT_MAX_LAG, health_problems, lag_of
from mesh.errors import ConfigError

# --- mesh status --------------------------------------------------------------------------


def _pushed(counters: dict[str, Any], by: str) -> str:
    """"<paths> paths in <pushes> pushes (<failed> failed)", for lsyncd's (``carried``)
    or the agent's (``sent``) pushes."""
    failed = counters.get("carry_failures" if by == "carried" else "send_failures", 0)
    return (f"{counters.get(by + '_paths', 0)} paths in {counters.get(by, 0)} pushes"
            + (f" ({failed} failed)" if failed else ""))


def status(as_json: Json = False, state_dir: StateDir = None,
           config_file: ConfigFile = None) -> None:
    """This node, its links to the peers, and what is still on its way."""
    _, doc = running(state_dir, config_file)
    if as_json:
        typer.echo(json.dumps(doc))
        return
    now = float(doc["now"])
    pushes = doc["pushes"]
    lsyncd = doc["lsyncd"]
    typer.echo(
        f"node {doc['node']} (cluster {doc['cluster']}), pid {doc['pid']}, up "
        f"{duration(now - doc['started'])}, broker {doc['broker']}, metrics "
        f"{doc.get('metrics') or 'off'}\n"
        f"index {doc['index_size']} paths; unpublished {doc['backlog']}; waiting for content "
        f"of {doc['pending_content']}; {pushes['received']} pushes received\n"
        f"pushed by lsyncd {_pushed(pushes, 'carried')}, by the agent "
        f"{_pushed(pushes, 'sent')}; lsyncd's gate allowed {pushes['allowed']} and denied "
        f"{pushes['denied']} paths\n"
        f"lsyncd " + (f"pid {lsyncd['pid']}, syncing to {', '.join(lsyncd['peers']) or 'nobody'}"
                      if lsyncd["pid"] else "not running"))
    table = Table("peer", "address", "link", "since", "last message", "lag", "catching up",
                  "reconnects", "gate allowed", "paths pushed by lsyncd / agent", box=None,
                  pad_edge=False)
    for address, p in sorted(doc["peers"].items()):
        by = pushes.get("by_peer", {}).get(p["node"], {})
        table.add_row(p["node"] or "?", address, p["state"],
                      ago(now - p["since"]) if p["since"] else "",
                      ago(now - p["last_message"]) if p["last_message"] else "never",
                      str(pushes["pending"].get(p["node"], 0) + p.get("inbox_pending", 0)),
                      "yes" if p["catching_up"] else "no", str(p["reconnects"]),
                      str(by.get("allowed", 0)),
                      f"{by.get('carried_paths', 0)} / {by.get('sent_paths', 0)}")
    if doc["peers"]:
        console().print(table)
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


# --- mesh health --------------------------------------------------------------------------


def stalled_notes(doc: dict[str, Any]) -> list[str]:
    """One line per peer whose content or queue is stalled, hence not counted."""
    stalled = doc.get("stalled")
    if not stalled:
        return []
    after = duration(stalled["after_s"])
    notes = [f"{n} paths {'no peer holds' if not peer else peer + ' announced'} have not "
             f"come for over {after}" for peer, n in sorted(stalled["content"].items())]
    notes += [f"{q['paths']} paths queued for {peer} have not moved for "
              f"{duration(q['for_s'])} ({q['why']})"
              for peer, q in sorted(stalled["queues"].items())]
    notes += [f"the catch-up with {peer} has run for {duration(seconds)}"
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
        fail(f"unhealthy: {err}", 1)
    problems = health_problems(doc, max_lag)
    notes = stalled_notes(doc)
    stalled = f"; stalled, not counted: {'; '.join(notes)}" if notes else ""
    stalled += "".join(f"; warning: {w}" for w in keep_notes(doc))
    if problems:
        fail(f"unhealthy: {'; '.join(problems)}{stalled}", 1)
    up = sum(1 for p in doc["peers"].values() if p["state"] == "up")
    typer.echo(f"healthy: {doc['node']}, {up}/{len(doc['peers'])} links up, lag "
               f"{sum(lag_of(doc).values())}{stalled}")


# --- mesh verify --------------------------------------------------------------------------


def verify(as_json: Json = False, state_dir: StateDir = None,
           config_file: ConfigFile = None) -> None:
    """Compare this node's tree with every reachable peer's; name the paths that differ.

    Exit 0 converged, 1 not, 2 some peers could not be asked."""
    result: dict[str, Any] = ask_agent(state_dir, config_file, "verify", {}, within=60.0)
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
            f"{vector_text(held['vector'])}, written by {held['node']} at {held['written']}")


def register(app: typer.Typer) -> None:
    app.add_typer(conflicts_app, name="conflicts")
    app.command("status")(status)
    app.command("verify")(verify)
    app.command("health")(health)

