"""The node's messaging engine: what goes between the replica and the MQTT mesh.

Outbound, it batches the replica's announcements into manifests (numbered by
the ``Outbox``) on this node's own broker, publishes a head every second and a
retained hello. Inbound, it runs one ``Inbox`` per peer: manifests are applied
in order, gaps are repaired by a replay from the peer's log, and when that log
no longer reaches back (or the peer restarted) by a *resync*: compare index
digests, fetch the entries of the buckets that differ, then the conflict
records this node lacks (the requests: ``mesh.engine.requests``). It also answers
the same requests from peers (``mesh.engine.answers``).

Transport is behind two callables so the engine can be tested with real
brokers or without any: ``publish`` puts a payload on one of this node's own
topics; ``request`` puts one on our request topic at a peer's broker.

What a certified peer can send is bounded (issue 13): every batch of versions
passes ``mesh.core.admit.screen`` before the replica sees it (no counter that
could overflow, no clock stamp far ahead of ours), and a reply counts only if it
answers a request of ours to that very peer: request ids are random, and the
reply must come from the peer asked (its broker's response topic to us).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

from mesh import __version__
from mesh.clock import now_ms
from mesh.core import admit, manifest, wire
from mesh.core.batcher import Batcher
from mesh.core.delivery import Inbox, Need, Outbox
from mesh.core.digest import in_requests
from mesh.core.effects import Announce, Effect, Logged
from mesh.core.manifest import MAX_CONFLICTS, Entry, Manifest
from mesh.core.replica import Replica
from mesh.core.resolver import Conflict, Version
from mesh.core.topics import Topics
from mesh.engine.answers import answer, conflict_digest, tree_entries
from mesh.engine.peerview import PeerView
from mesh.engine.requests import Requests
from mesh.errors import MeshError, RemoteProtocolError
from mesh.store import bulk
from mesh.store.index import Index

LOG = logging.getLogger("mesh.engine.exchange")

Publish = Callable[[str, bytes, int, bool], Awaitable[None]]
Request = Callable[[str, bytes], Awaitable[None]]
EffectSink = Callable[[list[Effect]], Awaitable[None]]

ENTRIES_PER_MANIFEST = 4096
ENTRIES_PER_REQUEST = 20_000  # a catch-up's entries asked for at once (``in_requests``)


@dataclass
class Exchange:
    node: str
    cluster: str
    replica: Replica
    index: Index
    epoch: int
    publish: Publish
    request: Request
    on_effects: EffectSink
    tunnel_port: int = 0
    # Manifest batching (issue 3: p99 latency <= 20 ms at 500 changes/s, and batches
    # large enough for >= 20,000 paths/s). No quiet delay: what the replica announces
    # comes in batches already (a scan of what the watcher gathered, a manifest
    # applied), so a lull's first change goes out on the next turn of the loop; a
    # steady stream goes out once per ``spacing``, whatever piled up meanwhile, so
    # the manifests per second stay bounded (amqtt's cost is per message) while a
    # burst fills manifests up to ENTRIES_PER_MANIFEST.
    quiet: float = 0.0
    cap: float = 0.05
    spacing: float = 0.005
    head_interval: float = 1.0
    hello_every: int = 10
    """Heads between two hellos. The hello is published again and again (retained, so
    a peer that subscribes later has it anyway): a publish that our own client took is
    not yet on our broker, and a hello lost when that link was cut (a start-up scan held
    the loop, issue 16) left a peer without our tunnel port, its pushes to us queued
    for good."""
    on_manifest: Callable[[str, Manifest], None] | None = None
    """Test hook: called for every manifest applied, in application order."""
    on_announce: Callable[[Version], None] | None = None
    """Called for every new disk version this node announces."""
    on_heard: Callable[[str, list[Entry]], None] | None = None
    """Called with a peer's admitted entries (what its disk holds), once applied."""
    on_synced: Callable[[str], None] | None = None
    """Called after each completed resync with a peer."""
    on_hello: Callable[[str], None] | None = None
    """Called when a peer's hello arrives (it says which tunnel port the peer listens on)."""
    limits: admit.Limits = field(default_factory=admit.Limits)
    """What a peer's versions must keep to (issue 13)."""

    peers: dict[str, PeerView] = field(default_factory=dict, init=False)
    outbox: Outbox = field(init=False)
    topics: Topics = field(init=False)
    _pending: dict[str, Version] = field(default_factory=dict, init=False)
    _pending_conflicts: dict[str, Conflict] = field(default_factory=dict, init=False)
    _batcher: Batcher = field(init=False)
    _wake: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    requests: Requests = field(init=False)
    _applied: set[asyncio.Event] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        self.outbox = Outbox(self.node, self.epoch)
        self.topics = Topics(self.cluster, self.node)
        self.requests = Requests(self.request)
        self._batcher = Batcher(quiet=self.quiet, cap=self.cap, max_paths=ENTRIES_PER_MANIFEST,
                                spacing=self.spacing)

    # --- outbound ------------------------------------------------------------------

    def announce(self, version: Version) -> None:
        self._pending[version.path] = version
        self._batcher.add(version.path, time.monotonic())
        self._wake.set()

    def announce_conflict(self, conflict: Conflict) -> None:
        self._pending_conflicts[conflict.id] = conflict
        self._batcher.add(f"\x00conflict:{conflict.id}", time.monotonic())
        self._wake.set()

    async def handle_effects(self, effects: list[Effect]) -> None:
        """Route the replica's effects: announcements here, file work to the data plane."""
        rest: list[Effect] = []
        for fx in effects:
            if isinstance(fx, Announce):
                self.announce(fx.version)
                if self.on_announce is not None:
                    self.on_announce(fx.version)
            elif isinstance(fx, Logged):
                LOG.info("conflict %s on %s: %s beats %s (%s)%s", fx.conflict.id,
                         fx.conflict.path, fx.conflict.winner.writer, fx.conflict.loser.writer,
                         fx.conflict.rule.value,
                         f", loser kept at {fx.conflict.copy_path}" if fx.conflict.copy_path
                         else "")
                self.announce_conflict(fx.conflict)
            else:
                rest.append(fx)
        if rest:
            await self.on_effects(rest)

    @property
    def backlog(self) -> int:
        return len(self._pending) + len(self._pending_conflicts)

    async def run_flusher(self) -> None:
        """Publish pending announcements as manifests, batched (quiet delay + cap)."""
        while True:
            deadline = self._batcher.deadline()
            if deadline is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            delay = deadline - time.monotonic()
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                continue
            self._batcher.flush(time.monotonic())
            await self.flush()

    async def flush(self) -> None:
        """Publish everything pending now. A path's entry is what its disk holds at this
        moment, not the version its announcement named: a push's end passes on what it
        recorded once all of it is done, and a write or delete recorded meanwhile must
        not be replaced by that older version among what is still to be published.
        Unannounced, it stayed unknown to every peer, which then refused each push of
        it as holding what we never announced."""
        while self._pending or self._pending_conflicts:
            entries: list[Entry] = []
            with self.index.batch():  # each path's disk version, read in bulk
                self.index.prefetch(itertools.islice(reversed(self._pending),
                                                     ENTRIES_PER_MANIFEST))
                while self._pending and len(entries) < ENTRIES_PER_MANIFEST:
                    path, version = self._pending.popitem()
                    entries.extend((self.index.state(path).disk or version).heads)
            pairs: list[tuple[Entry, Entry]] = []
            while self._pending_conflicts and len(pairs) < MAX_CONFLICTS // 2:
                _, c = self._pending_conflicts.popitem()
                pairs.append((c.winner, c.loser))
            payload = self.outbox.next(tuple(entries), tuple(pairs))
            try:
                await self.publish(self.topics.manifest, payload, 1, False)
            except MeshError as err:
                # Our own broker's link is down (it reconnects). Raising would stop the
                # agent; the manifest is numbered and in the replay log, so a peer finds
                # the gap (the next manifest, or heads that stall) and asks for it.
                LOG.warning("manifest %d not published: %s; peers will ask for a replay",
                            self.outbox.seq, err)

    async def run_heads(self) -> None:
        """A retained hello every ``hello_every`` heads (each interval until one is
        published), and a head every interval."""
        since_hello: int | None = None  # heads since a hello was published
        while True:
            if since_hello is None or since_hello >= self.hello_every:
                hello = wire.Hello(self.node, self.epoch, __version__, self.tunnel_port, now_ms())
                with contextlib.suppress(MeshError):  # own link down: next interval
                    await self.publish(self.topics.hello, wire.encode(hello), 1, True)
                    since_hello = 0
            if since_hello is not None:
                since_hello += 1
            head = wire.Head(self.node, self.epoch, self.outbox.seq, now_ms())
            with contextlib.suppress(MeshError):
                await self.publish(self.topics.head, wire.encode(head), 0, False)
            await asyncio.sleep(self.head_interval)

    # --- inbound: from a peer's broker --------------------------------------------

    def view(self, peer: str) -> PeerView:
        if peer not in self.peers:
            self.peers[peer] = PeerView(Inbox(peer))
        return self.peers[peer]

    async def on_peer_message(self, peer: str, topic: str, payload: bytes) -> None:
        """A message from ``peer``'s broker (its origin topics or our responses)."""
        peer_topics = Topics(self.cluster, peer)
        try:
            message = wire.decode(payload)
        except RemoteProtocolError as err:
            LOG.warning("refused message from %s on %s: %s", peer, topic, err.reason)
            sound = manifest.envelope(payload)
            if sound is not None and sound[0] == peer and topic in (
                    peer_topics.manifest, peer_topics.resp(self.node)):
                await self._offer(peer, Manifest(*sound))  # its seq, with nothing in it
            return
        if isinstance(message, Manifest):
            if message.origin != peer or topic not in (peer_topics.manifest,
                                                      peer_topics.resp(self.node)):
                LOG.warning("refused manifest from %s on %s: origin %s", peer, topic,
                            message.origin)
                return
            await self._offer(peer, message)
        elif isinstance(message, wire.Head):
            await self._on_head(peer, message)
        elif isinstance(message, wire.Hello):
            if message.origin == peer:
                self.view(peer).hello = message
                if self.on_hello is not None:
                    self.on_hello(peer)
        elif topic == peer_topics.resp(self.node):
            self.requests.on_reply(peer, message)
        else:
            LOG.warning("refused %s from %s on %s", type(message).__name__, peer, topic)

    async def wait_applied(self, within: float) -> bool:
        """Until the next batch of some peer's versions is applied here; False if none
        was within ``within`` seconds."""
        event = asyncio.Event()
        self._applied.add(event)
        try:
            async with asyncio.timeout(within):
                await event.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._applied.discard(event)

    async def _on_head(self, peer: str, head: wire.Head) -> None:
        if head.origin != peer:
            return
        view = self.view(peer)
        view.last_head = time.monotonic()
        view.head = (time.time(), head.epoch, head.seq)
        await self._repair(peer, view.inbox.head(head.epoch, head.seq, time.monotonic()))

    async def _offer(self, peer: str, m: Manifest) -> None:
        view = self.view(peer)
        ready, need = view.inbox.offer(m, time.monotonic())
        for r in ready:
            await self._apply(peer, r.entries, r.conflicts)
            view.applied_manifests += 1
            if self.on_manifest is not None:
                self.on_manifest(peer, r)
        await self._repair(peer, need)

    async def _apply(self, peer: str, entries: Iterable[Entry],
                     conflicts: Iterable[tuple[Entry, Entry]] = ()) -> None:
        screened = admit.screen(entries, conflicts, now_ms(), self.limits)
        if screened.refused:
            LOG.warning("refused from %s: %s", peer, admit.summary(screened.refused))
        listed, pairs = list(screened.entries), list(screened.conflicts)
        try:
            with self.index.batch():
                self.index.prefetch([e.path for e in listed] + [w.path for w, _ in pairs], peer)
                effects = self.replica.remote(peer, listed, pairs, now_ms())
                self.index.set_meta("clock", self.replica.clock)
                if self.on_heard is not None:  # in the batch: the gate's reads are cached
                    self.on_heard(peer, listed)
        except RemoteProtocolError as err:
            LOG.warning("refused manifest from %s: %s", peer, err.reason)
            return
        for event in self._applied:
            event.set()
        await self.handle_effects(effects)

    async def _repair(self, peer: str, need: Need) -> None:
        view = self.view(peer)
        if need is Need.REPLAY:
            from_seq = view.inbox.applied + 1
            assert view.inbox.epoch is not None
            rid, queue = self.requests.open(peer)
            LOG.info("asking %s to replay from seq %d", peer, from_seq)
            with contextlib.suppress(MeshError):
                await self.request(peer, wire.encode(
                    wire.ReplayRequest(rid, view.inbox.epoch, from_seq)))
            # A "gone" answer arrives as a response to this rid.
            self.requests.expect_gone(peer, rid, queue, partial(self._replay_gone, peer))
        elif need is Need.RESYNC and (view.resync is None or view.resync.done()):
            view.resync = asyncio.create_task(self._resync(peer), name=f"resync-{peer}")

    async def _replay_gone(self, peer: str) -> None:
        await self._repair(peer, self.view(peer).inbox.replay_gone(time.monotonic()))

    def caught_up(self, peer: str, since: float) -> bool:
        """Whether we hold all that ``peer`` had published when its link came up at
        ``since`` (``PeerView.caught_up``)."""
        view = self.peers.get(peer)
        return view is not None and view.caught_up(since)

    # --- resync -------------------------------------------------------------------

    async def _resync(self, peer: str) -> None:
        view = self.view(peer)
        view.resyncs += 1
        started = view.resync_started = time.monotonic()
        try:
            reply = await self.requests.ask_one(peer, wire.DigestRequest)
            if not isinstance(reply, wire.DigestReply):
                raise RemoteProtocolError("digest request answered with something else", peer=peer)
            ours = await bulk.digest(self.index, peer)
            buckets = reply.digest.differing(ours)
            fetched = 0
            for group in in_requests(buckets, reply.digest.count, ENTRIES_PER_REQUEST):
                ask = partial(wire.EntriesRequest, buckets=tuple(group))
                async for chunk in self.requests.ask_chunks(peer, ask):
                    assert isinstance(chunk, wire.EntriesReply)
                    await self._apply(peer, chunk.entries)
                    fetched += len(chunk.entries)
            pulled = await self._sync_conflicts(peer, reply)
            ready = view.inbox.resynced(reply.epoch, reply.seq)
            for r in ready:
                await self._apply(peer, r.entries, r.conflicts)
            view.caught_ups += 1
            LOG.info("caught up with %s: %d buckets differed, %d entries and %d conflicts "
                     "fetched in %.2f s", peer, len(buckets), fetched, pulled,
                     time.monotonic() - started)
            if self.on_synced is not None:
                self.on_synced(peer)
        except MeshError as err:
            LOG.warning("catch-up with %s failed: %s; will retry", peer, err)

    async def _sync_conflicts(self, peer: str, reply: wire.DigestReply) -> int:
        mine = self.index.conflict_ids()
        if conflict_digest(mine) == reply.conflicts and len(mine) == reply.conflict_count:
            return 0
        theirs: list[str] = []
        async for chunk in self.requests.ask_chunks(peer, wire.ConflictIdsRequest):
            assert isinstance(chunk, wire.ConflictIdsReply)
            theirs.extend(chunk.ids)
        missing = sorted(set(theirs) - set(mine))
        for i in range(0, len(missing), MAX_CONFLICTS):
            part = tuple(missing[i:i + MAX_CONFLICTS])
            ask = partial(wire.ConflictsRequest, ids=part)
            async for chunk in self.requests.ask_chunks(peer, ask):
                assert isinstance(chunk, wire.ConflictsReply)
                await self._apply(peer, (), chunk.pairs)
        return len(missing)

    # --- serving peers' requests (on our own broker) ------------------------------

    async def on_request(self, peer: str, payload: bytes) -> None:
        try:
            message = wire.decode(payload)
        except RemoteProtocolError as err:
            LOG.warning("refused request from %s: %s", peer, err.reason)
            return
        respond = self.topics.resp(peer)
        replies: Iterable[bytes]
        if isinstance(message, wire.DigestRequest):
            # The seq is taken first: the digest may hold more than it, never less, and
            # what is after it is replayed anyway.
            seq, ids = self.outbox.seq, self.index.conflict_ids()
            digest = await bulk.digest(self.index)
            replies = [wire.encode(wire.DigestReply(message.rid, self.epoch, seq, digest,
                                                    conflict_digest(ids), len(ids)))]
        else:
            replies = answer(peer, message, self.index, self.outbox, self.epoch)
        for reply in replies:
            await self.publish(respond, reply, 1, False)

    # --- mesh verify (issue 5): per-folder tree sums, see mesh.core.tree -----------------

    def tree_entries(self) -> list[Entry]:
        """What this node holds: one resolved entry per live disk version."""
        return tree_entries(self.index)
