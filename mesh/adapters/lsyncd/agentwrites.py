"""The paths the agent itself is about to change in the data folder, for lsyncd to pass
over (docs/DESIGN.md, "Data plane").

lsyncd sees every change in the folder, also the agent's own: a file a peer pushed in
and the agent put in place, a delete a peer announced, a conflict copy. None of those is
lsyncd's to push (the writer pushes its own writes, and every node makes the same
conflict copies), and each used to start the gate once per peer, only for the agent to
refuse the batch. So the agent notes each such path here just before it changes it, and
lsyncd's action (``lsyncd.conf.lua.tmpl``) drops an event at the head of its queue whose
path was noted: no gate starts for it, and a batch the gate carries for other paths
leaves it out. A noted path counts for one event, for at most 10 seconds; an event lsyncd
drops wrongly (an operator's write to the same path in that window, or after a note no
event took) is one the agent's own pusher sends: an own write at a path noted in the last
``NOTE_S`` goes one grace after it is recorded (``noted``; ``PushPlanner.unasked``).

The file: a first line naming its generation, then one path per line (NUL and newline
cannot be in a noted path: ``mesh.core.paths`` refuses them). When it passes
``ROTATE_BYTES`` it is replaced by a new generation, which lsyncd notices by the first
line, and reads from the start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from collections import OrderedDict
from pathlib import Path

from mesh.core.paths import reserved

LOG = logging.getLogger("mesh.lsyncd")

ROTATE_BYTES = 1 << 20
NOTE_S = 11.0  # how long lsyncd keeps a note (10 s, on its clock of whole seconds)
NOTED_KEPT = 65_536  # paths remembered as noted (a join notes every file it adopts)


class AgentWrites:
    """Appends paths to the file lsyncd reads (``note``); opened on first use."""

    def __init__(self, path: Path, *, rotate_bytes: int = ROTATE_BYTES) -> None:
        self.path = path
        self.rotate_bytes = rotate_bytes
        self._fd: int | None = None
        self._size = 0
        self.failed = False
        # path -> when noted, oldest first. An OrderedDict: a dict whose oldest entries are
        # deleted one by one skips their empty slots to find the next oldest (noting
        # 200,000 paths took 11.5 CPU-s that way, 0.2 s this way).
        self._noted: OrderedDict[str, float] = OrderedDict()

    def note(self, rel: str) -> None:
        """``rel`` (relative to the data folder) is about to change by the agent's hand.
        Names lsyncd excludes (the keep area, temp names) are not noted."""
        if "\n" in rel or "\r" in rel or reserved(rel) is not None:
            return  # excluded, or a name the file cannot hold (lsyncd asks the gate)
        self._remember(rel, time.monotonic())
        line = (rel + "\n").encode("utf-8", "surrogateescape")
        try:
            if self._fd is None or self._size + len(line) > self.rotate_bytes:
                self._rotate()
            assert self._fd is not None
            self._size += os.write(self._fd, line)
        except OSError as err:
            if not self.failed:  # lsyncd then asks the gate about those paths, as before
                LOG.warning("cannot note the agent's writes for lsyncd in %s: %s",
                            self.path, err)
            self.failed = True

    def noted(self, rel: str) -> bool:
        """Whether lsyncd may still hold a note of ``rel``: an event of it now, a write of
        the user's say, may be the one lsyncd drops for it."""
        at = self._noted.get(rel)
        return at is not None and time.monotonic() - at < NOTE_S

    def _remember(self, rel: str, now: float) -> None:
        self._noted[rel] = now
        self._noted.move_to_end(rel)  # the map stays in time order
        while self._noted:
            at = next(iter(self._noted.values()))
            if now - at < NOTE_S and len(self._noted) <= NOTED_KEPT:
                break
            self._noted.popitem(last=False)

    def _rotate(self) -> None:
        """A new generation: written beside, then renamed over the old one."""
        self.close()
        header = f"meshsync agent writes {secrets.token_hex(8)}\n".encode()
        tmp = self.path.with_name(self.path.name + ".new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, header)
            tmp.replace(self.path)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._size = fd, len(header)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
