"""Compatibility: ``mesh.exchange`` is now :mod:`mesh.engine.exchange`. The push path
(``mesh.gate``, ``mesh.pushes``, ``mesh.adapters.lsyncd`` and their tests) still
imports the old name until it moves (issue 12); delete this when nothing does."""

from mesh.engine.exchange import *  # noqa: F403
