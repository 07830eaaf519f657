"""``mesh versions`` and ``mesh restore`` (issue 14): kept versions, as operators know
them from a sync tool's file versioning. Register with ``register(app)``.

What a node keeps (``--keep-for``, ``--keep-max``) is its own: ask the node that kept
a version, or any node (every node keeps what its restores replace). A restore is a
new local edit on the node it runs on, and syncs to every node.
Exit codes as ``mesh conflicts``: 0 done, 1 refused, 2 a bad flag, 3 no agent.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.table import Table

from mesh.cli.conflicts import parse_since, short_time, vector_text
from mesh.cli.reach import ConfigFile, Json, StateDir, ask_agent, console, fail

PathArg = Annotated[str | None, typer.Argument(
    metavar="PATH", help="A path inside the data folder, as synced (relative).",
    show_default=False)]


def versions(
    path: PathArg = None,
    deleted: Annotated[bool, typer.Option(
        "--deleted", help="List deleted paths this node can still bring back.")] = False,
    since: Annotated[str | None, typer.Option(
        metavar="1h|ISO", help="With --deleted: only versions kept since then (90s, 15m, "
        "1h, 2d, 1w ago, or an ISO 8601 time).", show_default=False)] = None,
    as_json: Json = False,
    state_dir: StateDir = None,
    config_file: ConfigFile = None,
) -> None:
    """The kept versions of PATH, newest first (also of a path deleted now); or, with
    --deleted, the deleted paths that can still be restored."""
    if deleted == (path is not None):
        fail("error: give a PATH, or --deleted (not both)", 2)
    if since is not None and not deleted:
        fail("error: --since goes with --deleted", 2)
    if deleted:
        args: dict[str, Any] = {"deleted": True, "since_ms": None if since is None
                                else parse_since(since, time.time())}
        doc: dict[str, Any] = ask_agent(state_dir, config_file, "versions", args)
        _deleted(doc, as_json)
        return
    doc = ask_agent(state_dir, config_file, "versions", {"path": path})
    if as_json:
        typer.echo(json.dumps(doc))
        return
    now = doc["now"]
    state = ("absent (never synced here, or its delete was collected)" if now is None
             else f"deleted by {now['node']} at {short_time(now['written'])}"
             if now["deleted"] else f"{now['kind']} {now['size']} B sha256:"
             f"{now['hash'][:12]}, written by {now['node']} at {short_time(now['written'])}")
    typer.echo(f"{doc['path']} on {doc['node']} now: {state}")
    if not doc["versions"]:
        typer.echo("no kept versions")
        return
    table = Table("version", "kept (UTC)", "why", "written by", "written (UTC)", "size",
                  "kind", "mode", "vector", box=None, pad_edge=False)
    for v in doc["versions"]:
        table.add_row(v["id"] + ("" if v["held"] else " (gone)"), short_time(v["kept"]),
                      v["reason"], v["node"], short_time(v["written"]), str(v["size"]),
                      v["kind"], v["mode"], vector_text(v["vector"]))
    console().print(table)


def _deleted(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        for d in doc["deleted"]:
            typer.echo(json.dumps(d))
        return
    if not doc["deleted"]:
        typer.echo(f"no deleted paths with a kept version on {doc['node']}")
        return
    table = Table("path", "deleted (UTC)", "by", "last version", "written by", "size",
                  box=None, pad_edge=False)
    for d in doc["deleted"]:
        table.add_row(d["path"], short_time(d["deleted"]) or "(delete collected)",
                      d["deleted_by"] or "", d["id"], d["node"], str(d["size"]))
    console().print(table)


def restore(
    path: Annotated[str, typer.Argument(metavar="PATH", help="The path to bring back.")],
    version: Annotated[str | None, typer.Option(
        "--version", metavar="ID", help="Which kept version (an id from `mesh versions "
        "PATH`, 4+ hex digits); default: the newest.", show_default=False)] = None,
    state_dir: StateDir = None,
    config_file: ConfigFile = None,
) -> None:
    """Write a kept version of PATH back as a new local edit, which syncs to every node
    (also undeletes a deleted path)."""
    d: dict[str, Any] = ask_agent(state_dir, config_file, "restore_version",
                                  {"path": path, "version": version})
    if not d["changed"]:
        typer.echo(f"{d['path']} already holds version {d['id']}; nothing to do")
    else:
        typer.echo(f"restored version {d['id']} of {d['path']} as a new local edit "
                   f"(vector {vector_text(d['vector'] or {})}); it syncs to every node")


def register(app: typer.Typer) -> None:
    app.command("versions")(versions)
    app.command("restore")(restore)
