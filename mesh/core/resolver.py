"""The one deterministic rule for concurrent versions (DESIGN.md, resolution).

Every node computes the same verdict from the two versions alone:

1. an edit beats a delete (a delete that did not see the edit loses no data);
2. otherwise the later hybrid-logical-clock stamp of the write wins;
3. a tie goes to the larger node id.

The resolved version is the winner's content under the pointwise maximum of
both vectors, with no increment, so every node ends with the same vector and
the resolution does not ripple. The loser's content is kept under a name
derived from the losing write alone, so it is the same on every node.

A path's state is a ``Version``: the set of its maximal writes (the *heads*,
pairwise concurrent, each with the vector it was written with). Resolving
pairwise against an already merged version is not associative: with writes
A (n1) and B (n2) concurrent, and D a delete n2 made after seeing B, a node
that merges A and B first sees D as concurrent with "B under max(A, B)" and lets the
edit beat the delete, while a node that saw D first picks A. Keeping the heads
makes the state a join-semilattice (absorbing writes in any order gives the
same set), and the winner is the rule's maximum over the heads, so every node
converges to the same content and vector whatever order it learned things in.
"""

from __future__ import annotations

import enum
import hashlib
import posixpath
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mesh.core.manifest import ContentKey, Entry, Kind
from mesh.core.paths import MAX_NAME_BYTES
from mesh.core.vclock import Ordering, VersionVector, hlc_wall_ms
from mesh.errors import LocalProtocolError


class Rule(enum.Enum):
    EDIT_BEATS_DELETE = "edit-beats-delete"
    LATER_WRITE = "later-write"
    LARGER_NODE = "larger-node"


@dataclass(frozen=True, slots=True)
class Conflict:
    """A resolved conflict: what every node logs under the same ``id``."""

    id: str
    path: str
    winner: Entry
    loser: Entry
    rule: Rule
    copy_path: str | None
    """Where the loser's content is kept; None for a delete or a directory
    (a directory has no content of its own; its children keep their versions)."""
    resolved: Entry
    """The version everyone converges to: winner's content, merged vector."""


@dataclass(frozen=True, slots=True)
class Merged:
    """Concurrent versions with the same content: merged silently."""

    resolved: Entry


def _key(e: Entry) -> tuple[object, ...]:
    """Total order of writes; the larger one wins.

    The first three fields are DESIGN.md's rule. The tail only orders two
    writes of one node with one stamp, which takes a node that lost its state;
    it makes the order total so that every node still picks the same one.
    """
    content = e.content
    tail = (content[1], content[2]) if content is not None else (b"", 0)
    return (0 if e.deleted else 1, e.hlc, e.writer, *tail, int(e.kind), e.size, e.mtime_ns,
            tuple(e.vector.items()), e.mode)


def winner_of(a: Entry, b: Entry) -> tuple[Entry, Entry, Rule]:
    """Order two different concurrent versions: (winner, loser, deciding rule)."""
    win, lose = (a, b) if _key(a) > _key(b) else (b, a)
    if win.deleted != lose.deleted:
        rule = Rule.EDIT_BEATS_DELETE
    elif win.hlc != lose.hlc:
        rule = Rule.LATER_WRITE
    else:
        rule = Rule.LARGER_NODE
    return win, lose, rule


def resolve(a: Entry, b: Entry) -> Conflict | Merged:
    """Resolve two concurrent versions of one path."""
    if a.path != b.path:
        raise LocalProtocolError("resolve() needs two versions of one path")
    if a.vector.compare(b.vector) is not Ordering.CONCURRENT:
        raise LocalProtocolError(f"{a.path}: versions are not concurrent")
    vector = a.vector.merge(b.vector)
    if a.content == b.content:
        first = a if _key(a) >= _key(b) else b
        return Merged(first.with_vector(vector))
    win, lose, rule = winner_of(a, b)
    return Conflict(
        id=conflict_id(a, b),
        path=a.path,
        winner=win,
        loser=lose,
        rule=rule,
        copy_path=None if lose.deleted or lose.kind is Kind.DIR else conflict_copy_path(lose),
        resolved=win.with_vector(vector),
    )


@dataclass(frozen=True, slots=True)
class Version:
    """The heads of one path: its maximal, pairwise concurrent writes."""

    heads: tuple[Entry, ...]
    _winner: Entry = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.heads:
            raise LocalProtocolError("a version needs at least one head")
        # Computed once: the winner is read on every comparison of contents.
        winner = self.heads[0] if len(self.heads) == 1 else max(self.heads, key=_key)
        object.__setattr__(self, "_winner", winner)

    @classmethod
    def of(cls, *writes: Entry) -> Version:
        version = cls((writes[0],))
        for w in writes[1:]:
            version = version.absorb(w)
        return version

    @property
    def path(self) -> str:
        return self.heads[0].path

    @property
    def winner(self) -> Entry:
        return self._winner

    @property
    def vector(self) -> VersionVector:
        vector = self.heads[0].vector
        for h in self.heads[1:]:
            vector = vector.merge(h.vector)
        return vector

    @property
    def content(self) -> ContentKey | None:
        return self.winner.content

    @property
    def resolved(self) -> Entry:
        """The winner's content under the merged vector: what the path converges to."""
        return self.winner.with_vector(self.vector)

    def absorb(self, write: Entry) -> Version:
        """The heads after learning of ``write`` (idempotent, order-independent)."""
        if write.path != self.path:
            raise LocalProtocolError("absorb() needs a write of the same path")
        kept: list[Entry] = []
        for h in self.heads:
            order = write.vector.compare(h.vector)
            if order is Ordering.BEFORE or (order is Ordering.EQUAL and _key(h) >= _key(write)):
                return self  # already seen (or the same write again)
            if order is Ordering.CONCURRENT:
                kept.append(h)
        kept.append(write)
        return Version(tuple(sorted(kept, key=_key)))

    def join(self, other: Version) -> Version:
        version = self
        for h in other.heads:
            version = version.absorb(h)
        return version

    def conflicts(self) -> list[Conflict]:
        """One conflict per losing head whose content differs from the winner's."""
        win = self.winner
        out = []
        for h in self.heads:
            if h is not win and h.content != win.content:
                outcome = resolve(win, h)
                assert isinstance(outcome, Conflict)
                out.append(outcome)
        return out

    def holds(self, content: ContentKey | None) -> bool:
        return any(h.content == content for h in self.heads)


def conflict_id(a: Entry, b: Entry) -> str:
    """A hash of the path and both vectors, independent of argument order."""
    vectors = sorted(repr(sorted(e.vector.items())) for e in (a, b))
    material = "\x00".join([a.path, *vectors]).encode()
    return hashlib.sha256(material).hexdigest()[:24]


def conflict_copy_path(loser: Entry) -> str:
    """``dir/name.conflict-<UTC yyyymmddThhmmss>-<node>-<n>.ext`` for the losing write.

    DESIGN.md names the copy by the losing write's time and node. Those two do
    not identify a write: a node that writes a path twice within a second can
    lose both writes (the simulation found it), and the second copy would
    collide with the first. ``n`` is the writer's counter in the losing
    vector, which together with the node identifies the write exactly.
    """
    stamp = datetime.fromtimestamp(hlc_wall_ms(loser.hlc) / 1000, tz=UTC)
    counter = loser.vector.get(loser.writer)
    tag = f".conflict-{stamp:%Y%m%dT%H%M%S}-{loser.writer}-{counter}"
    folder, name = posixpath.split(loser.path)
    stem, ext = posixpath.splitext(name)
    # Keep the name within NAME_MAX by shortening the stem, never the tag.
    room = MAX_NAME_BYTES - len(tag.encode()) - len(ext.encode())
    if room < 1:
        stem, ext = "", ""
        room = MAX_NAME_BYTES - len(tag.encode())
    stem = stem.encode()[:room].decode(errors="ignore")
    copy = f"{stem}{tag}{ext}"
    return f"{folder}/{copy}" if folder else copy
