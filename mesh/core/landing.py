"""What an incoming push means for each path it lands on (issue 11), with no I/O.

rsync lands a push on the receiver: for each path it moves what is there into
the push's backup dir (what the push *displaced*) and renames the new bytes in.
The user may write the same path at any moment before, during or after, and
the agent may be killed in the middle. This module owns what each of those
moments means; ``mesh.dataplane`` only observes the disk and carries out the
steps it returns, and the simulation (``tests/core/sim.py``) drives the same
code through every interleaving.

Two rules make the meaning exact instead of guessed from timing:

* **One push per path at a time.** A push whose paths overlap one still landing
  waits (``Landings.busy``) until that one ended. So at the end of a push, what
  it displaced is what was on disk just before *its* bytes replaced it.
* **A path is held while a push lands on it.** Nothing scans, restores or pushes
  it until the push ended (``Landings.held``). So the index's disk version of a
  held path is still the one it had when the push began: displaced content that
  is not a version we know is a write of ours made before the bytes landed, and
  the content found at the end (when it is not the pushed version and rsync
  completed) is a write made after they landed, on top of them.

The states of one path on the receiver, and what moves it (one table; the code
below follows it)::

    state     event                                  next      steps
    --------  -------------------------------------  --------  -----------------------------
    idle      begin(X), no path of X held            held(X)   the peer's versions are learned
    idle      begin(X), a path held by Y             idle      X waits for Y's end (busy)
    held(X)   scan / restore / push of the path      held(X)   deferred: the end scans it
    held(X)   end(X), see ``settle``                 idle      Unrecorded? then Landed(+Scanned)
                                                               or Scanned
    held(X)   agent stops                            (gone)    X is noted on disk (keep area)
    (noted)   agent starts                           idle      settle(X, CUT_SHORT) first

``settle`` for one path, given the pushed version V, what the push displaced D
(or nothing), what is there now C, and how the push ended::

    D not a known version          -> Unrecorded(D): a write of ours the push displaced,
                                      concurrent with V (kept, then resolved by the rule)
    C is V's content               -> Landed(V)
    else rsync COMPLETE, or D kept -> Landed(V), Scanned(C): rsync renamed V in (it keeps
                                      D only right before that), and C was written on top
    else                           -> Scanned(C): rsync never reached the path; C is read
                                      as any scan reads it

rsync writes a file's new bytes into a temp name, then moves the old one into the
backup dir, then renames the temp into place. Killed between the last two, it
leaves D kept and the path empty: the data plane finishes that rename first (a
temp holding V's whole content) and then settles; so "D kept" does mean "V was
renamed in", and an empty path then is a delete of V, made by the user.

Never does displaced content rank above what is on disk now: an ``Unrecorded``
write is recorded before the scan of C, so a write found on disk afterwards gets
a higher counter than it (and the replica keeps the displaced one as a conflict
copy, ``Replica._keep_unseen_own_writes``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from mesh.core.manifest import ContentKey
from mesh.core.replica import Observed
from mesh.core.resolver import Version
from mesh.errors import LocalProtocolError


class Outcome(enum.Enum):
    COMPLETE = "complete"  # rsync exited 0: it handled every path of the push
    FAILED = "failed"  # rsync failed or was killed: some paths may not have been reached
    CUT_SHORT = "cut-short"  # the agent stopped while it landed; found at the next start


# --- steps (what the data plane carries out, in order) -----------------------------


@dataclass(frozen=True, slots=True)
class Unrecorded:
    """``observed`` is a write of ours the push displaced before any scan saw it."""

    path: str
    observed: Observed


@dataclass(frozen=True, slots=True)
class Landed:
    """The path holds ``version``'s content: the push's bytes."""

    path: str
    version: Version


@dataclass(frozen=True, slots=True)
class Scanned:
    """What is at the path now, read as a scan reads it (``None``: absent)."""

    path: str
    observed: Observed | None


Step = Unrecorded | Landed | Scanned


def _content(o: Observed | None) -> ContentKey | None:
    return None if o is None else o.content


def settle(version: Version, displaced: Observed | None, current: Observed | None,
           outcome: Outcome, known: Callable[[ContentKey], bool]) -> list[Step]:
    """The steps for one path of a push that ended (see the table above).

    ``displaced``: what the push's backup dir holds for the path (``None``: nothing,
    the path was absent or rsync did not reach it). ``current``: what is at the path
    now. ``known(content)``: whether a version of the path we hold (disk or target)
    has that content.
    """
    path = version.path
    steps: list[Step] = []
    if displaced is not None and not (version.holds(displaced.content)
                                      or known(displaced.content)):
        steps.append(Unrecorded(path, displaced))
    if _content(current) == version.content:
        steps.append(Landed(path, version))
    elif outcome is Outcome.COMPLETE or displaced is not None:
        steps += [Landed(path, version), Scanned(path, current)]
    else:
        steps.append(Scanned(path, current))
    return steps


# --- which pushes land where ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Landing:
    push_id: str
    sender: str
    versions: Mapping[str, Version] = field(default_factory=dict)


class Landings:
    """The pushes landing now, and the paths each one holds."""

    def __init__(self) -> None:
        self._by_path: dict[str, str] = {}
        self._pushes: dict[str, Landing] = {}

    def busy(self, paths: Iterable[str]) -> set[str]:
        """The pushes landing now on any of ``paths``: a new push on them waits."""
        return {p for p in (self._by_path.get(path) for path in paths) if p is not None}

    def begin(self, landing: Landing) -> None:
        if landing.push_id in self._pushes:
            raise LocalProtocolError(f"push {landing.push_id} is landing already")
        if self.busy(landing.versions):
            raise LocalProtocolError(f"push {landing.push_id}: its paths are held")
        self._pushes[landing.push_id] = landing
        for path in landing.versions:
            self._by_path[path] = landing.push_id

    def held(self, path: str) -> bool:
        return path in self._by_path

    def get(self, push_id: str) -> Landing | None:
        return self._pushes.get(push_id)

    def end(self, push_id: str) -> Landing | None:
        """Release the push's paths; the landing it was (None: not landing)."""
        landing = self._pushes.pop(push_id, None)
        if landing is not None:
            for path in landing.versions:
                if self._by_path.get(path) == push_id:
                    del self._by_path[path]
        return landing

    def __len__(self) -> int:
        return len(self._pushes)
