"""A simulated cluster of sans-IO replicas over a fake, unreliable network.

Each node has a data folder (a dict), a keep area, and a ``Replica`` over an
in-memory store. Manifests travel encoded with the real codec. Pushes model
lsyncd + rsync through the gate: the gate is asked at the sender, and the bytes
land at the receiver later (the decision may be stale by then), replacing what
is there and moving it to the keep area, as rsync --backup does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from mesh.core import manifest
from mesh.core.manifest import ContentKey, Entry, Kind, Manifest
from mesh.core.replica import (
    Announce,
    Effect,
    Logged,
    Observed,
    PathState,
    Replica,
    Restore,
    Want,
    WriteCopy,
)
from mesh.core.resolver import Conflict, Version
from mesh.core.vclock import VersionVector

BASE_MS = 1_780_000_000_000


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
        return content in self.keep


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class FileOnDisk:
    data: bytes
    mode: int

    def observed(self) -> Observed:
        return Observed(Kind.FILE, digest(self.data), len(self.data), 0, self.mode)


@dataclass(frozen=True)
class ManifestMsg:
    src: str
    dst: str
    payload: bytes


@dataclass(frozen=True)
class PushMsg:
    src: str
    dst: str
    version: Version
    conflicts: tuple[tuple[Entry, Entry], ...]
    data: FileOnDisk | None


class SimStore(Protocol):
    keep: dict[ContentKey, bytes]

    def state(self, path: str) -> PathState: ...
    def set_state(self, path: str, state: PathState) -> None: ...
    def peer_vector(self, peer: str, path: str) -> VersionVector | None: ...
    def set_peer_vector(self, peer: str, path: str, vector: VersionVector) -> None: ...
    def log_conflict(self, conflict: Conflict) -> bool: ...
    def kept(self, content: ContentKey) -> bool: ...
    def conflict_map(self) -> dict[str, Conflict]: ...
    def all_states(self) -> dict[str, PathState]: ...


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
        self.disk: dict[str, FileOnDisk] = {}
        self.outbox: dict[str, Version] = {}
        self.out_conflicts: list[tuple[Entry, Entry]] = []
        self.seq = 0

    @property
    def now(self) -> int:
        return BASE_MS + self.cluster.time_ms + self.skew_ms

    # user actions -----------------------------------------------------------
    def user_write(self, path: str, mode: int) -> None:
        data = self.cluster.new_content(self.name)
        old = self.disk.get(path)
        if old is not None:
            self.cluster.superseded.add(old.data)
        self.disk[path] = FileOnDisk(data, mode)

    def user_chmod(self, path: str, mode: int) -> None:
        old = self.disk.get(path)
        if old is not None:
            self.disk[path] = FileOnDisk(old.data, mode)

    def user_delete(self, path: str) -> None:
        old = self.disk.pop(path, None)
        if old is not None:
            self.cluster.superseded.add(old.data)

    # agent actions ----------------------------------------------------------
    def scan(self, path: str) -> bool:
        f = self.disk.get(path)
        fx = self.replica.local(path, None if f is None else f.observed(), self.now)
        self.apply(fx)
        return bool(fx)

    def scan_all(self) -> bool:
        paths = set(self.disk) | set(self.store.all_states())
        return any([self.scan(p) for p in sorted(paths)])

    def flush(self) -> bool:
        if not self.outbox and not self.out_conflicts:
            return False
        self.seq += 1
        entries = tuple(h for v in self.outbox.values() for h in v.heads)
        m = Manifest(self.name, 1, self.seq, entries, tuple(self.out_conflicts))
        payload = manifest.encode(m)
        for peer in self.peers:
            self.cluster.network.append(ManifestMsg(self.name, peer, payload))
        self.outbox.clear()
        self.out_conflicts.clear()
        return True

    def try_push(self, dst: str, path: str) -> PushMsg | None:
        if not self.replica.may_push(dst, path):
            return None
        version = self.store.state(path).disk
        assert version is not None
        related = tuple(
            (c.winner, c.loser) for c in self.store.conflict_map().values() if c.path == path
        )
        data = self.disk.get(path) if version.content is not None else None
        if version.content is not None and (
            data is None or data.observed().content != version.content
        ):
            return None  # the disk moved on since the last scan: rsync would send other bytes
        return PushMsg(self.name, dst, version, related, data)

    def receive(self, msg: ManifestMsg | PushMsg) -> None:
        if isinstance(msg, ManifestMsg):
            m = manifest.decode(msg.payload)
            self.apply(self.replica.remote(m.origin, m.entries, m.conflicts, self.now))
            return
        self.apply(self.replica.expect_push(msg.src, msg.version.heads, msg.conflicts, self.now))
        path = msg.version.path
        self.apply(self._replace(path, msg.data))

    def _replace(self, path: str, data: FileOnDisk | None) -> list[Effect]:
        """Write (or delete) a path the way rsync --backup does: keep what it replaces."""
        old = self.disk.get(path)
        if old is not None:
            self.store.keep[old.observed().content] = old.data
        if data is None:
            self.disk.pop(path, None)
        else:
            self.disk[path] = data
        return self.replica.displaced(path, None if old is None else old.observed(), self.now)

    def apply(self, fx: list[Effect]) -> None:
        for effect in fx:
            if isinstance(effect, Announce):
                self.outbox[effect.version.path] = effect.version
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
        if data is not None and effect.path not in self.disk:
            self.disk[effect.path] = FileOnDisk(data, effect.source.mode)

    def _restore(self, version: Version) -> None:
        # Scan first, so that what the restore replaces is an indexed version
        # (an unscanned edit is recorded, and may change the target).
        self.scan(version.path)
        if self.store.state(version.path).target != version:
            return
        if version.content is None:
            self.apply(self._replace(version.path, None))
            self.scan(version.path)
            return
        data = self.store.keep.get(version.content)
        if data is not None:
            self.apply(self._replace(version.path, FileOnDisk(data, version.winner.mode)))
            self.scan(version.path)  # as the agent does (DataPlane._restore)


class Cluster:
    def __init__(
        self, n: int, skews: list[int], store: Callable[[], SimStore] = MemoryStore
    ) -> None:
        names = [f"n{i + 1}" for i in range(n)]
        self.time_ms = 0
        self.network: list[ManifestMsg | PushMsg] = []
        self.written: list[bytes] = []
        self.superseded: set[bytes] = set()
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
        self.nodes[msg.dst].receive(msg)

    def push(self, src: str, dst: str, path: str) -> None:
        msg = self.nodes[src].try_push(dst, path)
        if msg is not None:
            self.network.append(msg)

    def quiesce(self, max_rounds: int = 60) -> int:
        """Let everything settle: scan, announce, deliver, push until nothing moves."""
        for rounds in range(1, max_rounds + 1):
            moved = any([n.scan_all() for n in self.nodes.values()])
            moved |= any([n.flush() for n in self.nodes.values()])
            while self.network:
                self.deliver(0)
                moved = True
            for src in self.nodes.values():
                for path in sorted(src.store.all_states()):
                    for dst in src.peers:
                        msg = src.try_push(dst, path)
                        if msg is not None:
                            self.nodes[dst].receive(msg)
                            moved = True
            if not moved:
                return rounds
        raise AssertionError(f"no quiescence after {max_rounds} rounds")

    # invariants ---------------------------------------------------------------
    def trees(self) -> dict[str, dict[str, tuple[bytes, int]]]:
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
