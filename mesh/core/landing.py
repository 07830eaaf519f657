"""What an incoming push means, from its begin to its end, a kill and a restart
(issue 11), with no I/O.

rsync never writes into the data folder. It lands a push into the push's own
staging folder in the keep area (``<keep>/in/<push id>/``), with the live files
as its delta basis; the agent then decides, path by path, what reaches the data
folder, and puts it there itself. That makes every moment of a landing exact
instead of guessed from timing:

* the bytes rsync staged are checked against the version the push announced (by
  hash): bytes the sender changed while rsync read them are never taken for
  that version, nor for a write of ours;
* what is replaced is observed by the agent itself, right before it replaces it
  (``Restore``: scan first, then replace), so a write of ours that no scan had
  seen yet is recorded as ours, concurrent with the pushed version, and
  resolved by the rule (DESIGN.md, "the race to design for");
* the agent records the pushed version as on disk the moment it put it there,
  so a change made right after is an edit on top of it, not a write concurrent
  with it (no spurious conflict, no undone delete);
* a kill at any moment leaves the staged bytes where they were: the next start
  keeps them and asks again for what each path converges to.

The steps of one push (one table; ``mesh.engine.dataplane`` and the simulation follow it)::

    moment           what happens                              state of the live path
    ---------------  ----------------------------------------  ----------------------
    begin(X)         the replica learns X's versions (remote)  untouched
    rsync runs       bytes land in <keep>/in/X/ only           untouched
    end(X), any      each staged file or link whose content    untouched until the
    exit status      is its path's version in X is kept (by    replica asks for a
                     content, ``staged``); the rest is dropped  Restore, then replaced
                     then ``Replica.reaim`` on each path of X:  by the agent, which
                     a target it can now restore is restored    scans it first
                     a file new here is adopted (``adoptable``)  renamed in, never
                                                                over anything
    killed           staging dir and the kept content stay     untouched, or restored
    restart          every staged dir is kept as at end(X);    as above
                     then the scan; then reaim of every target

A staged file whose path holds nothing here may be *adopted* instead of held for a
restore (``adoptable``; issue 16: an empty node's join): it is moved to its path in
one rename that never replaces anything, and recorded as on disk. A restore's scan
first is for what the restore replaces; there is nothing, and anything that came
there meanwhile makes the rename fail, and that path takes the restore's way.

A version the push announced whose bytes did not arrive (rsync failed, or the
sender changed the file while rsync read it) stays a target the replica
``Want``s: a later push brings it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mesh.core.effects import Observed, PathState
from mesh.core.manifest import ContentKey, Kind
from mesh.core.resolver import Version


class Staged(enum.Enum):
    KEEP = "keep"  # the version's content: keep it, a restore puts it in place
    DROP = "drop"  # not the content the push announced for that path (or no path of it)


@dataclass(frozen=True, slots=True)
class StagedFile:
    """What rsync left in the staging dir at ``path``."""

    path: str
    content: ContentKey


def staged(versions: Mapping[str, Version], found: StagedFile) -> Staged:
    """Whether the bytes rsync staged at ``found.path`` are to be kept (see the table).

    Only files and links: a folder has no content to stage (a restore makes it).
    Content is kept when it is that path's version in the push, or any head of it
    (a conflict's loser the sender holds: the copy is made from it)."""
    version = versions.get(found.path)
    if found.content[0] is Kind.DIR or version is None:
        return Staged.DROP
    return Staged.KEEP if version.holds(found.content) else Staged.DROP


def to_reaim(versions: Iterable[str], staged_paths: Iterable[str]) -> list[str]:
    """The paths whose target is asked for again at the end: every path the push
    announced, and what it staged (a kill may have lost the announcement)."""
    return sorted(set(versions) | set(staged_paths))


def adoptable(state: PathState, found: Observed) -> Version | None:
    """The version a path in ``state`` adopts the staged file ``found`` as, or None: a
    file's, when the path has no version on our disk and converges to exactly that
    content (its kind, hash and mode)."""
    target = state.target
    if (state.disk is not None or target is None or found.kind is not Kind.FILE
            or target.winner.kind is not Kind.FILE or target.content != found.content):
        return None
    return target
