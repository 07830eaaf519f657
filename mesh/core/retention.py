"""What the keep area and the index may forget, and when (issue 14). No I/O, no clock.

The keep area (``mesh.engine.keep``) holds content by hash. Each version filed there is a
*kept row* (``mesh.store.kept``): the write it held at its path, why it went
(replaced, deleted, a conflict's loser), and when. An object without a row is
content in transit (a push's staged bytes waiting for
their restore) or from a release before the rows: an *orphan*.

Three rules, in this order:

1. **Needed content is never collected** (``needed``): a head of a pending target
   (a restore, or a landing, takes it from the keep area) and the loser of a logged
   conflict whose copy is not written yet. Not the cap, not an operator setting,
   nothing removes it.
2. **Retention** (``Policy.keep_for_ms``): a row goes once it is older than the
   retention *and* superseded everywhere (``superseded``): our disk version of the
   path and every known peer's announced vector are strictly newer than the kept
   write (or have no record of the path: its tombstone was collected, which needs
   every known peer's acknowledgement). With ``keep_for 0`` that is the only wait.
   An orphan counts as superseded, kept since its file's ctime.
3. **The cap** (``Policy.cap_bytes``): while the objects take more than the cap,
   the oldest rows go, superseded or not, oldest first, needed content excepted.

An object is removed when no row keeps it any more and it is not needed
(``plan``): several rows (one content at two paths, or kept twice) share one
object.

Tombstones (``tombstone_due``): a delete's row in the index goes once every known
peer announced it (or something newer) and its clock stamp is older than the
maximum clock skew. The replica then remembers one number, the *horizon*: the
largest stamp of a collected tombstone; a version of a path it has no record of,
written entirely at or before the horizon, is stale (``mesh.core.replica``).
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from mesh.core.manifest import Entry
from mesh.core.resolver import Version
from mesh.core.vclock import Ordering, VersionVector, hlc_wall_ms
from mesh.errors import LocalProtocolError


class Reason(enum.StrEnum):
    REPLACED = "replaced"  # a newer version took its place
    DELETED = "deleted"  # a delete removed it
    LOST = "conflict loser"  # the losing head of a conflict, replaced by the winner


@dataclass(frozen=True, slots=True)
class Policy:
    keep_for_ms: int  # 0: only as long as rule 1 needs
    cap_bytes: int | None  # None: no cap

    def __post_init__(self) -> None:
        if self.keep_for_ms < 0 or (self.cap_bytes is not None and self.cap_bytes < 0):
            raise LocalProtocolError(f"retention policy {self} is negative")


@dataclass(frozen=True, slots=True)
class Candidate:
    """One kept row (``row`` None: an orphan object) as the collector judges it."""

    row: int | None
    hash: bytes
    size: int
    kept_ms: int
    superseded: bool


@dataclass(frozen=True, slots=True)
class Plan:
    rows: tuple[int, ...]  # kept rows to delete
    objects: tuple[bytes, ...]  # objects to remove (no row keeps them, none needs them)
    freed: int  # their bytes
    held: int  # bytes of objects rule 1 keeps
    total: int  # bytes of all objects before the plan


def needed(targets: Iterable[Version], unwritten: Iterable[Entry],
           among: Collection[bytes] | None = None) -> set[bytes]:
    """The hashes rule 1 keeps: every head of a pending target, every loser whose copy
    is not written yet; only those ``among`` when given (what a round could remove)."""
    out = {h.hash for v in targets for h in v.heads if h.hash}
    out.update(e.hash for e in unwritten if e.hash)
    return out if among is None else out.intersection(among)


def _newer(seen: VersionVector | None, kept: VersionVector) -> bool:
    return seen is None or seen.compare(kept) is Ordering.AFTER


def superseded(kept: VersionVector, disk: VersionVector | None,
               peers: Sequence[VersionVector | None]) -> bool:
    """Whether our disk and every known peer hold a version strictly newer than the kept
    write's (``None``: no record of the path, its tombstone already collected)."""
    return _newer(disk, kept) and all(_newer(p, kept) for p in peers)


def plan(candidates: Sequence[Candidate], rows_of: Mapping[bytes, int],
         objects: Mapping[bytes, int], need: set[bytes], policy: Policy, now_ms: int) -> Plan:
    """What one round removes: rows past retention and superseded, then the oldest rows
    while the objects (hash -> bytes) exceed the cap; and the objects left unkept.
    ``candidates`` need not list every row, only the oldest: ``rows_of`` counts every
    row of each candidate's hash, so an object a row not listed keeps stays."""
    total = sum(objects.values())
    held = sum(size for h, size in objects.items() if h in need)
    refs = Counter({h: rows_of.get(h, 0) for h in {c.hash for c in candidates}})
    refs.update(c.hash for c in candidates if c.row is None)  # an orphan keeps itself
    listed = set(refs)
    drop: list[Candidate] = []
    left: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: c.kept_ms):
        if c.hash not in need and c.superseded and now_ms - c.kept_ms >= policy.keep_for_ms:
            drop.append(c)
            refs[c.hash] -= 1
        elif c.hash not in need:
            left.append(c)
    size_now = total - sum(objects.get(h, 0) for h in listed if refs[h] <= 0)
    if policy.cap_bytes is not None:
        for c in left:  # oldest first
            if size_now <= policy.cap_bytes:
                break
            drop.append(c)
            refs[c.hash] -= 1
            if refs[c.hash] <= 0:
                size_now -= objects.get(c.hash, 0)
    gone = tuple(sorted(h for h in listed if refs[h] <= 0 and h not in need and h in objects))
    return Plan(rows=tuple(c.row for c in drop if c.row is not None), objects=gone,
                freed=sum(objects[h] for h in gone), held=held, total=total)


def tombstone_due(disk: Version | None, target: Version | None,
                  peers: Sequence[VersionVector | None], now_ms: int, min_age_ms: int) -> bool:
    """Whether a path's delete may leave the index: it is a tombstone on our disk with
    nothing pending, older than ``min_age_ms`` by its clock stamp (the maximum clock
    skew, so that a node joining later with a slower clock stamps its writes above the
    horizon), and every known peer announced it or something newer."""
    if disk is None or target is not None or disk.content is not None:
        return False
    stamp = max(h.hlc for h in disk.heads)
    if now_ms - hlc_wall_ms(stamp) < min_age_ms:
        return False
    return all(p is not None and p.compare(disk.vector) in (Ordering.EQUAL, Ordering.AFTER)
               for p in peers)


def horizon_of(disk: Version) -> int:
    """The stamp a collected tombstone raises the horizon to."""
    return max(h.hlc for h in disk.heads)
