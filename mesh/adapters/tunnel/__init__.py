"""Compatibility: ``mesh.adapters.tunnel`` is now :mod:`mesh.adapters.rsync.tunnel`
(the receiving side), :mod:`mesh.adapters.rsync.push` (the sending side) and
:mod:`mesh.adapters.streams` (frames over streams, unix-socket servers). The push path
(``mesh.gate``, ``mesh.pushes``, ``mesh.adapters.lsyncd`` and their tests) still
imports the old name until it moves (issue 12); delete this when nothing does."""

from mesh.adapters.rsync.push import *  # noqa: F403
from mesh.adapters.rsync.tunnel import *  # noqa: F403
from mesh.adapters.streams import *  # noqa: F403
from mesh.frames import MAX_HEADER_BYTES as MAX_HEADER_BYTES
from mesh.frames import encode_frame as encode_frame
