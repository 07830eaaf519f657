"""Compatibility: ``mesh.adapters.rsyncd`` is now :mod:`mesh.adapters.rsync.rsyncd`. The push path
(``mesh.gate``, ``mesh.pushes``, ``mesh.adapters.lsyncd`` and their tests) still
imports the old name until it moves (issue 12); delete this when nothing does."""

from mesh.adapters.rsync.rsyncd import *  # noqa: F403
