"""What each meshsync agent says about the paths a run found wrong, read while the
agents still run: its status (what ``mesh health --max-lag 0`` would object to, and what
it still has queued per peer), its index's rows for each path (its disk version and
target, what each peer last announced, its stat cache), and the lines of its log that
are warnings or name one of the paths.

A CI failure leaves only the report behind: this is what makes a finding there
something to reason about rather than to guess at. Read-only: the index is opened with
SQLite's ``mode=ro`` (the agents write it in WAL mode; a reader does not block them).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections import deque
from pathlib import Path
from typing import Any

from mesh.cli.ops import stalled_notes
from mesh.engine.ops.health import health_problems
from mesh.store.rows import unpack_heads, unpack_vector

LOG_LINES = 40  # per node: the last warnings and lines naming a path
NOTICED = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")


def status_lines(doc: dict[str, Any] | None) -> list[str]:
    """What the agent's status document says is not done."""
    if doc is None:
        return ["no status document (agent.json)"]
    lines = health_problems(doc, 0) or ["healthy, nothing pending"]
    pending = {p: n for p, n in doc["pushes"]["pending"].items() if n}
    if pending:
        lines.append(f"queued for peers: {pending}")
    for peer, counters in sorted(doc["pushes"].get("by_peer", {}).items()):
        lines.append(f"pushes to {peer}: {counters}")
    lines += [f"stalled: {note}" for note in stalled_notes(doc)]  # as `mesh health` says
    if doc.get("wants"):
        lines.append(f"wants: {doc['wants']}")
    return lines


def _heads(blob: bytes) -> list[dict[str, Any]]:
    """A row's heads (``mesh.store.rows``), each as writer, vector, kind, size, hash."""
    return [{"writer": h.writer, "vector": h.vector.to_dict(), "kind": int(h.kind),
             "size": h.size, "hash": None if h.hash is None else h.hash.hex()}
            for h in unpack_heads(blob).heads]


def index_rows(state_db: Path, paths: list[str]) -> dict[str, dict[str, Any]]:
    """Each path's rows in the index (paths as the index names them)."""
    out: dict[str, dict[str, Any]] = {}
    try:
        db = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as err:
        return {p: {"error": str(err)} for p in paths}
    with contextlib.closing(db):
        for path in paths:
            try:
                row = db.execute("SELECT heads FROM versions WHERE path = ?",
                                 (path,)).fetchone()
                target = db.execute("SELECT heads FROM targets WHERE path = ?",
                                    (path,)).fetchone()
                peers = {peer: unpack_vector(vector).to_dict() for peer, vector in db.execute(
                    "SELECT peer, vector FROM peer_vectors WHERE path = ?", (path,))}
                cache = db.execute("SELECT size, mtime_ns, ino, hash FROM stat_cache "
                                   "WHERE path = ?", (path,)).fetchone()
            except sqlite3.Error as err:
                out[path] = {"error": str(err)}
                continue
            out[path] = {
                "disk": _heads(row[0]) if row else None,
                "target": _heads(target[0]) if target else None,
                "peers": peers,
                "stat_cache": None if cache is None else {
                    "size": cache[0], "mtime_ns": cache[1], "ino": cache[2],
                    "hash": bytes(cache[3]).hex()},
            }
    return out


def log_lines(log: Path, needles: list[str]) -> list[str]:
    """The last ``LOG_LINES`` lines of the agent's log that are warnings or errors, or
    name one of ``needles``."""
    kept: deque[str] = deque(maxlen=LOG_LINES)
    try:
        with log.open(errors="replace") as f:
            for line in f:
                if any(n in line for n in NOTICED) or any(n in line for n in needles):
                    kept.append(line.rstrip("\n")[:400])
    except OSError as err:
        return [f"no log: {err}"]
    return list(kept)


def explain(state: Path, log: Path, paths: list[str]) -> dict[str, Any]:
    """One node's account of ``paths`` (as the index names them)."""
    try:
        doc = json.loads((state / "agent.json").read_text())
    except (OSError, ValueError):
        doc = None
    return {"status": status_lines(doc), "index": index_rows(state / "state.db", paths),
            "log": log_lines(log, paths)}
