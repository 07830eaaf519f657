"""The ``mesh`` command.

``mesh agent`` is built alone: the agent's start is on every restart's critical path
(issue 16), and the other commands' modules (the operators' clients, the local
cluster, Swarm) cost it 0.15 s of imports before its start-up walk could begin.
Everything else, and ``app`` for tests, is ``mesh.cli.commands``.
"""

from __future__ import annotations

import sys
from typing import Any


def main() -> None:
    if sys.argv[1:2] == ["agent"]:
        from mesh.cli.agent import run_alone

        run_alone(sys.argv[2:])
        return
    from mesh.cli.commands import app

    app()


def __getattr__(name: str) -> Any:
    if name == "app":
        from mesh.cli.commands import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
