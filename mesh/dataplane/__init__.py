"""Compatibility: ``mesh.dataplane`` is now :mod:`mesh.engine.dataplane`. The push path
(``mesh.gate``, ``mesh.pushes``, ``mesh.adapters.lsyncd`` and their tests) still
imports the old name until it moves (issue 12); delete this when nothing does."""

from mesh.engine.dataplane import *  # noqa: F403
