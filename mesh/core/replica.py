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

An incoming push is learned like any announcement (``remote``); its bytes are
staged in the keep area and reach the data folder only through a ``Restore``,
which the data plane carries out after scanning the path, and reports back with
``restored`` (``mesh.core.landing``). So content a push replaces is always
observed first: a write of ours no scan had seen becomes a local write,
resolved like any other (DESIGN.md, "the race to design for").

Folders (DESIGN.md, "Folders"): a folder delete is applied only once nothing
under it stays. A folder whose delete would take an entry that stays (one the
deleter did not see, or an edit that beat its delete) is re-created around it:
a new write of the folder on top of the delete, which every node then makes
the same way.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence

from mesh.core.effects import (
    Announce,
    Effect,
    Logged,
    Observed,
    PathState,
    ReplicaStore,
    Restore,
    Want,
    WriteCopy,
)
from mesh.core.manifest import ContentKey, Entry, Kind
from mesh.core.paths import deepest_first, parent
from mesh.core.resolver import Conflict, Merged, Version, conflict_copy_path, resolve
from mesh.core.vclock import Ordering, VersionVector, hlc_observe, hlc_tick, hlc_wall_ms
from mesh.errors import RemoteProtocolError


class _Under(enum.Enum):
    EMPTY = "empty"  # nothing known inside the folder stays on disk
    GOING = "going"  # what is inside is to be deleted, and not yet
    STAYING = "staying"  # something inside stays (or is on its way)


# --- effects ----------------------------------------------------------------


def _content(v: Version | None) -> ContentKey | None:
    return None if v is None else v.content


def _is_dir(v: Version | None) -> bool:
    return v is not None and v.content is not None and v.content[0] is Kind.DIR


def group(entries: Iterable[Entry]) -> dict[str, Version]:
    """Entries of a manifest, one ``Version`` per path (a path may list several heads)."""
    out: dict[str, Version] = {}
    for e in entries:
        known = out.get(e.path)
        out[e.path] = Version((e,)) if known is None else known.absorb(e)
    return out


class Replica:
    def __init__(self, node: str, store: ReplicaStore, clock: int = 0, horizon: int = 0) -> None:
        self.node = node
        self.store = store
        self.clock = clock
        # The largest clock stamp of a tombstone collected here (mesh.core.retention):
        # a version of a path we have no record of, written entirely at or before it,
        # is what such a delete removed, coming back from a node that was away.
        self.horizon = horizon
        self.stale = 0  # such versions met (each answered with a delete on top)

    # --- what the scanner saw ----------------------------------------------

    def local(self, path: str, observed: Observed | None, wall_ms: int) -> list[Effect]:
        """The scanner found ``observed`` (settled content) at ``path``."""
        fx: list[Effect] = []
        st = self.store.state(path)
        seen = None if observed is None else observed.content
        if seen == _content(st.disk):
            return fx
        if st.target is not None and st.target.content == seen:
            self._put(path, PathState(st.target, None), fx)
        elif st.target is not None and st.target.holds(seen):
            # Stale content of a write we know (a loser, say), while the winner is on
            # its way: it is that write, never a new one (issue 11, mechanism 3).
            head = next(h for h in st.target.heads if h.content == seen)
            self._put(path, PathState(Version((head,)), st.target), fx)
            self._aim(path, st.target, fx)
        else:
            edit = Version((self._edit(path, st, observed, wall_ms, fx, before=_content(st.disk)),))
            self._put(path, PathState(edit, st.target), fx)
            if st.target is not None:
                self._learn(path, edit, fx)
        return fx

    def restored(self, path: str, version: Version) -> list[Effect]:
        """We just put ``version``'s content at ``path`` (a ``Restore``, which scanned the
        path first). It is on disk from this moment: a change made right after is an
        edit on top of it (``mesh.core.landing``)."""
        fx: list[Effect] = []
        if self.store.state(path).target == version:
            self._put(path, PathState(version, None), fx)
        return fx

    def reaim(self, path: str) -> list[Effect]:
        """Ask again for what ``path`` converges to (a restore held up by a landing)."""
        fx: list[Effect] = []
        st = self.store.state(path)
        if st.target is not None:
            self._aim(path, st.target, fx)
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
            self._learn(c.path, Version.of(c.winner, c.loser), fx, record=True)
        grouped = group(entries)
        for path in deepest_first(grouped):
            version = grouped[path]
            self.clock = hlc_observe(self.clock, version.winner.hlc, wall_ms)
            seen = self.store.peer_vector(peer, path)
            if seen is None or version.vector.compare(seen) is not Ordering.BEFORE:
                self.store.set_peer_vector(peer, path, version.vector)
            self._learn(path, version, fx)
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

    def _bumped(self, base: VersionVector, top: int) -> VersionVector:
        """``base`` with our counter for a new write: above ``top``, the highest of ours
        the path's state carries, and no lower than our clock's milliseconds (ticked for
        this write). A node that forgot a path's state (a purge of poisoned rows, a
        state db restored from a backup or lost) never issues a counter it issued
        before, which would name two contents with one vector (Syncthing's rule)."""
        return VersionVector.of({**base.to_dict(),
                                 self.node: max(top + 1, hlc_wall_ms(self.clock))})

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
        self.clock = hlc_tick(self.clock, wall_ms)
        vector = self._bumped(base, top)
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
        folder = parent(path)
        if folder is not None:
            up = self.store.state(folder)
            if up.target is not None and _is_dir(up.disk) and not _is_dir(up.target):
                self._aim(folder, up.target, fx)  # its delete (or file) waits on what it holds

    def _learn(self, path: str, incoming: Version, fx: list[Effect], *,
               record: bool = False) -> None:
        """Fold writes we learned of into what this path converges to (``record``: from
        a conflict record, which tells of writes and holds no state of its own)."""
        st = self.store.state(path)
        goal = st.target or st.disk
        if goal is None and self.horizon and all(h.hlc <= self.horizon
                                                 for h in incoming.heads):
            if not record:
                self._stale(path, incoming, fx)
            return
        version = incoming if goal is None else goal.join(incoming)
        if version == goal:
            return
        for c in version.conflicts():
            if self.store.log_conflict(c):
                fx.append(Logged(c))
            self._keep_loser(st, c, fx)
        self._aim(path, version, fx)

    def _stale(self, path: str, incoming: Version, fx: list[Effect]) -> None:
        """A version of a path we have no record of, older than a delete we collected
        (issue 14): a node away for longer than its peers waited for it still holds
        what was deleted since. A delete of ours on top of it, which every node
        applies (that node files its copy into its keep area), instead of bringing the
        path back. A stale delete needs nothing."""
        self.stale += 1
        if incoming.content is None:
            return
        self.clock = hlc_tick(self.clock, hlc_wall_ms(self.clock))
        vector = self._bumped(incoming.vector, incoming.vector.get(self.node))
        delete = Entry(path, vector, None, kind=incoming.winner.kind, hlc=self.clock,
                       writer=self.node)
        self._put(path, PathState(Version((delete,)), None), fx)

    def _aim(self, path: str, version: Version, fx: list[Effect]) -> None:
        st = self.store.state(path)
        if _is_dir(st.disk) and not _is_dir(version):
            # A folder on disk, and a delete of it (or a file or link in its place): only
            # once nothing inside stays (DESIGN.md, "Folders").
            under = self._under(path)
            if under is _Under.STAYING and version.content is None:
                version = self._recreate(path, st, version)
            elif under is _Under.STAYING:
                # A file or link in place of a folder that keeps entries: the folder again,
                # as a write concurrent with the file's, so the file is a conflict's loser,
                # kept as a copy by every node that holds it (the writer does).
                version = version.join(self._recreate(path, st, None))
                for c in version.conflicts():
                    if self.store.log_conflict(c):
                        fx.append(Logged(c))
                    self._keep_loser(st, c, fx)
            elif under is _Under.GOING:
                self.store.set_state(path, PathState(st.disk, version))
                return  # applied once the deletes of what it holds are (``_put``)
        if _content(st.disk) == version.content:
            self._put(path, PathState(version, None), fx)
            return
        self.store.set_state(path, PathState(st.disk, version))
        if version.content is None or self.store.kept(version.content):
            fx.append(Restore(version))
        else:
            fx.append(Want(version))

    def _under(self, folder: str) -> _Under:
        """What becomes of the entries known inside ``folder``."""
        going = False
        for path in self.store.paths_under(folder):
            st = self.store.state(path)
            goal = st.target or st.disk
            if goal is not None and goal.content is not None:
                return _Under.STAYING
            going = going or _content(st.disk) is not None
        return _Under.GOING if going else _Under.EMPTY

    def _recreate(self, path: str, st: PathState, delete: Version | None) -> Version:
        """The folder again, as a write of ours on top of its delete: something inside it
        stays (DESIGN.md, "Folders"). Every node holding what stays writes the same
        content, so their writes merge without a conflict. With no ``delete``, on top of
        the folder we hold only (concurrent with whatever would replace it)."""
        assert st.disk is not None
        mode = st.disk.winner.mode
        base = st.disk.vector if delete is None else delete.vector.merge(st.disk.vector)
        # Later than every stamp we have seen, so the folder wins against a file it
        # is concurrent with (rule 2: the later write).
        self.clock = hlc_tick(self.clock, hlc_wall_ms(self.clock))
        vector = self._bumped(base, base.get(self.node))
        return Version((Entry(path, vector, b"", 0, 0, mode, Kind.DIR, self.clock, self.node),))

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

