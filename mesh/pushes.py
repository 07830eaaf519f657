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
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from mesh.core import manifest
from mesh.core.landing import Outcome
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

OWN_GRACE = 0.0  # our own writes go at once; lsyncd's gate is the second path
FORWARD_GRACE = 5.0
CONFIRM_S = 30.0  # after a push, how long to wait for the peer's announcement before again
PATHS_PER_PUSH = 2000  # keeps the announcement under the manifest's size limits
RETRY_S = (1.0, 30.0)
TICK = 0.25


@dataclass
class _PeerQueue:
    dirty: dict[str, float] = field(default_factory=dict)  # path -> when it became pushable
    # Pushed (by us or by lsyncd's gate) and not yet announced back by the peer:
    # path -> (the version pushed, when to look again).
    awaiting: dict[str, tuple[Version, float]] = field(default_factory=dict)
    inflight: dict[str, int] = field(default_factory=dict)  # path -> pushes carrying it now
    retry_at: float = 0.0
    failures: int = 0
    pushes: int = 0
    pushed_paths: int = 0
    task: asyncio.Task[None] | None = None


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
        self._wake = asyncio.Event()
        # Applies every inotify event up to now; the node's uses its watcher so that what
        # was scanned since is not scanned again. Without one: scan the paths asked about.
        self.catch_up: Callable[[list[str]], Awaitable[None]] = data.scan
        # Whether what we know of a peer's versions is current (the node's: everything
        # it had published when its link came up is applied). Until then nothing goes
        # to it: a push would race the writes it made while we were apart.
        self.current: Callable[[str], bool] = lambda peer: True
        self._granted: dict[str, dict[str, Version | None]] = {}  # lsyncd's, by push id
        self.denied = 0
        self.allowed = 0
        self.received = 0
        self.sent = 0  # pushes by our own pusher (lsyncd's are the gate's ``allowed``)
        self.sent_paths = 0
        self.send_failures = 0

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

    def _busy(self, queue: _PeerQueue, path: str, now: float) -> bool:
        """Whether ``path`` is on its way to the peer already: a push carries it now, or
        one delivered our current version and the peer has not announced it back yet."""
        if path in queue.inflight:
            return True
        pushed = queue.awaiting.get(path)
        if pushed is None:
            return False
        if now < pushed[1] and pushed[0] == self.index.state(path).disk:
            return True
        del queue.awaiting[path]
        return False

    def _take(self, peer: str, paths: list[str]) -> dict[str, Version | None]:
        """Mark ``paths`` as on their way to ``peer``; the versions they go at."""
        queue = self.queues.setdefault(peer, _PeerQueue())
        for path in paths:
            queue.inflight[path] = queue.inflight.get(path, 0) + 1
        return {path: self.index.state(path).disk for path in paths}

    def _release(self, peer: str, taken: dict[str, Version | None], *, delivered: bool,
                 ) -> None:
        queue = self.queues.setdefault(peer, _PeerQueue())
        until = time.monotonic() + CONFIRM_S
        for path, version in taken.items():
            left = queue.inflight.get(path, 0) - 1
            if left > 0:
                queue.inflight[path] = left
            else:
                queue.inflight.pop(path, None)
            if delivered and version is not None:
                queue.awaiting[path] = (version, until)
                if self.index.state(path).disk == version:
                    queue.dirty.pop(path, None)  # else a newer write still has to go
        self._wake.set()

    async def authorize(self, target: str, paths: list[str]) -> PushGrant:
        """The gate's question for lsyncd: which of ``paths`` may go to ``target`` now.
        Paths the agent's own pusher is carrying (or has carried and awaits the peer's
        announcement of) are left out: a healthy mesh moves each version once per peer."""
        asked = len(paths)
        if not self.current(target):
            paths = []  # lsyncd's batch is done; our pusher sends what is still due
        queue = self.queues.setdefault(target, _PeerQueue())
        now = time.monotonic()
        # What our pusher carries (or carried, and the peer has yet to announce) is not
        # scanned here: a newer write reaches the pusher through the watcher anyway.
        paths = [p for p in paths if p and not self._busy(queue, p, now)]
        await self.catch_up(paths)
        allowed = [p for p in paths
                   if self._may(target, p, forward=False) and not self._busy(queue, p, now)]
        self.allowed += len(allowed)
        self.denied += asked - len(allowed)
        grant = self._grant(target, allowed[:PATHS_PER_PUSH]) if allowed else None
        if grant is None:
            where = self.endpoint(target) or ("127.0.0.1", 1)
            return PushGrant(target, where[0], where[1], f"{self.me}-none", [], b"")
        self._granted[grant.push_id] = self._take(target, grant.allowed)
        return grant

    def finished(self, grant: PushGrant) -> None:
        """lsyncd's gate is done with ``grant`` (its connection closed). Its rsync status
        is not known here: treat the paths as delivered and look again after
        ``CONFIRM_S`` if the peer has not announced them by then."""
        taken = self._granted.pop(grant.push_id, None)
        if taken is not None:
            self._release(grant.peer, taken, delivered=True)

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
        await self.data.receiving(push_id, peer, versions, header)
        try:
            with self.index.batch():
                effects = self.replica.remote(peer, m.entries, m.conflicts, _ms())
            await self.data.apply(effects)
        except BaseException:
            await self.data.refused(push_id)  # the tunnel refuses it: no end() follows
            raise
        self.received += 1
        return _Ticket(peer, push_id, paths)

    async def end(self, ticket: object, returncode: int) -> None:
        assert isinstance(ticket, _Ticket)
        if returncode:
            LOG.warning("push %s from %s ended with rsync status %d", ticket.push_id,
                        ticket.peer, returncode)
        await self.data.push_ended(ticket.push_id,
                                   Outcome.COMPLETE if returncode == 0 else Outcome.FAILED)

    # --- the agent's own pusher ------------------------------------------------------

    def changed(self, version: Version) -> None:
        """Our disk holds a new version of this path: every peer may need it."""
        now = time.monotonic()
        for queue in self.queues.values():
            queue.dirty.setdefault(version.path, now)
        self._wake.set()

    def sweep(self, peer: str) -> None:
        """After a resync with ``peer``: queue every path it is behind on."""
        queue = self.queues.setdefault(peer, _PeerQueue())
        now = time.monotonic()
        for path in self.index.paths():
            if self.replica.may_push(peer, path):
                queue.dirty.setdefault(path, now)
        if queue.dirty:
            LOG.info("%s is behind on %d paths", peer, len(queue.dirty))
        self._wake.set()

    def pending(self, peer: str) -> int:
        """Paths queued for ``peer`` or on their way to it."""
        queue = self.queues.get(peer)
        return 0 if queue is None else len(queue.dirty.keys() | queue.inflight.keys())

    async def run(self) -> None:
        """One drain task per peer at a time, peers in parallel; woken by every change,
        and every ``TICK`` for grace periods, retries and unconfirmed pushes."""
        try:
            while True:
                self._wake.clear()
                for peer, queue in self.queues.items():
                    if ((queue.task is None or queue.task.done()) and self.endpoint(peer)
                            and self.current(peer)):
                        queue.task = asyncio.create_task(self._drain(peer),
                                                         name=f"push-{peer}")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TICK):
                        await self._wake.wait()
        finally:
            tasks = [q.task for q in self.queues.values() if q.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _recheck(self, queue: _PeerQueue, now: float) -> None:
        """Pushed paths the peer never announced back go round again."""
        for path, (_, until) in list(queue.awaiting.items()):
            if now >= until:
                del queue.awaiting[path]
                queue.dirty.setdefault(path, now)

    async def _drain(self, peer: str) -> None:
        queue = self.queues[peer]
        for _ in range(1000):  # bounded; each round pushes or returns
            now = time.monotonic()
            self._recheck(queue, now)
            if not queue.dirty or now < queue.retry_at:
                return
            ready = self._ready(peer, queue, now)
            if not ready:
                return
            grant = self._grant(peer, ready)
            if grant is None:
                return
            taken = self._take(peer, ready)
            code = -1
            try:
                code = await push(grant, self.data_dir, self.creds, inline=True)
            except (MeshError, OSError) as err:
                LOG.warning("push to %s: %s", peer, err)
            finally:
                self._release(peer, taken, delivered=code == 0)
            if code != 0:
                self.send_failures += 1
                queue.failures += 1
                queue.retry_at = now + min(RETRY_S[1], RETRY_S[0] * 2 ** (queue.failures - 1))
                return
            queue.failures = 0
            queue.pushes += 1
            queue.pushed_paths += len(ready)
            self.sent += 1
            self.sent_paths += len(ready)

    def _ready(self, peer: str, queue: _PeerQueue, now: float) -> list[str]:
        ready: list[str] = []
        for path, since in list(queue.dirty.items()):
            if path in queue.inflight:
                continue  # lsyncd's gate carries it; confirmed or retried afterwards
            if not self.replica.may_push(peer, path):
                del queue.dirty[path]  # the peer has it (or something newer)
                queue.awaiting.pop(path, None)
                continue
            if self._busy(queue, path, now):
                del queue.dirty[path]  # delivered; ``_recheck`` brings it back if need be
                continue
            own = self._may(peer, path, forward=False)
            if now - since >= (OWN_GRACE if own else FORWARD_GRACE):
                ready.append(path)
            if len(ready) >= PATHS_PER_PUSH:
                break
        return ready

    def add_peer(self, peer: str) -> None:
        self.queues.setdefault(peer, _PeerQueue())


def _ms() -> int:
    return time.time_ns() // 1_000_000

