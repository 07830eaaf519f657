"""Who pushes what, and what a push announces (DESIGN.md, data plane).

* ``authorize`` is the gate's policy (lsyncd asks it for every batch): a path
  goes to a peer only if our disk version strictly dominates what that peer
  announced, and — so that a healthy mesh moves each version once per peer —
  only if this node wrote it. Before answering, it scans the paths asked
  about, so every inotify event up to that moment is applied.
* ``begin``/``end`` are the tunnel's sink for incoming pushes: the sender's
  announcement (a manifest with seq 0: the versions and their conflicts) is
  registered as push intents before rsync runs; afterwards, what the push
  displaced is filed into the keep area and handed to the replica.
* ``run`` is the agent's own pusher, for what lsyncd never sees: catch-up of a
  peer that was away (after each resync with it), conflict copies, restores,
  and *forwarding* — a version written elsewhere goes from us to a peer only
  when that peer is still behind after ``FORWARD_GRACE`` (its writer is down
  or cut off), so a partition still heals.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mesh.core import manifest
from mesh.core.manifest import Manifest
from mesh.core.replica import group
from mesh.core.resolver import Version
from mesh.dataplane import DataPlane
from mesh.errors import MeshError, RemoteProtocolError
from mesh.exchange import Exchange
from mesh.gate import PushGrant, push
from mesh.store.index import Index
from mesh.tls import NodeCredentials

LOG = logging.getLogger("mesh.push")

OWN_GRACE = 1.0  # lsyncd (delay 0.2 s) pushes our own writes first; we are the fallback
FORWARD_GRACE = 5.0
PATHS_PER_PUSH = 2000  # keeps the announcement under the manifest's size limits
RETRY_S = (1.0, 30.0)
TICK = 0.25


@dataclass
class _PeerQueue:
    dirty: dict[str, float] = field(default_factory=dict)  # path -> when it became pushable
    retry_at: float = 0.0
    failures: int = 0
    pushes: int = 0
    pushed_paths: int = 0


@dataclass(frozen=True)
class _Ticket:
    peer: str
    push_id: str
    paths: list[str]


class Pushes:
    def __init__(self, *, me: str, epoch: int, index: Index, data: DataPlane,
                 exchange: Exchange, creds: NodeCredentials, data_dir: Path,
                 endpoint: Callable[[str], tuple[str, int] | None]) -> None:
        self.me = me
        self.epoch = epoch
        self.index = index
        self.data = data
        self.replica = data.replica
        self.exchange = exchange
        self.creds = creds
        self.data_dir = data_dir
        self.endpoint = endpoint  # peer -> (host, tunnel port) while its link is up
        self.queues: dict[str, _PeerQueue] = {}
        self._ids = itertools.count(1)
        self.denied = 0
        self.allowed = 0
        self.received = 0

    # --- what may go where --------------------------------------------------------

    def _may(self, peer: str, path: str, *, forward: bool) -> bool:
        if not self.replica.may_push(peer, path):
            return False
        disk = self.index.state(path).disk
        return forward or (disk is not None and disk.winner.writer == self.me)

    def _grant(self, peer: str, paths: list[str]) -> PushGrant | None:
        where = self.endpoint(peer)
        if where is None:
            return None
        versions = list(self.index.versions_in(paths))
        entries = tuple(h for v in versions for h in v.heads)
        chosen = {v.path for v in versions}
        conflicts = tuple((c.conflict.winner, c.conflict.loser)
                          for c in self.index.conflicts_on(chosen))
        header = manifest.encode(Manifest(self.me, self.epoch, 0, entries,
                                          conflicts[:manifest.MAX_CONFLICTS]))
        push_id = f"{self.me}-{self.epoch}-{next(self._ids)}"
        return PushGrant(peer, where[0], where[1], push_id, sorted(chosen), header)

    async def authorize(self, target: str, paths: list[str]) -> PushGrant:
        """The gate's question for lsyncd: which of ``paths`` may go to ``target`` now."""
        await self.data.scan([p for p in paths if p])
        allowed = [p for p in paths if self._may(target, p, forward=False)]
        self.allowed += len(allowed)
        self.denied += len(paths) - len(allowed)
        grant = self._grant(target, allowed[:PATHS_PER_PUSH]) if allowed else None
        if grant is None:
            where = self.endpoint(target) or ("127.0.0.1", 1)
            return PushGrant(target, where[0], where[1], f"{self.me}-none", [], b"")
        return grant

    # --- receiving ------------------------------------------------------------------

    async def begin(self, peer: str, push_id: str, header: bytes) -> object:
        try:
            m = manifest.decode(header)
        except RemoteProtocolError as err:
            raise RemoteProtocolError(f"push {push_id}: {err.reason}", peer=peer) from None
        if m.origin != peer:
            raise RemoteProtocolError(f"push {push_id} announced by {m.origin}", peer=peer)
        versions = group(m.entries)
        paths = sorted(versions)
        self.data.receiving(push_id, versions)
        try:
            with self.index.batch():
                effects = self.replica.expect_push(peer, m.entries, m.conflicts, _ms())
            await self.data.apply(effects)
        except BaseException:
            self.data.refused(push_id, paths)  # the tunnel refuses it: no end() follows
            raise
        self.received += 1
        return _Ticket(peer, push_id, paths)

    async def end(self, ticket: object, returncode: int) -> None:
        assert isinstance(ticket, _Ticket)
        if returncode:
            LOG.warning("push %s from %s ended with rsync status %d", ticket.push_id,
                        ticket.peer, returncode)
        await self.data.push_ended(ticket.push_id, ticket.paths)

    # --- the agent's own pusher ------------------------------------------------------

    def changed(self, version: Version) -> None:
        """Our disk holds a new version of this path: every peer may need it."""
        now = time.monotonic()
        for queue in self.queues.values():
            queue.dirty.setdefault(version.path, now)

    def sweep(self, peer: str) -> None:
        """After a resync with ``peer``: queue every path it is behind on."""
        queue = self.queues.setdefault(peer, _PeerQueue())
        now = time.monotonic()
        for path in self.index.paths():
            if self.replica.may_push(peer, path):
                queue.dirty.setdefault(path, now)
        if queue.dirty:
            LOG.info("%s is behind on %d paths", peer, len(queue.dirty))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            for peer in list(self.queues):
                if self.endpoint(peer) is not None:
                    await self._drain(peer)

    async def _drain(self, peer: str) -> None:
        queue = self.queues[peer]
        now = time.monotonic()
        if not queue.dirty or now < queue.retry_at:
            return
        ready: list[str] = []
        for path, since in list(queue.dirty.items()):
            if not self.replica.may_push(peer, path):
                del queue.dirty[path]  # the peer has it (or something newer)
                continue
            own = self._may(peer, path, forward=False)
            if now - since >= (OWN_GRACE if own else FORWARD_GRACE):
                ready.append(path)
            if len(ready) >= PATHS_PER_PUSH:
                break
        if not ready:
            return
        grant = self._grant(peer, ready)
        if grant is None:
            return
        try:
            code = await push(grant, self.data_dir, self.creds)
        except (MeshError, OSError) as err:
            LOG.warning("push to %s: %s", peer, err)
            code = -1
        if code == 0:
            queue.failures = 0
            queue.pushes += 1
            queue.pushed_paths += len(ready)
            for path in ready:
                queue.dirty.pop(path, None)
        else:
            queue.failures += 1
            queue.retry_at = now + min(RETRY_S[1], RETRY_S[0] * 2 ** (queue.failures - 1))

    def add_peer(self, peer: str) -> None:
        self.queues.setdefault(peer, _PeerQueue())


def _ms() -> int:
    return time.time_ns() // 1_000_000

