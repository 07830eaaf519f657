"""What a peer's versions must satisfy before the replica sees them (issue 13).

A certified node can send anything the codec accepts. Two kinds of values would
then harm the receiver's own state rather than just the paths they name:

* **counters near the top of int64.** A node writes with its own counter above
  every counter of its own the path carries (``Replica._bumped``); a
  tombstone claiming ``{victim: 2**63-1}`` made the victim's next write of
  that path overflow, and the agent exit, again at every restart. A counter
  above ``Limits.max_counter`` (2**62) is refused, whoever it belongs to: an
  honest node gets there only after 2**62 writes of one path.
* **hybrid clock stamps far in the future.** The receiver's clock follows
  every stamp it sees (``hlc_observe``) and is persisted; a stamp of
  ``2**63-3`` left no room for the next tick, and both honest agents exited on
  their next ordinary write, at every restart. As HLC systems do (Kulkarni et
  al., "Logical Physical Clocks", 2014: a bound on the offset), a stamp further
  ahead of our wall clock than ``Limits.max_skew_ms`` is refused. A node whose
  clock really is that far ahead has its writes refused until it is fixed; the
  log line says so.

``screen`` drops every version of a path one of whose writes is refused (the
rest of the message is applied: a poisoned path must not stop a peer's whole
stream), and says why, per path. ``unannounced`` checks a push header against
what its sender announced on the manifest stream: a header is the sender's
restatement of versions it announced, never a side channel for new ones.

No I/O and no clock: the wall time comes in as an argument.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from mesh.core.manifest import Entry
from mesh.core.resolver import Version
from mesh.core.vclock import MAX_COUNTER, Ordering, VersionVector, hlc_wall_ms
from mesh.errors import LocalProtocolError

COUNTER_BOUND = 2**62
DEFAULT_MAX_SKEW_MS = 300_000  # 5 minutes, Kerberos' default for clock skew


@dataclass(frozen=True, slots=True)
class Limits:
    max_skew_ms: int = DEFAULT_MAX_SKEW_MS
    max_counter: int = COUNTER_BOUND

    def __post_init__(self) -> None:
        if type(self.max_skew_ms) is not int or self.max_skew_ms < 0:
            raise LocalProtocolError(f"max_skew_ms must be >= 0, not {self.max_skew_ms!r}")
        if type(self.max_counter) is not int or not 0 < self.max_counter < MAX_COUNTER:
            raise LocalProtocolError(f"max_counter must be in 1..2**63-2, not "
                                     f"{self.max_counter!r}")


def vector_refusal(vector: VersionVector, limits: Limits) -> str | None:
    """Why a vector may not reach the replica (a counter out of bounds), or None."""
    for node, counter in vector.items():
        if counter > limits.max_counter:
            return (f"counter {counter} of {node} is above {limits.max_counter} "
                    "(a write on top of it could overflow)")
    return None


def refusal(e: Entry, wall_ms: int, limits: Limits) -> str | None:
    """Why the write ``e`` may not reach the replica, or None."""
    if (why := vector_refusal(e.vector, limits)) is not None:
        return why
    ahead = hlc_wall_ms(e.hlc) - wall_ms
    if ahead > limits.max_skew_ms:
        return (f"clock stamp {e.hlc} is {ahead / 1000:.0f} s ahead of ours "
                f"(max skew {limits.max_skew_ms / 1000:g} s)")
    return None


@dataclass(frozen=True, slots=True)
class Screened:
    entries: tuple[Entry, ...]
    conflicts: tuple[tuple[Entry, Entry], ...]
    refused: dict[str, str] = field(default_factory=dict)
    """Path -> the first reason one of its writes was refused."""


def screen(entries: Iterable[Entry], conflicts: Iterable[tuple[Entry, Entry]], wall_ms: int,
           limits: Limits) -> Screened:
    """``entries`` and ``conflicts`` without the paths that carry a refused write."""
    entries, conflicts = tuple(entries), tuple(conflicts)
    refused: dict[str, str] = {}
    for e in (*entries, *(x for pair in conflicts for x in pair)):
        if e.path not in refused and (why := refusal(e, wall_ms, limits)) is not None:
            refused[e.path] = why
    if not refused:
        return Screened(entries, conflicts)
    return Screened(tuple(e for e in entries if e.path not in refused),
                    tuple(p for p in conflicts if p[0].path not in refused), refused)


def unannounced(entries: Iterable[Entry], conflicts: Iterable[tuple[Entry, Entry]],
                announced: Callable[[str], VersionVector | None]) -> dict[str, str]:
    """The paths of a push header that say more than its sender announced, and why.

    Every write in the header (each head, and both sides of each conflict) must be
    before or equal to the vector the sender last announced for its path
    (``announced``; None when it never did): an honest sender pushes its disk
    version, which it announced, or an older one when it wrote again meanwhile."""
    writes: dict[str, list[Entry]] = {}
    for e in (*entries, *(x for pair in conflicts for x in pair)):
        writes.setdefault(e.path, []).append(e)
    out: dict[str, str] = {}
    for path, listed in writes.items():
        seen = announced(path)
        if seen is None:
            out[path] = "never announced"
            continue
        for e in listed:
            if e.vector.compare(seen) not in (Ordering.BEFORE, Ordering.EQUAL):
                out[path] = (f"a write with vector {_vector(e.vector)} is not among what was "
                             f"announced (vector {_vector(seen)})")
                break
    return out


def stand_in(path: str, me: str, announced: Iterable[VersionVector]) -> Version | None:
    """What replaces our version of ``path`` when it is forgotten (``Index.purge``): a
    delete of ours under the merge of the vectors the peers ``announced`` for it, or
    None when none did. Our next write of the path then dominates all they hold; what
    they hold that we never heard of is concurrent with it, and our counter for it is
    new all the same (``Replica._bumped``), so no vector names two contents."""
    vector = VersionVector()
    for v in announced:
        vector = vector.merge(v)
    if not vector:
        return None
    return Version((Entry(path, vector, None, writer=me),))


def clock_refusal(clock: int, wall_ms: int, limits: Limits) -> str | None:
    """Why a persisted clock cannot be taken up again (ahead of the wall clock by more
    than the maximum skew: a stamp a peer sent before the bounds were checked), or None."""
    ahead = hlc_wall_ms(clock) - wall_ms
    if ahead > limits.max_skew_ms:
        return (f"clock {clock} is {ahead / 1000:.0f} s ahead of the wall clock (max skew "
                f"{limits.max_skew_ms / 1000:g} s)")
    return None


def summary(refused: Mapping[str, str], limit: int = 3) -> str:
    """``refused`` for one log line: the count, and the first few paths with why."""
    items = sorted(refused.items())
    shown = "; ".join(f"{path[:80]!r}: {why}" for path, why in items[:limit])
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)} path(s): {shown}{more}"


def _vector(v: VersionVector) -> str:
    return "{" + ", ".join(f"{n}:{c}" for n, c in v.items()) + "}"
