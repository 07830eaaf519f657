"""One node's versioning state machine, with no I/O (the h11 shape).

The caller feeds it what happened — the scanner saw a path, a peer announced
versions, a push is about to land, a push displaced some content — and gets
back effects to carry out: announce a version, write a conflict copy, restore
kept content, wait for content from a peer. Storage is behind the small
``ReplicaStore`` protocol (SQLite in the agent, dicts in the simulation).

Per path a node tracks two versions (like Syncthing's local and global), each
a ``Version``: the set of maximal concurrent writes, whose winner by the rule
gives the content (see ``mesh.core.resolver``):

* ``disk``   — the version whose winner's content is in the data folder;
* ``target`` — the version it converges to when that differs: newer content
  announced by a peer, or a conflict's winner it does not hold yet.

Only ``disk`` versions are announced, so a peer's announcements say what it
holds, and the gate (``may_push``) lets a node push a path only when its disk
version strictly dominates what the peer last announced.

Pushed bytes are recognised by the push's own announcement (``expect_push``),
registered before rsync runs — never by timing. Content a push or a restore
replaced is reported through ``displaced``; if it was a local edit the node had
not recorded yet (DESIGN.md, "the race to design for"), it becomes a local
version here and is resolved like any other, so nothing is lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from mesh.core.manifest import ContentKey, Entry, Kind
from mesh.core.resolver import Conflict, Merged, Version, conflict_copy_path, resolve
from mesh.core.vclock import Ordering, VersionVector, hlc_observe, hlc_tick
from mesh.errors import RemoteProtocolError


@dataclass(frozen=True, slots=True)
class PathState:
    disk: Version | None = None
    target: Version | None = None


@dataclass(frozen=True, slots=True)
class Observed:
    """What the scanner found at a path (absence is ``None``)."""

    kind: Kind
    hash: bytes
    size: int = 0
    mtime_ns: int = 0
    mode: int = 0o644

    @property
    def content(self) -> ContentKey:
        return (self.kind, self.hash, 0 if self.kind is Kind.SYMLINK else self.mode)


# --- effects ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Announce:
    """Our disk now holds ``version``: tell every peer (all of its heads)."""

    version: Version


@dataclass(frozen=True, slots=True)
class Logged:
    """A conflict this node had not logged before: log it and tell every peer."""

    conflict: Conflict


@dataclass(frozen=True, slots=True)
class WriteCopy:
    """Materialize ``source``'s content at ``path`` (a conflict copy).

    The content is at ``source.path`` when the disk holds it there, else in
    the keep area. Never overwrite an existing file at ``path``.
    """

    path: str
    source: Entry


@dataclass(frozen=True, slots=True)
class Restore:
    """Put ``version``'s content (from the keep area) at its path, or delete
    it for a tombstone; whatever it replaces goes to the keep area.

    The executor scans the path first and restores only if ``version`` is
    still the target afterwards, so a restore never replaces content the index
    has not recorded (that would make our own writes look like foreign edits).
    """

    version: Version


@dataclass(frozen=True, slots=True)
class Want:
    """We need ``version``'s content; a peer holding it will push it."""

    version: Version


Effect = Announce | Logged | WriteCopy | Restore | Want


class ReplicaStore(Protocol):
    def state(self, path: str) -> PathState: ...
    def set_state(self, path: str, state: PathState) -> None: ...
    def peer_vector(self, peer: str, path: str) -> VersionVector | None: ...
    def set_peer_vector(self, peer: str, path: str, vector: VersionVector) -> None: ...
    def log_conflict(self, conflict: Conflict) -> bool:
        """Record ``conflict``; False when its id was already logged."""
        ...

    def kept(self, content: ContentKey) -> bool:
        """Whether the keep area holds this content."""
        ...


def _content(v: Version | None) -> ContentKey | None:
    return None if v is None else v.content


def _holds(v: Version | None, content: ContentKey | None) -> bool:
    return v is not None and v.holds(content)


def group(entries: Iterable[Entry]) -> dict[str, Version]:
    """Entries of a manifest, one ``Version`` per path (a path may list several heads)."""
    out: dict[str, Version] = {}
    for e in entries:
        known = out.get(e.path)
        out[e.path] = Version((e,)) if known is None else known.absorb(e)
    return out


class Replica:
    def __init__(self, node: str, store: ReplicaStore, clock: int = 0) -> None:
        self.node = node
        self.store = store
        self.clock = clock
        self.intents: dict[str, Version] = {}

    # --- what the scanner saw ----------------------------------------------

    def local(self, path: str, observed: Observed | None, wall_ms: int) -> list[Effect]:
        """The scanner found ``observed`` (settled content) at ``path``."""
        fx: list[Effect] = []
        st = self.store.state(path)
        seen = None if observed is None else observed.content
        if seen == _content(st.disk):
            return fx
        intent = self.intents.pop(path, None)
        if st.target is not None and st.target.content == seen:
            self._put(path, PathState(st.target, None), fx)
        elif intent is not None and intent.content == seen:
            self._put(path, PathState(intent, None), fx)
            goal = st.target or st.disk
            if goal is not None:  # a late push may have landed on newer content
                self._learn(path, goal, fx)
        else:
            before = _content(st.disk) if intent is None else intent.content
            edit = Version((self._edit(path, st, observed, wall_ms, fx, before=before),))
            self._put(path, PathState(edit, st.target), fx)
            if st.target is not None:
                self._learn(path, edit, fx)
        return fx

    # --- what peers said -----------------------------------------------------

    def remote(
        self,
        peer: str,
        entries: Sequence[Entry],
        conflicts: Sequence[tuple[Entry, Entry]] = (),
        wall_ms: int = 0,
    ) -> list[Effect]:
        """A peer announced the versions its disk holds, and conflicts it logged."""
        verdicts = [self._check_conflict(peer, w, lo) for w, lo in conflicts]
        fx: list[Effect] = []
        for c in verdicts:
            self.clock = hlc_observe(self.clock, max(c.winner.hlc, c.loser.hlc), wall_ms)
            if self.store.log_conflict(c):
                fx.append(Logged(c))
            self._learn(c.path, Version.of(c.winner, c.loser), fx)
        for path, version in group(entries).items():
            self.clock = hlc_observe(self.clock, version.winner.hlc, wall_ms)
            seen = self.store.peer_vector(peer, path)
            if seen is None or version.vector.compare(seen) is not Ordering.BEFORE:
                self.store.set_peer_vector(peer, path, version.vector)
            self._learn(path, version, fx)
        return fx

    def expect_push(
        self,
        peer: str,
        entries: Sequence[Entry],
        conflicts: Sequence[tuple[Entry, Entry]] = (),
        wall_ms: int = 0,
    ) -> list[Effect]:
        """A peer is about to push these versions' bytes to us."""
        fx = self.remote(peer, entries, conflicts, wall_ms)
        self.intents.update(group(entries))
        return fx

    def clear_intents(self, paths: Iterable[str]) -> None:
        """The push ended and its events were applied."""
        for path in paths:
            self.intents.pop(path, None)

    def displaced(self, path: str, observed: Observed | None, wall_ms: int, *,
                  known: Version | None = None) -> list[Effect]:
        """``observed`` was at ``path`` until a push or a restore replaced it;
        it is in the keep area now. ``known``: the version on disk when that push
        began; another push that ended since may have moved ``disk`` past it (two
        pushes landing on one path), and what the first displaced is still no edit."""
        fx: list[Effect] = []
        st = self.store.state(path)
        seen = None if observed is None else observed.content
        intent = self.intents.get(path)
        if seen == _content(st.disk) or any(
            _holds(v, seen) for v in (st.disk, st.target, intent, known)
        ):
            # A push that went stale can land on newer content we hold: put
            # that back now rather than leave older bytes for a user to edit.
            goal = st.target or st.disk
            if (
                goal is not None and intent is not None and goal.content != intent.content
                and (goal.content is None or self.store.kept(goal.content))
            ):
                fx.append(Restore(goal))
            return fx
        # An edit we had not recorded yet: it becomes a write like any other.
        edit = self._edit(path, st, observed, wall_ms, fx, before=_content(st.disk))
        self._learn(path, Version((edit,)), fx)
        return fx

    # --- the gate --------------------------------------------------------------

    def may_push(self, peer: str, path: str) -> bool:
        """Whether our disk version of ``path`` may overwrite ``peer``'s."""
        st = self.store.state(path)
        if st.disk is None or st.target is not None:
            return False
        seen = self.store.peer_vector(peer, path)
        if seen is None:
            return st.disk.content is not None
        return st.disk.vector.dominates(seen)

    # --- internals -------------------------------------------------------------

    def _edit(
        self, path: str, st: PathState, observed: Observed | None, wall_ms: int,
        fx: list[Effect], *, before: ContentKey | None,
    ) -> Entry:
        """A new local write, made on top of the content ``before``."""
        base = st.disk.vector if st.disk is not None else VersionVector()
        self._keep_unseen_own_writes(st, before, fx)
        # Our counter must exceed any we issued for this path, including one a
        # pending target carries, so that the new write is new everywhere.
        top = max(base.get(self.node), st.target.vector.get(self.node) if st.target else 0)
        vector = VersionVector.of({**base.to_dict(), self.node: top + 1})
        self.clock = hlc_tick(self.clock, wall_ms)
        if observed is None:
            kind = st.disk.winner.kind if st.disk is not None else Kind.FILE
            return Entry(path, vector, None, kind=kind, hlc=self.clock, writer=self.node)
        return Entry(
            path, vector, observed.hash, observed.size, observed.mtime_ns,
            observed.mode, observed.kind, self.clock, self.node,
        )

    def _put(self, path: str, st: PathState, fx: list[Effect]) -> None:
        before = self.store.state(path)
        self.store.set_state(path, st)
        if st.disk is not None and st.disk != before.disk:
            fx.append(Announce(st.disk))

    def _learn(self, path: str, incoming: Version, fx: list[Effect]) -> None:
        """Fold writes we learned of into what this path converges to."""
        st = self.store.state(path)
        goal = st.target or st.disk
        version = incoming if goal is None else goal.join(incoming)
        if version == goal:
            return
        for c in version.conflicts():
            if self.store.log_conflict(c):
                fx.append(Logged(c))
            self._keep_loser(st, c, fx)
        self._aim(path, version, fx)

    def _aim(self, path: str, version: Version, fx: list[Effect]) -> None:
        st = self.store.state(path)
        if _content(st.disk) == version.content:
            self._put(path, PathState(version, None), fx)
            return
        self.store.set_state(path, PathState(st.disk, version))
        if version.content is None or self.store.kept(version.content):
            fx.append(Restore(version))
        else:
            fx.append(Want(version))

    def _keep_unseen_own_writes(
        self, st: PathState, before: ContentKey | None, fx: list[Effect]
    ) -> None:
        """Keep our own pending writes that a new write did not see.

        Version vectors assume a node's writes to a path are linear: our next
        write carries a counter above every earlier one, so it supersedes them.
        That is false for a write of ours that a push displaced before we could
        restore it: the user edited the pushed bytes (``before``), not ours.
        Keep its content as a conflict copy before the new write buries it.
        """
        heads = [h for v in (st.disk, st.target) if v is not None for h in v.heads]
        for h in heads:
            if (
                h.writer == self.node
                and h.content is not None
                and h.content != before
                and self.store.kept(h.content)
            ):
                copy = conflict_copy_path(h)
                known = self.store.state(copy)
                if known.disk is None and known.target is None:
                    fx.append(WriteCopy(copy, h))

    def _keep_loser(self, st: PathState, c: Conflict, fx: list[Effect]) -> None:
        if c.copy_path is None or c.loser.content is None:
            return
        holds = _content(st.disk) == c.loser.content or self.store.kept(c.loser.content)
        copy = self.store.state(c.copy_path)
        # A copy path already known holds the copy (or a later edit of it).
        if holds and copy.disk is None and copy.target is None:
            fx.append(WriteCopy(c.copy_path, c.loser))

    @staticmethod
    def _check_conflict(peer: str, winner: Entry, loser: Entry) -> Conflict:
        if winner.vector.compare(loser.vector) is not Ordering.CONCURRENT:
            raise RemoteProtocolError("conflict between versions that are not concurrent",
                                      peer=peer)
        outcome = resolve(winner, loser)
        if isinstance(outcome, Merged) or outcome.winner != winner:
            raise RemoteProtocolError("conflict record does not follow the rule", peer=peer)
        return outcome

