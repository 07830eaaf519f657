"""``mesh conflicts list|show|restore``: the conflict log, read through the local agent."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from mesh.cli.reach import (
    ConfigFile,
    Json,
    StateDir,
    ask_agent,
    console,
)

ConflictId = Annotated[str, typer.Argument(
    metavar="ID", help="A conflict id (or a unique prefix of at least 4 characters).")]


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
    docs: list[dict[str, Any]] = ask_agent(state_dir, config_file, "conflicts", args)
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
        table.add_row(d["id"][:12], short_time(d["logged"]), d["path"], d["winner"]["node"],
                      d["loser"]["node"], d["rule"], _went(d), short_time(d["restored"]) or "")
    console().print(table)


def _went(doc: dict[str, Any]) -> str:
    if doc["loser_kept_at"]:
        return str(doc["loser_kept_at"])
    return "(a delete: nothing to keep)" if doc["loser"]["deleted"] else "(a directory)"


def short_time(iso: str | None) -> str:
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
    d: dict[str, Any] = ask_agent(state_dir, config_file, "conflict", {"id": conflict_id})
    if as_json:
        typer.echo(json.dumps(d))
        return
    lines = [
        f"conflict {d['id']} on {d['path']}",
        f"  rule      {d['rule']}",
        f"  winner    {_version(d['winner'])}",
        f"  loser     {_version(d['loser'])}",
        f"  loser at  {_went(d)}",
        f"  resolved  vector {vector_text(d['resolved_vector'])}",
        f"  logged    {d['logged']} (here)",
        f"  restored  {d['restored'] or 'no'}",
    ]
    typer.echo("\n".join(lines))


def _version(v: dict[str, Any]) -> str:
    what = ("deleted" if v["deleted"] else
            f"{v['kind']} {v['mode']} {v['size']} B sha256:{(v['hash'] or '')[:16]}")
    return f"{v['node']}'s write of {v['written']}: {what}, vector {vector_text(v['vector'])}"


def vector_text(vector: dict[str, int]) -> str:
    return "{" + ", ".join(f"{n}:{c}" for n, c in sorted(vector.items())) + "}"


@conflicts_app.command("restore")
def conflicts_restore(
    conflict_id: ConflictId,
    state_dir: StateDir = None,
    config_file: ConfigFile = None,
) -> None:
    """Bring the losing content back at its path, as a new local edit.

    The edit then wins and syncs to every node; this node's log records the restore."""
    d: dict[str, Any] = ask_agent(state_dir, config_file, "restore", {"id": conflict_id})
    if not d["changed"]:
        typer.echo(f"{d['path']} already holds the losing content of conflict {d['id']}; "
                   "nothing to do")
    else:
        typer.echo(f"restored {d['path']} from {d['source']} as a new local edit "
                   f"(vector {vector_text(d['vector'] or {})}); it syncs to every node")
