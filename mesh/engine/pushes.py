"""Who pushes what, and what a push announces (docs/DESIGN.md, "Data plane"): the I/O
shell around mesh/core/pushplan.py, which plans with the time passed in from here.

* ``carry`` is lsyncd's way out (``mesh.adapters.lsyncd.gate`` calls it for each of
  lsyncd's batches): a path goes to a peer only if our disk version strictly dominates
  what that peer announced, and only if this node wrote it (a healthy mesh moves each
  version once per peer). Before deciding it applies every inotify event up to that
  moment, so a push always names an indexed version. The push runs here, in
  ``execute``, and returns when rsync is done.
* ``run`` is the agent's own pusher, for what lsyncd never sees: catch-up of a peer
  that was away (after each resync with it), restores, retries of failed pushes, own
  writes lsyncd did not carry (it was stopped), and *forwarding*: a version written
  elsewhere goes from us to a peer only when that peer is still behind after
  ``FORWARD_GRACE`` (its writer is down or cut off), so a partition still heals.
* Both go through ``execute``: one code path from a planned push to rsync's exit
  status, which the planner is always told and counts.
* ``begin``/``end`` are the sink for incoming pushes behind the tunnel's admission
  (``mesh.engine.admission``, which decodes and checks the header): the sender's
  announcement (a manifest with seq 0: the versions and their conflicts) is
  registered as push intents before rsync runs; afterwards, what the push
  displaced is filed into the keep area and handed to the replica.
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

from mesh.adapters.rsync import push as rsync_push
from mesh.adapters.rsync.push import PushOrder
from mesh.clock import now_ms
from mesh.core import manifest
from mesh.core.manifest import Manifest
from mesh.core.pushplan import OWN_GRACE, PATHS_PER_PUSH, PushPlanner
from mesh.core.pushstate import PeerStage, Push, ReplicaView
from mesh.core.replica import group
from mesh.core.resolver import Version
from mesh.engine.dataplane import DataPlane
from mesh.errors import MeshError
from mesh.pki.tls import NodeCredentials
from mesh.store import bulk
from mesh.store.index import Index

LOG = logging.getLogger("mesh.push")

TICK = 0.25  # how often the pusher looks at links coming up and timed plans
# A catch-up sweeps the index page by page (``mesh.store.bulk.behind``) while fewer than
# SWEEP_AHEAD paths are queued for the peer: what is in memory for a catch-up is about
# two pushes' worth of paths, however large the tree (issue 16), and a page is one query.
SWEEP_PAGE = 4096  # index rows per page
SWEEP_AHEAD = 2 * PATHS_PER_PUSH
SWEEP_PAGES_PER_TURN = 4  # then the loop runs other tasks before the next pages


@dataclass
class _Sweep:
    """A catch-up of one peer under way: where in the index it is."""

    since: float  # when the resync asked for it: its paths are due since then
    after: str = ""  # the last path looked at
    found: int = 0  # paths it queued


@dataclass(frozen=True)
class _Ticket:
    peer: str
    push_id: str
    paths: list[str]


class Pushes:
    def __init__(self, *, me: str, epoch: int, index: Index, data: DataPlane,
                 creds: NodeCredentials, data_dir: Path,
                 endpoint: Callable[[str], tuple[str, int] | None],
                 catch_up: Callable[[list[str]], Awaitable[None]] | None = None,
                 current: Callable[[str], bool] = lambda peer: True,
                 unasked: Callable[[str], bool] = lambda path: False,
                 own_grace: float = OWN_GRACE) -> None:
        self.me = me
        self.epoch = epoch
        self.index = index
        self.data = data
        self.replica = data.replica
        self.creds = creds
        self.data_dir = data_dir
        self.endpoint = endpoint  # peer -> (host, tunnel port) while its link is up
        # Applies every inotify event up to now (the node's uses its watcher, so that
        # what was scanned since is not scanned again); without one: scan the paths.
        self.catch_up = catch_up or data.scan
        # Whether what we know of a peer's versions is current (the node's: everything
        # it had published when its link came up is applied). Until then nothing goes
        # to it: a push would race the writes it made while we were apart.
        self.current = current
        # Whether lsyncd may drop the event of a write of ours at a path (the node's: the
        # path was noted as the agent's own change moments ago, ``AgentWrites.noted``).
        self.unasked = unasked
        # What goes where and when; it counts lsyncd's batches and our own pushes.
        self.plan = PushPlanner(me, ReplicaView(self.replica), own_grace=own_grace)
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._sending: set[asyncio.Task[int]] = set()
        self._sweeps: dict[str, _Sweep] = {}
        self.received = 0

    # --- one path from a planned push to rsync's exit status -----------------------

    def _order(self, peer: str, paths: list[str]) -> PushOrder | None:
        """The push of ``paths`` to ``peer`` at their indexed versions; None while its
        link is down."""
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
        return PushOrder(peer, where[0], where[1], push_id, tuple(sorted(chosen)), header)

    async def execute(self, push: Push, order: PushOrder) -> int:
        """Run ``push`` (started in the planner) as ``order``; tell the planner how it
        ended. Returns rsync's exit status (-1: rsync did not run)."""
        code = -1
        try:
            code = await rsync_push.push(order, self.data_dir, self.creds)
        except (MeshError, OSError) as err:
            LOG.warning("push to %s: %s", push.peer, err)
        except BaseException:
            self.plan.abandon(push)
            self._wake.set()
            raise
        with self.index.batch():  # the planner reads each path's disk version: in bulk
            self.index.prefetch(p for p, _ in push.versions)
            self.plan.end(push, time.monotonic(), code)
        self._wake.set()
        return code

    # --- lsyncd's batches ---------------------------------------------------------

    async def carry(self, peer: str, paths: list[str]) -> None:
        """lsyncd's batch for ``peer``: push those of ``paths`` that may go now, and
        return when that push is over. Paths our own pusher carries (or has carried and
        awaits the peer's announcement of) are left out; while our view of ``peer`` is
        not current, all are: our pusher sends what is still due once it is."""
        asked = len(paths)
        now = time.monotonic()
        # What our pusher carries is not scanned here: a newer write reaches the pusher
        # through the watcher anyway.
        paths = self.plan.unclaimed(peer, paths, now, current=self.current(peer))
        await self.catch_up(paths)
        with self.index.batch():  # each path's state and the peer's vector: read in bulk
            self.index.prefetch(paths, peer)  # (issue 12: a peer's push in is asked about)
            allowed = self.plan.grantable(peer, paths, now, asked=asked)
        # A burst or a mass delete is one batch of lsyncd's: pushes of PATHS_PER_PUSH paths
        # (the announcement's bound), one after the other, each narrowed to what may
        # still go once the one before it has run. (lsyncd paces its batches: the
        # config's `pace`.)
        for start in range(0, len(allowed), PATHS_PER_PUSH):
            chunk = allowed[start:start + PATHS_PER_PUSH]
            now = time.monotonic()
            if start:
                chunk = self.plan.narrow(peer, chunk, now)
            order = self._order(peer, chunk) if chunk else None
            if order is None:
                continue
            push = self.plan.start(peer, list(order.paths), now, own=False)
            await self.execute(push, order)

    # --- receiving ------------------------------------------------------------------

    async def begin(self, peer: str, push_id: str, m: Manifest) -> object:
        """A push's header (``mesh.engine.admission`` decoded and admitted it)."""
        paths = sorted(group(m.entries))
        with self.index.batch():  # learned like any announcement (mesh.core.landing)
            self.index.prefetch(paths, peer)
            effects = self.replica.remote(peer, m.entries, m.conflicts, now_ms())
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
        now = time.monotonic()
        self.plan.changed(version.path, now)
        if version.winner.writer == self.me and self.unasked(version.path):
            self.plan.unasked(version.path, now)
        self._wake.set()

    def sweep(self, peer: str) -> None:
        """After a resync with ``peer``: queue every path it is behind on, a page of the
        index at a time as the pushes take them (``_page``); a sweep under way starts
        over."""
        self._sweeps[peer] = _Sweep(time.monotonic())
        self._page()
        if self.plan.pending(peer) and self.endpoint(peer) is None:
            # Nothing goes until its hello names its tunnel port: said, not left silent
            # (issue 16: a "behind" report with no push after it).
            LOG.warning("%s is behind, its catch-up queued: no push until its hello names "
                        "its tunnel port", peer)
        self._wake.set()

    def _page(self) -> bool:
        """Queue the next pages of the sweeps under way, for peers with few paths
        queued; whether one has more to look at now."""
        more = False
        for peer, sweep in list(self._sweeps.items()):
            for _ in range(SWEEP_PAGES_PER_TURN):
                if self.plan.pending(peer) >= SWEEP_AHEAD:
                    break
                paths, after = bulk.behind(self.index, peer, sweep.after, SWEEP_PAGE)
                sweep.found += len(paths)
                self.plan.behind(peer, paths, sweep.since, checked=True)
                if after is None:
                    del self._sweeps[peer]
                    if sweep.found:
                        LOG.info("%s is behind on %d paths", peer, sweep.found)
                    break
                sweep.after = after
            else:
                more = more or self.plan.pending(peer) < SWEEP_AHEAD
        return more

    def add_peer(self, peer: str) -> None:
        self.plan.add_peer(peer)

    def peers(self) -> list[str]:
        return self.plan.peers()

    def pending(self, peer: str) -> int:
        """Paths queued for ``peer`` or on their way to it; a sweep not finished counts
        as one more (what it will still find is not known before)."""
        return self.plan.pending(peer) + (peer in self._sweeps)

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
                # One transaction, the states of what each peer's tick looks at first read
                # in bulk: the planner and the orders ask for each path's state several
                # times (issue 16: a query and a decode each was a quarter of a catch-up's
                # sender).
                now = time.monotonic()
                with self.index.batch():
                    for peer in up:
                        self.index.prefetch(self.plan.looked_at(peer, now, PATHS_PER_PUSH),
                                            peer)
                    for planned in self.plan.tick(now, up).pushes:
                        self._start(planned)
                if self._page():  # a sweep looks further at once, other tasks first
                    await asyncio.sleep(0)
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TICK):
                        await self._wake.wait()
        finally:
            tasks = list(self._sending)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, planned: Push) -> None:
        order = self._order(planned.peer, planned.paths)
        if order is None:  # its link went down since
            self.plan.abandon(planned)
            return
        task = asyncio.create_task(self.execute(planned, order), name=f"push-{planned.peer}")
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
