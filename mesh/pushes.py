"""Who pushes what, and what a push announces (DESIGN.md, data plane): the I/O shell.

What goes to which peer and when is planned in mesh/core/pushplan.py, with the
time passed in from here; this module carries it out.

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
from dataclasses import dataclass
from pathlib import Path

from mesh import gate
from mesh.core import manifest
from mesh.core.manifest import Manifest
from mesh.core.pushplan import Push, PushPlanner, ReplicaView
from mesh.core.pushstate import PeerStage
from mesh.core.replica import group
from mesh.core.resolver import Version
from mesh.dataplane import DataPlane
from mesh.errors import MeshError
from mesh.exchange import Exchange
from mesh.gate import PushGrant
from mesh.store.index import Index
from mesh.tls import NodeCredentials

LOG = logging.getLogger("mesh.push")

TICK = 0.25  # how often the pusher looks at links coming up and timed plans


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
        # What goes where and when; it counts the gate's answers (``allowed``, ``denied``)
        # and our own pushes (``sent``...); lsyncd's pushes are counted where they land.
        self.plan = PushPlanner(me, ReplicaView(self.replica))
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        # Applies every inotify event up to now; the node's uses its watcher so that what
        # was scanned since is not scanned again. Without one: scan the paths asked about.
        self.catch_up: Callable[[list[str]], Awaitable[None]] = data.scan
        # Whether what we know of a peer's versions is current (the node's: everything
        # it had published when its link came up is applied). Until then nothing goes
        # to it: a push would race the writes it made while we were apart.
        self.current: Callable[[str], bool] = lambda peer: True
        self._granted: dict[str, Push] = {}  # lsyncd's, by push id
        self._sending: set[asyncio.Task[None]] = set()
        self.received = 0

    # --- what may go where --------------------------------------------------------

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
        """The gate's question for lsyncd: which of ``paths`` may go to ``target`` now.
        Paths the agent's own pusher is carrying (or has carried and awaits the peer's
        announcement of) are left out: a healthy mesh moves each version once per peer.
        While our view of ``target`` is not current, none: lsyncd's batch is done, and
        our pusher sends what is still due."""
        asked = len(paths)
        now = time.monotonic()
        # What our pusher carries (or carried, and the peer has yet to announce) is not
        # scanned here: a newer write reaches the pusher through the watcher anyway.
        paths = self.plan.unclaimed(target, paths, now, current=self.current(target))
        await self.catch_up(paths)
        allowed = self.plan.grantable(target, paths, now, asked=asked)
        grant = self._grant(target, allowed) if allowed else None
        if grant is None:
            where = self.endpoint(target) or ("127.0.0.1", 1)
            return PushGrant(target, where[0], where[1], f"{self.me}-none", [], b"")
        self._granted[grant.push_id] = self.plan.start(target, grant.allowed, now, own=False)
        return grant

    def finished(self, grant: PushGrant) -> None:
        """lsyncd's gate is done with ``grant`` (its connection closed). Its rsync status
        is not known here: treat the paths as delivered and look again after
        ``CONFIRM_S`` if the peer has not announced them by then."""
        taken = self._granted.pop(grant.push_id, None)
        if taken is not None:
            self.plan.end(taken, time.monotonic(), None)
            self._wake.set()

    # --- receiving ------------------------------------------------------------------

    async def begin(self, peer: str, push_id: str, header: bytes) -> object:
        m = manifest.decode_push(header, peer, push_id)
        paths = sorted(group(m.entries))
        with self.index.batch():  # learned like any announcement (mesh.core.landing)
            effects = self.replica.remote(peer, m.entries, m.conflicts, _ms())
        await self.data.apply(effects)
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
        self.plan.changed(version.path, time.monotonic())
        self._wake.set()

    def sweep(self, peer: str) -> None:
        """After a resync with ``peer``: queue every path it is behind on."""
        behind = self.plan.behind(peer, self.index.paths(), time.monotonic())
        if behind:
            LOG.info("%s is behind on %d paths", peer, behind)
        self._wake.set()

    def add_peer(self, peer: str) -> None:
        self.plan.add_peer(peer)

    def peers(self) -> list[str]:
        return self.plan.peers()

    def pending(self, peer: str) -> int:
        """Paths queued for ``peer`` or on their way to it."""
        return self.plan.pending(peer)

    async def run(self) -> None:
        """Start what the plan says is due: one push of ours per peer at a time, peers in
        parallel; woken by every change and every push's end, and every ``TICK`` for
        links coming up, grace periods, retries and unconfirmed pushes."""
        try:
            while True:
                self._wake.clear()
                up = [peer for peer in self.plan.peers()
                      if self.plan.peer_stage(peer) is not PeerStage.PUSHING
                      and self.endpoint(peer) and self.current(peer)]
                for planned in self.plan.tick(time.monotonic(), up).pushes:
                    self._start(planned)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TICK):
                        await self._wake.wait()
        finally:
            tasks = list(self._sending)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, planned: Push) -> None:
        grant = self._grant(planned.peer, planned.paths)
        if grant is None:  # its link went down since
            self.plan.abandon(planned)
            return
        task = asyncio.create_task(self._send(planned, grant), name=f"push-{planned.peer}")
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, planned: Push, grant: PushGrant) -> None:
        code = -1
        try:
            code = await gate.push(grant, self.data_dir, self.creds, inline=True)
        except (MeshError, OSError) as err:
            LOG.warning("push to %s: %s", planned.peer, err)
        except BaseException:
            self.plan.abandon(planned)
            raise
        self.plan.end(planned, time.monotonic(), code)
        self._wake.set()


def _ms() -> int:
    return time.time_ns() // 1_000_000
