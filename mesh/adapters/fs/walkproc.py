"""The start-up walk's own process (``mesh.adapters.fs.walker`` starts it, issue 16).

``python -m mesh.adapters.fs.walkproc ROOT STATE_DB HASHED`` reconciles ``ROOT`` with
the index in ``STATE_DB`` (``mesh.adapters.fs.reconcile``) with the agent's own rules
(``default_ignore``), on a read-only connection of its own, and writes what it found
as one msgpack document on its stdout; what it says on stderr (a name skipped, a
folder it could not list) the agent logs. Exit 1 with one line on stderr when the
index cannot be read.

It imports only what the walk needs: no asyncio, no watcher, no writer of the index.
Its start is part of every restart's (importing the walker module took 0.26 s here,
this one 0.19 s).
"""

from __future__ import annotations

import functools
import resource
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import msgpack

from mesh.adapters.fs.listing import default_ignore
from mesh.adapters.fs.reconcile import Reconciled, reconcile
from mesh.errors import MeshError
from mesh.store.known import KnownPaths, open_reader


def walk(root: Path, known: KnownPaths, hashed: bool,
         ignore: Callable[[str], bool] = default_ignore) -> Reconciled:
    """``reconcile`` of ``root`` against what ``known`` reads of the index; without
    ``hashed`` (no stat cache) every file is to scan."""
    return reconcile(root, ignore, functools.partial(known.expected, hashed=hashed),
                     known.held)


def main(argv: list[str]) -> int:
    root, db, hashed = argv
    try:
        with open_reader(Path(db)) as known:
            found = walk(Path(root), known, hashed == "1")
    except MeshError as err:  # said as it is; anything else is a bug: its traceback
        print(err, file=sys.stderr)
        return 1
    found.peak_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sys.stdout.buffer.write(msgpack.packb(asdict(found)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
