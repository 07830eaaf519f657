"""What ``mesh health`` judges from a node's status document (``agent.json``): the
lag, and the problems that make a node unhealthy. Plain functions over the document,
shared by the CLI and the metrics (``mesh_healthy``, ``mesh_lag_entries``), so the two
always agree."""

from __future__ import annotations

from typing import Any

DEFAULT_MAX_LAG = 100


def lag_of(doc: dict[str, Any]) -> dict[str, int]:
    """What this node has not yet exchanged, by kind (all counted in paths or manifests),
    without what is stalled (``mesh.core.stall``: it no longer counts, issue 13)."""
    stalled = doc.get("stalled") or {"content_paths": 0, "queues": {}}
    pending = doc["pushes"]["pending"]
    return {
        "unpublished": int(doc["backlog"]),
        "waiting for content": max(0, int(doc["pending_content"])
                                   - int(stalled["content_paths"])),
        "queued for peers": sum(n for peer, n in pending.items()
                                if peer not in stalled["queues"]),
        "manifests held back": sum(p.get("inbox_pending", 0) for p in doc["peers"].values()),
    }


def health_problems(doc: dict[str, Any], max_lag: int) -> list[str]:
    problems = []
    if doc.get("scanning"):
        problems.append("start-up scan running")
    stalled = (doc.get("stalled") or {}).get("catch_ups", {})
    for address, p in sorted(doc["peers"].items()):
        name = p["node"] or address
        if p["state"] != "up":
            problems.append(f"link to {name} is {p['state']}")
        elif p["catching_up"] and name not in stalled:
            problems.append(f"catching up with {name}")
    lag = lag_of(doc)
    total = sum(lag.values())
    if total > max_lag:
        parts = ", ".join(f"{k} {v}" for k, v in lag.items() if v)
        problems.append(f"lag {total} > {max_lag} ({parts})")
    return problems
