"""Compatibility: ``mesh.tls`` is now :mod:`mesh.pki.tls`. The push path
(``mesh.gate``, ``mesh.pushes``, ``mesh.adapters.lsyncd`` and their tests) still
imports the old name until it moves (issue 12); delete this when nothing does."""

from mesh.pki.tls import *  # noqa: F403
