"""Compatibility: ``mesh.adapters.relay`` is now :mod:`mesh.adapters.rsync.relay`. The push path
(``mesh.gate``, ``mesh.pushes``, ``mesh.adapters.lsyncd`` and their tests) still
imports the old name until it moves (issue 12); delete this when nothing does."""

from mesh.adapters.rsync.relay import *  # noqa: F403
