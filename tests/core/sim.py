"""A simulated cluster of sans-IO replicas, with their data plane, over a fake network.

Each node has a data folder (a dict of files and folders), a keep area, and a
``Replica`` over an in-memory store. Manifests travel encoded with the real
codec. Pushes model lsyncd + rsync through the gate as the agent runs them
(``mesh.core.landing``): the gate scans and grants at the sender; the receiver
learns the push's versions when it begins; then, path by path and at any later
step, rsync stages a file in the push's staging dir, reading the *sender's disk
as it is then*, which may no longer be the version granted. Nothing lands in the
data folder until the push ends: the staged bytes that are a version the path
converges to are kept, and the replica's restores put them in place, each after
a scan of the path. The user may write anywhere at any step, and any node may be
killed (what it held in memory is lost; its disk, index, keep area and staging
dirs stay) and restarted.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from mesh.core import admit, manifest, retention
from mesh.core.effects import (
    Announce,
    Effect,
    Logged,
    Observed,
    PathState,
    Restore,
    Want,
    WriteCopy,
)
from mesh.core.landing import Staged, StagedFile, adoptable, staged, to_reaim
from mesh.core.manifest import ContentKey, Entry, Kind, Manifest
from mesh.core.paths import deepest_first, parent
from mesh.core.pushplan import PushPlanner
from mesh.core.pushstate import Push, ReplicaView
from mesh.core.reconcile import Identity, Known, Seen, unchanged
from mesh.core.replica import Replica
from mesh.core.resolver import Conflict, Version
from mesh.core.vclock import VersionVector

BASE_MS = 1_780_000_000_000
SWEEP_PAGE = 2  # the engine's are 4,096 and 2 x PATHS_PER_PUSH (mesh.engine.pushes)
SWEEP_AHEAD = 1
DIR_MODE = 0o755
TOMBSTONE_AGE_MS = 5000  # the most clock skew: above the simulation's (-2 s .. +2 s)


@dataclass
class MemoryStore:
    states: dict[str, PathState] = field(default_factory=dict)
    peers: dict[tuple[str, str], VersionVector] = field(default_factory=dict)
    conflicts: dict[str, Conflict] = field(default_factory=dict)
    keep: dict[ContentKey, bytes] = field(default_factory=dict)

    def state(self, path: str) -> PathState:
        return self.states.get(path, PathState())

    def set_state(self, path: str, state: PathState) -> None:
        self.states[path] = state

    def peer_vector(self, peer: str, path: str) -> VersionVector | None:
        return self.peers.get((peer, path))

    def set_peer_vector(self, peer: str, path: str, vector: VersionVector) -> None:
        self.peers[(peer, path)] = vector

    def log_conflict(self, conflict: Conflict) -> bool:
        if conflict.id in self.conflicts:
            return False
        self.conflicts[conflict.id] = conflict
        return True

    def conflict_map(self) -> dict[str, Conflict]:
        return self.conflicts

    def all_states(self) -> dict[str, PathState]:
        return self.states

    def kept(self, content: ContentKey) -> bool:
        return content[0] is Kind.DIR or content in self.keep

    def paths_under(self, folder: str) -> list[str]:
        return sorted(p for p in self.states if p.startswith(folder + "/"))

    def forget(self, path: str, peers: list[str]) -> None:
        self.states.pop(path, None)
        for peer in peers:
            self.peers.pop((peer, path), None)

    def unwritten_losers(self) -> list[Entry]:
        out = []
        for c in self.conflicts.values():
            copy = None if c.copy_path is None else self.state(c.copy_path)
            if copy is not None and copy.disk is None and copy.target is None:
                out.append(c.loser)
        return out


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


_STAMPS = itertools.count(1)


@dataclass(frozen=True)
class Node:
    """A file (``data`` is not None) or a folder on a simulated disk. ``stamp``: what a
    ``stat`` tells apart (inode, ctime), new with every write, chmod or rename into
    place; not part of what two disks compare by."""

    data: bytes | None
    mode: int
    stamp: int = field(default_factory=lambda: next(_STAMPS), compare=False)

    def seen(self) -> Seen:
        size = 0 if self.data is None else len(self.data)
        return Seen(Kind.DIR if self.data is None else Kind.FILE, self.mode,
                    (size, 0, 0, self.stamp))

    @property
    def is_dir(self) -> bool:
        return self.data is None

    def observed(self) -> Observed:
        if self.data is None:
            return Observed(Kind.DIR, b"", 0, 0, self.mode)
        return Observed(Kind.FILE, digest(self.data), len(self.data), 0, self.mode)


@dataclass(frozen=True)
class ManifestMsg:
    src: str
    dst: str
    payload: bytes


@dataclass(frozen=True)
class PushMsg:
    """A push's announcement (the tunnel's header): its versions and their conflicts."""

    src: str
    dst: str
    push_id: str
    versions: dict[str, Version]
    conflicts: tuple[tuple[Entry, Entry], ...]
    planned: Push | None = None  # the sender's planner's push, told how it ended
    planner: PushPlanner | None = None  # ... by the planner that started it


@dataclass
class Transfer:
    """rsync at work on one push: it stages each path in turn."""

    msg: PushMsg
    order: list[str]
    phase: dict[str, str]
    ended: bool = False  # rsync is done: the receiver's end adopts a file per step

    def next_path(self) -> str | None:
        return next((p for p in self.order if p not in self.phase), None)


class SimStore(Protocol):
    keep: dict[ContentKey, bytes]

    def state(self, path: str) -> PathState: ...
    def set_state(self, path: str, state: PathState) -> None: ...
    def peer_vector(self, peer: str, path: str) -> VersionVector | None: ...
    def set_peer_vector(self, peer: str, path: str, vector: VersionVector) -> None: ...
    def log_conflict(self, conflict: Conflict) -> bool: ...
    def kept(self, content: ContentKey) -> bool: ...
    def paths_under(self, folder: str) -> list[str]: ...
    def conflict_map(self) -> dict[str, Conflict]: ...
    def all_states(self) -> dict[str, PathState]: ...
    def forget(self, path: str, peers: list[str]) -> None: ...
    def unwritten_losers(self) -> list[Entry]: ...


class SimNode:
    def __init__(
        self, name: str, peers: list[str], skew_ms: int, cluster: Cluster, store: SimStore
    ) -> None:
        self.name = name
        self.peers = peers
        self.skew_ms = skew_ms
        self.cluster = cluster
        self.store = store
        self.replica = Replica(name, self.store)
        self.disk: dict[str, Node] = {}
        self.up = True
        # Lost when the node is killed:
        self.plan = self._planner()
        self.sweeps: dict[str, tuple[str, float]] = {}  # peer -> (after, since)
        self.outbox: dict[str, Version] = {}
        self.out_conflicts: list[tuple[Entry, Entry]] = []
        # A push's end under way: the files it will adopt, each still in its staging dir.
        self.adopting: dict[str, dict[str, Version]] = {}
        # ... and what it told the replica, passed on to the exchange and the pusher once
        # the whole end is done (``DataPlane.push_ended`` forwards its effects last; other
        # scans and writes run between its chunks).
        self.held: dict[str, list[Effect]] = {}
        self._holding: list[Effect] | None = None
        # Kept on disk: each incoming push's staging dir.
        self.staging: dict[str, dict[str, Node]] = {}
        # Kept in the state database: the stat cache (path -> the file as hashed, hash).
        self.cache: dict[str, tuple[Identity, bytes]] = {}
        self.rescanned: list[str] = []  # by the last start-up reconcile
        self.seq = 0

    @property
    def now(self) -> int:
        return BASE_MS + self.cluster.time_ms + self.skew_ms

    @property
    def now_s(self) -> float:
        return self.cluster.time_ms / 1000

    def _planner(self) -> PushPlanner:
        plan = PushPlanner(self.name, ReplicaView(self.replica))
        for peer in self.peers:
            plan.add_peer(peer)
        return plan

    def plan_tick(self) -> None:
        """The agent's pusher (``mesh.core.pushplan``): start what is due for peers up."""
        if not self.up:
            return
        up = [p for p in self.peers if self.cluster.nodes[p].up]
        self.plan.linked(up)  # what they wrote is theirs to push: forwarded late
        self._page()
        for push in self.plan.tick(self.now_s, up).pushes:
            versions = dict(push.versions)
            related = tuple((c.winner, c.loser) for c in self.store.conflict_map().values()
                            if c.path in versions)
            push_id = f"{self.name}-{next(self.cluster.ids)}"
            self.cluster.network.append(
                PushMsg(self.name, push.peer, push_id, versions, related, push, self.plan))

    def _page(self) -> None:
        """``Pushes._page`` with ``mesh.store.bulk.behind``: the sweeps after a resync
        queue a page of what the peer is behind on (by path, of the versions waiting for
        no target) while fewer than SWEEP_AHEAD paths are queued for it (small here,
        so a sweep takes several pages, with writes and pushes between them)."""
        for peer, (after, since) in list(self.sweeps.items()):
            while self.plan.pending(peer) < SWEEP_AHEAD:
                states = self.store.all_states()
                rows = [p for p in sorted(states) if p > after
                        and states[p].disk is not None and states[p].target is None]
                rows = rows[:SWEEP_PAGE]
                behind = [p for p in rows if self.replica.may_push(peer, p)]
                self.plan.behind(peer, behind, since, checked=True)
                if len(rows) < SWEEP_PAGE:
                    del self.sweeps[peer]
                    break
                after = rows[-1]
                self.sweeps[peer] = (after, since)

    def push_done(self, msg: PushMsg, status: int) -> None:
        """A push of ours ended (a planner of before a kill knows nothing of it)."""
        if self.up and msg.planned is not None and msg.planner is self.plan:
            self.plan.end(msg.planned, self.now_s, status)

    # user actions -----------------------------------------------------------
    def _supersede(self, path: str) -> None:
        old = self.disk.get(path)
        if old is not None and old.data is not None:
            self.cluster.superseded.add(old.data)
            self.cluster.dead.add((path, old.data, old.mode))

    def _mkdirs(self, path: str, mode: int = DIR_MODE) -> bool:
        """Create the folders above ``path``; False if a file is in the way."""
        folder = parent(path)
        chain = []
        while folder is not None:
            chain.append(folder)
            folder = parent(folder)
        for f in reversed(chain):
            at = self.disk.get(f)
            if at is None:
                self.disk[f] = Node(None, mode)
            elif not at.is_dir:
                return False
        return True

    def user_write(self, path: str, mode: int) -> None:
        at = self.disk.get(path)
        if (at is not None and at.is_dir) or not self._mkdirs(path):
            return
        data = self.cluster.new_content(self.name)
        self._supersede(path)
        self.disk[path] = Node(data, mode)
        self.cluster.dead.discard((path, data, mode))

    def user_chmod(self, path: str, mode: int) -> None:
        old = self.disk.get(path)
        if old is not None and old.data is not None and old.mode != mode:
            self._supersede(path)
            self.cluster.superseded.discard(old.data)  # the bytes live on
            self.disk[path] = Node(old.data, mode)
            self.cluster.dead.discard((path, old.data, mode))

    def user_delete(self, path: str) -> None:
        at = self.disk.get(path)
        if at is not None and not at.is_dir:
            self._supersede(path)
            del self.disk[path]

    def user_mkdir(self, path: str) -> None:
        if path not in self.disk and self._mkdirs(path):
            self.disk[path] = Node(None, DIR_MODE)

    def user_rmdir(self, path: str) -> None:
        at = self.disk.get(path)
        if at is not None and at.is_dir and not self._children(path):
            del self.disk[path]

    def user_rmtree(self, path: str) -> None:
        at = self.disk.get(path)
        if at is None or not at.is_dir:
            return
        for p in [*self._children(path), path]:
            self._supersede(p)
            del self.disk[p]

    def _children(self, folder: str) -> list[str]:
        return [p for p in self.disk if p.startswith(folder + "/")]

    # agent actions ----------------------------------------------------------
    def scan(self, path: str) -> bool:
        """Observe ``path`` as the data plane does."""
        if not self.up:
            return False
        queue = [path]
        if path not in self.disk:  # a folder gone: what we knew inside it first
            queue = [*deepest_first(self.store.paths_under(path)), path]
        moved = False
        for p in queue:
            f = self.disk.get(p)
            self._cache(p, f)
            fx = self.replica.local(p, None if f is None else f.observed(), self.now)
            self.apply(fx)
            moved |= bool(fx)
        return moved

    def _cache(self, path: str, f: Node | None) -> None:
        """What ``Scanner.observe`` (and ``placed``) record in the stat cache."""
        if f is not None and f.data is not None:
            self.cache[path] = (f.seen().identity, f.observed().hash)
        else:
            self.cache.pop(path, None)

    def reconcile(self) -> None:
        """The start-up reconcile (``mesh.adapters.fs.reconcile``): scan only what one
        ``stat`` does not show unchanged since it was indexed, then what is gone."""
        changed = []
        for path, f in sorted(self.disk.items()):
            disk = self.store.state(path).disk
            known = None if disk is None else Known(
                disk.winner.kind, disk.winner.hash, disk.winner.mode, self.cache.get(path))
            if not unchanged(f.seen(), known):
                changed.append(path)
        gone = [p for p, st in self.store.all_states().items()
                if p not in self.disk and st.disk is not None and st.disk.content is not None]
        self.rescanned = [*changed, *deepest_first(gone)]
        for path in self.rescanned:
            self.scan(path)

    def scan_all(self) -> bool:
        paths = set(self.disk) | set(self.store.all_states())
        return any([self.scan(p) for p in deepest_first(paths)])

    def flush(self) -> bool:
        if not self.up or (not self.outbox and not self.out_conflicts):
            return False
        self.seq += 1
        # As ``Exchange.flush``: what each path's disk holds now (an announcement passed
        # on late names an older version).
        entries = tuple(h for path, v in self.outbox.items()
                        for h in (self.store.state(path).disk or v).heads)
        m = Manifest(self.name, 1, self.seq, entries, tuple(self.out_conflicts))
        payload = manifest.encode(m)
        for peer in self.peers:
            self.cluster.network.append(ManifestMsg(self.name, peer, payload))
        self.outbox.clear()
        self.out_conflicts.clear()
        return True

    def announce_all(self) -> None:
        """After a restart: what a resync with each peer tells them."""
        for path, st in self.store.all_states().items():
            if st.disk is not None:
                self.outbox[path] = st.disk
        self.out_conflicts += [(c.winner, c.loser) for c in self.store.conflict_map().values()]

    def grant(self, dst: str, paths: list[str]) -> PushMsg | None:
        """The gate: scan what lsyncd asked about, then allow what may go."""
        if not self.up:
            return None
        for p in paths:
            self.scan(p)
        allowed = [p for p in paths if self.replica.may_push(dst, p)]
        if not allowed:
            return None
        versions = {}
        for p in allowed:
            disk = self.store.state(p).disk
            assert disk is not None
            versions[p] = disk
        related = tuple((c.winner, c.loser) for c in self.store.conflict_map().values()
                        if c.path in versions)
        push_id = f"{self.name}-{next(self.cluster.ids)}"
        return PushMsg(self.name, dst, push_id, versions, related)

    def lsyncd_batch(self, dst: str, paths: list[str]) -> PushMsg | None:
        """lsyncd's batch for ``dst`` through the gate, as the agent's ``Pushes.carry``
        takes it (issue 12): the planner leaves out what our pusher carries, the paths
        are scanned, our own writes go; the push's end is told to the planner."""
        if not self.up:
            return None
        now = self.now_s
        asked = self.plan.unclaimed(dst, paths, now, current=self.cluster.nodes[dst].up)
        for p in asked:
            self.scan(p)
        allowed = self.plan.grantable(dst, asked, now, asked=len(paths))
        if not allowed:
            return None
        push = self.plan.start(dst, allowed, now, own=False)
        versions = dict(push.versions)
        related = tuple((c.winner, c.loser) for c in self.store.conflict_map().values()
                        if c.path in versions)
        push_id = f"{self.name}-{next(self.cluster.ids)}"
        return PushMsg(self.name, dst, push_id, versions, related, push, self.plan)

    def begin(self, msg: PushMsg) -> None:
        """The push's header arrives: its versions are learned, rsync starts."""
        self.staging[msg.push_id] = {}
        entries = [h for v in msg.versions.values() for h in v.heads]
        self.apply(self.replica.remote(msg.src, entries, msg.conflicts, self.now))
        self.cluster.transfers.append(Transfer(msg, sorted(msg.versions), {}))

    def rsync_step(self, t: Transfer, path: str) -> None:
        """rsync stages ``path`` as the sender's disk holds it now (or nothing)."""
        sent = self.cluster.nodes[t.msg.src].disk.get(path)
        t.phase[path] = "done"
        if self.cluster.old_rsync and t.msg.versions[path].content is None:
            # Before issue 11: rsync --delete --force with /p/*** in the live folder
            # removed a deleted folder with everything in it, into the backup dir.
            for p in [*self._children(path), path]:
                gone = self.disk.pop(p, None)
                if gone is not None and gone.data is not None:
                    self.store.keep[gone.observed().content] = gone.data
            return
        if sent is None or sent.is_dir:
            return  # a delete, a folder, or vanished on the sender: nothing to stage
        self.staging[t.msg.push_id][path] = sent

    def end(self, push_id: str, announced: list[str]) -> None:
        """The push ended (or, after a restart, is found cut short): keep what it staged
        that a path converges to, then ask again for what each path converges to. A
        file a path adopts is left staged; ``adopt_one`` moves them, a step each."""
        kept = []
        adopting: dict[str, tuple[Node, Version]] = {}
        for path, node in self.staging.pop(push_id).items():
            st = self.store.state(path)
            goal = st.target or st.disk
            found = StagedFile(path, node.observed().content)
            if goal is not None and staged({path: goal}, found) is Staged.KEEP:
                assert node.data is not None
                version = adoptable(st, node.observed()) if self.cluster.adopt else None
                if version is not None:  # left where it is: ``Staging.sort``
                    adopting[path] = (node, version)
                    continue
                self.store.keep[found.content] = node.data
                kept.append(path)
        with self._holding_for(push_id) as held:
            for path in to_reaim(announced, kept):
                if path not in adopting:
                    self.apply(self.replica.reaim(path))
        if adopting:
            self.staging[push_id] = {p: node for p, (node, _) in adopting.items()}
            self.adopting[push_id] = {p: version for p, (_, version) in adopting.items()}
        else:
            self._release(push_id, held)

    def adopt_one(self, push_id: str) -> bool:
        """One file of a push's end adopted (``end``); whether any is left."""
        left = self.adopting.get(push_id, {})
        if not left:
            self.adopting.pop(push_id, None)
            self.staging.pop(push_id, None)
            self._release(push_id, self.held.get(push_id, []))
            return False
        path = min(left)
        version = left.pop(path)
        with self._holding_for(push_id):
            self._adopt(path, self.staging[push_id].pop(path), version)
        return True

    @contextlib.contextmanager
    def _holding_for(self, push_id: str) -> Iterator[list[Effect]]:
        """While a step of the push's end runs: its announcements and conflicts are held
        (``apply``), to be passed on once the whole end is done (``_release``)."""
        self._holding = self.held.setdefault(push_id, [])
        try:
            yield self._holding
        finally:
            self._holding = None

    def _release(self, push_id: str, held: list[Effect]) -> None:
        """A push's end is done: what it told the replica goes on, late."""
        self.held.pop(push_id, None)
        self.apply(held)

    def _adopt(self, path: str, node: Node, version: Version) -> None:
        """As ``Staging.adopt``: the staged file moved to ``path`` if its path still
        converges to it and holds nothing (the rename replaces nothing, and needs its
        folder); if not, kept, and its path's target asked for again (a restore)."""
        folder = parent(path)
        up = None if folder is None else self.disk.get(folder)
        if (adoptable(self.store.state(path), node.observed()) != version
                or path in self.disk or (folder is not None and (up is None or not up.is_dir))):
            assert node.data is not None
            self.store.keep[node.observed().content] = node.data
            self.apply(self.replica.reaim(path))
            return
        self.disk[path] = node
        self._cache(path, node)  # Scanner.remember
        self.apply(self.replica.restored(path, version))

    def crash(self) -> None:
        self.up = False
        self.plan = self._planner()
        self.sweeps.clear()
        self.outbox.clear()
        self.out_conflicts.clear()
        self.adopting.clear()  # their files stay staged: the restart's end sorts them again
        self.held.clear()  # never passed on: the restart announces what its disk holds

    def purge(self, path: str) -> None:
        """``Index.purge`` at a start (``mesh.engine.bounds``): the version we hold of
        ``path`` was a peer's, and the bounds now refuse it; it is forgotten, with that
        peer's announced vector, and in its place is a delete of ours under what the
        other peers announced (``admit.stand_in``)."""
        st = self.store.state(path)
        if self.up or st.disk is None or st.target is not None:
            return
        poisoner = st.disk.winner.writer
        if poisoner == self.name:
            return
        # What our disk holds there is scanned again as a write of ours: the purge's
        # contract (the forgotten version no longer says it was seen and replaced).
        at = self.disk.get(path)
        if at is not None and at.data is not None:
            self.cluster.dead.discard((path, at.data, at.mode))
        self.store.forget(path, [poisoner])
        stand_in = admit.stand_in(path, self.name, [
            v for p in self.peers if (v := self.store.peer_vector(p, path)) is not None])
        if stand_in is not None:
            self.store.set_state(path, PathState(stand_in, None))
        self.cache.pop(path, None)

    def collect(self, known: list[str] | None = None) -> list[ContentKey]:
        """The collector (issue 14) at its most eager: every object nothing needs goes
        (no retention, nothing waits for peers), and every tombstone every ``known`` peer
        (default: all) acknowledged, once this node has applied all its peers sent (the
        agent's inbox applies a peer's manifests in order). Returns what was removed."""
        if not self.up:
            return []
        states = self.store.all_states()
        need = retention.needed([st.target for st in states.values() if st.target],
                                self.store.unwritten_losers())
        gone = [k for k in self.store.keep if k[1] not in need]
        for k in gone:
            del self.store.keep[k]
        if any(m.dst == self.name for m in self.cluster.network) or any(
                t.msg.dst == self.name for t in self.cluster.transfers):
            return gone
        for path, st in sorted(states.items()):
            peers = [self.store.peer_vector(p, path) for p in (
                self.peers if known is None else known)]
            if retention.tombstone_due(st.disk, st.target, peers, self.now, TOMBSTONE_AGE_MS):
                assert st.disk is not None
                self.replica.horizon = max(self.replica.horizon, retention.horizon_of(st.disk))
                self.store.forget(path, self.peers)
        return gone

    def restart(self) -> None:
        """Keep what cut-short pushes staged, reconcile the disk, resync with every peer."""
        self.up = True
        for push_id in sorted(self.staging):
            self.end(push_id, [])
            for _ in range(len(self.adopting.get(push_id, ()))):
                self.adopt_one(push_id)
            self.adopt_one(push_id)  # none left: the staging dir goes
        self.reconcile()
        for path, st in list(self.store.all_states().items()):
            if st.target is not None:
                self.apply(self.replica.reaim(path))
        self.announce_all()
        for peer in self.peers:  # as after each resync (Pushes.sweep): a page at a time
            self.sweeps[peer] = ("", self.now_s)
        self._page()

    def apply(self, fx: list[Effect]) -> None:
        for effect in fx:
            if self._holding is not None and isinstance(effect, (Announce, Logged)):
                self._holding.append(effect)
            elif isinstance(effect, Announce):
                self.outbox[effect.version.path] = effect.version
                self.plan.changed(effect.version.path, self.now_s)
            elif isinstance(effect, Logged):
                c = effect.conflict
                self.out_conflicts.append((c.winner, c.loser))
            elif isinstance(effect, WriteCopy):
                self._write_copy(effect)
            elif isinstance(effect, Restore):
                self._restore(effect.version)
            else:
                assert isinstance(effect, Want)

    def _content_of(self, source: Entry) -> bytes | None:
        at = self.disk.get(source.path)
        if at is not None and at.observed().content == source.content:
            return at.data
        assert source.content is not None
        return self.store.keep.get(source.content)

    def _write_copy(self, effect: WriteCopy) -> None:
        data = self._content_of(effect.source)
        if data is not None and effect.path not in self.disk and self._mkdirs(effect.path):
            self.disk[effect.path] = Node(data, effect.source.mode)
            self.cluster.dead.discard((effect.path, data, effect.source.mode))
            self.scan(effect.path)

    def _restore(self, version: Version) -> None:
        """As ``DataPlane._restore``: scan first (so what it replaces is an indexed
        version), replace, and tell the replica the version is on disk from now on."""
        path = version.path
        self.scan(path)
        if self.store.state(path).target != version:
            return
        at = self.disk.get(path)
        w = version.winner
        if version.content is None:
            if at is not None and at.is_dir and self._children(path):
                self.scan(path)  # a folder still holding entries: the replica decides
                return
        elif w.kind is Kind.DIR:
            if (at is not None and at.is_dir and self._children(path)) or not self._mkdirs(path):
                return
        else:
            data = self.store.keep.get(version.content)
            if (data is None or (at is not None and at.is_dir and self._children(path))
                    or not self._mkdirs(path)):
                return
        if at is not None and at.data is not None:
            self.store.keep[at.observed().content] = at.data
        self.disk.pop(path, None)
        if version.content is not None:
            self.disk[path] = Node(None if w.kind is Kind.DIR else self.store.keep[
                version.content], w.mode)
            self._cache(path, self.disk[path])  # Scanner.placed
        self.apply(self.replica.restored(path, version))


class Cluster:
    def __init__(
        self, n: int, skews: list[int], store: Callable[[], SimStore] = MemoryStore
    ) -> None:
        names = [f"n{i + 1}" for i in range(n)]
        self.time_ms = 0
        self.network: list[ManifestMsg | PushMsg] = []
        self.transfers: list[Transfer] = []
        self.written: list[bytes] = []
        self.superseded: set[bytes] = set()
        self.dead: set[tuple[str, bytes, int]] = set()  # what a user replaced, having seen it
        self.old_rsync = False  # rsync deleting in the live folder, as before issue 11
        self.adopt = True  # a push's end adopts what lands on nothing (Staging.adopt)
        self.ids = itertools.count(1)
        self.nodes = {
            name: SimNode(
                name, [p for p in names if p != name], skews[i % len(skews)], self, store()
            )
            for i, name in enumerate(names)
        }

    def new_content(self, node: str) -> bytes:
        data = f"{node}#{len(self.written)}".encode()
        self.written.append(data)
        return data

    def deliver(self, index: int) -> None:
        msg = self.network.pop(index % len(self.network))
        dst = self.nodes[msg.dst]
        if not dst.up:
            if isinstance(msg, PushMsg):
                self.nodes[msg.src].push_done(msg, 255)  # the tunnel refused it
            return  # lost; a resync after the restart tells it again
        if isinstance(msg, ManifestMsg):
            m = manifest.decode(msg.payload)
            dst.apply(dst.replica.remote(m.origin, m.entries, m.conflicts, dst.now))
            dst.plan.heard(m.origin, m.entries)  # as the exchange's ``on_heard``
        elif self.nodes[msg.src].up and not any(t.msg == msg for t in self.transfers):
            if self._unannounced(msg):
                return
            dst.begin(msg)  # else the sender died before rsync started, or a duplicate

    def _unannounced(self, msg: PushMsg) -> bool:
        """The receiver's admission (``mesh.engine.admission``): a header must say no
        more than its sender announced on the manifest stream. It waits while the
        sender's announcements are on their way: the sender's flusher publishes what is
        pending meanwhile, and the push goes back on the network behind the manifests
        in flight to this receiver; with none in flight, it is refused."""
        entries = [h for v in msg.versions.values() for h in v.heads]
        dst, src = self.nodes[msg.dst], self.nodes[msg.src]
        if not admit.unannounced(entries, msg.conflicts,
                                 lambda path: dst.store.peer_vector(msg.src, path)):
            return False
        src.flush()
        if any(isinstance(m, ManifestMsg) and m.src == msg.src and m.dst == msg.dst
               for m in self.network):
            self.network.append(msg)
        else:
            src.push_done(msg, 255)  # the tunnel refused it
        return True

    def push(self, src: str, dst: str, paths: list[str] | None = None) -> None:
        sender = self.nodes[src]
        asked = sorted(sender.store.all_states()) if paths is None else paths
        msg = sender.grant(dst, asked)
        if msg is not None:
            self.network.append(msg)

    def lsyncd(self, src: str, dst: str, paths: list[str] | None = None) -> None:
        sender = self.nodes[src]
        asked = sorted(sender.disk) if paths is None else paths
        msg = sender.lsyncd_batch(dst, asked)
        if msg is not None:
            self.network.append(msg)

    def step(self, index: int) -> None:
        """rsync moves on one transfer; one that is done (or lost its sender) ends."""
        t = self.transfers[index % len(self.transfers)]
        dst = self.nodes[t.msg.dst]
        if not dst.up or t.msg.push_id not in dst.staging:
            self.transfers.remove(t)  # the receiver died: its staging dir is kept at restart
            if not t.ended:
                self.nodes[t.msg.src].push_done(t.msg, 255)
            return
        if t.ended:  # the end's adoptions, one a step (others' steps come between)
            if not dst.adopt_one(t.msg.push_id):
                self.transfers.remove(t)
            return
        path = t.next_path()
        if path is None or not self.nodes[t.msg.src].up:
            t.ended = True  # the tunnel lets the sender go before the end is done
            dst.end(t.msg.push_id, sorted(t.msg.versions))
            self.nodes[t.msg.src].push_done(t.msg, 0 if path is None else 1)
            if t.msg.push_id not in dst.staging:
                self.transfers.remove(t)
            return
        dst.rsync_step(t, path)

    def land_all(self, limit: int = 10_000) -> None:
        """Deliver everything under way and run every push to its end."""
        for _ in range(limit):
            if not self.network and not self.transfers:
                return
            if self.network:
                self.deliver(0)
            if self.transfers:
                self.step(0)

    def crash(self, name: str) -> None:
        self.nodes[name].crash()

    def restart(self, name: str) -> None:
        node = self.nodes[name]
        if node.up:
            return
        node.restart()
        for other in self.nodes.values():
            if other is not node and other.up:
                other.announce_all()

    def quiesce(self, max_rounds: int = 80) -> int:
        """Let everything settle: restart, scan, announce, deliver, push until nothing moves."""
        for name, node in self.nodes.items():
            if not node.up:
                self.restart(name)
        for rounds in range(1, max_rounds + 1):
            moved = bool(self.transfers)
            for _ in range(10_000):
                if not self.transfers:
                    break
                self.step(0)
            moved |= any([n.scan_all() for n in self.nodes.values()])
            moved |= any([n.flush() for n in self.nodes.values()])
            for _ in range(10_000):
                if not self.network:
                    break
                self.deliver(0)
                moved = True
            for src in self.nodes.values():
                for dst in src.peers:
                    self.push(src.name, dst)
                    moved |= bool(self.network)
                    self.land_all()
            if not moved:
                return rounds
        raise AssertionError(f"no quiescence after {max_rounds} rounds")

    # invariants ---------------------------------------------------------------
    def trees(self) -> dict[str, dict[str, tuple[bytes | None, int]]]:
        return {
            name: {p: (f.data, f.mode) for p, f in sorted(n.disk.items())}
            for name, n in self.nodes.items()
        }

    def indexes(self) -> dict[str, dict[str, tuple[object, ...]]]:
        out = {}
        for name, n in self.nodes.items():
            out[name] = {
                p: (st.disk.heads, st.disk.content, st.target)
                for p, st in sorted(n.store.all_states().items())
                if st.disk is not None
            }
        return out

    def conflict_logs(self) -> dict[str, set[tuple[str, object, object]]]:
        return {
            name: {
                (c.id, c.winner.content, c.loser.content)
                for c in n.store.conflict_map().values()
            }
            for name, n in self.nodes.items()
        }

    def lost_writes(self) -> list[bytes]:
        present = {f.data for n in self.nodes.values() for f in n.disk.values()}
        return [d for d in self.written if d not in self.superseded and d not in present]

    def resurrected(self) -> list[tuple[str, bytes, int]]:
        """Content a user replaced or deleted, having seen it, back at its path."""
        return sorted({(p, f.data, f.mode) for n in self.nodes.values()
                       for p, f in n.disk.items()
                       if f.data is not None and (p, f.data, f.mode) in self.dead})
