"""One meshsync node: every part wired together under a TaskGroup.

    broker ◄── own client ◄── exchange ──► peer links (one per peer address)
                                 ▲ │
            watcher ─► data plane ┘ └─► replica + index (SQLite)

``run_agent`` is the process entry: logging, uvloop when available, signal
capture, a graceful shutdown within ``SHUTDOWN_S``, and start-up errors as
one line for the operator (bad certificate, port in use, unreadable state).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any

from mesh import logs
from mesh.adapters.fs.scanner import Scanner
from mesh.adapters.fs.watcher import Watcher
from mesh.adapters.lsyncd.gate import GateServer
from mesh.adapters.lsyncd.supervisor import LsyncdSettings, LsyncdSupervisor
from mesh.adapters.mqtt.broker import BrokerSettings, EmbeddedBroker
from mesh.adapters.mqtt.connection import LinkDown
from mesh.adapters.mqtt.links import OwnClient, PeerLink
from mesh.adapters.mqtt.peers import PeerWatcher, local_addresses
from mesh.adapters.mqtt.session import LinkState
from mesh.adapters.rsync.tunnel import TunnelServer
from mesh.clock import now_ms
from mesh.config import AgentConfig
from mesh.core import admit
from mesh.core.effects import Effect
from mesh.core.paths import reserved
from mesh.core.pushplan import OWN_GRACE
from mesh.core.replica import Replica
from mesh.core.resolver import Version
from mesh.core.stall import NO_HOLDER, ContentWaits, QueueWatch
from mesh.core.vclock import Ordering, hlc_pack
from mesh.engine import gcpolicy
from mesh.engine.admission import PushAdmission
from mesh.engine.collector import HORIZON_KEY, Collector, KeepLimits, KeepMetrics
from mesh.engine.dataplane import DataPlane
from mesh.engine.exchange import Exchange
from mesh.engine.keep import KeepArea
from mesh.engine.ops.control import ControlServer, LinkInfo, Operations, socket_path
from mesh.engine.ops.metrics import Metrics, MetricsServer, StalledCollector
from mesh.engine.ops.versions import VersionOps
from mesh.engine.pushes import Pushes
from mesh.errors import MeshError
from mesh.pki import NodeCredentials, load_node
from mesh.store.index import Index
from mesh.store.statcache import StatCache

LOG = logging.getLogger("mesh.engine.node")
SHUTDOWN_S = 5.0
STATUS_INTERVAL = 1.0
WAITS_EVERY = 5  # status intervals between two looks at every path waited for
PURGED = 1  # meta "purged": the state was purged of what issue 13's bounds refuse

Endpoint = tuple[str, int]


class Node:
    """The parts of one node and the tasks that run them."""

    def __init__(self, config: AgentConfig, creds: NodeCredentials) -> None:
        self.config = config
        self.creds = creds
        self.me = config.node_id
        config.state_dir.mkdir(parents=True, exist_ok=True)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.keep = KeepArea(config.data_dir)
        self.index = Index(config.state_db, keep=self.keep.has)
        self.epoch = int(self.index.get_meta("epoch", 0)) + 1
        self.index.set_meta("epoch", self.epoch)
        self.limits = admit.Limits(max_skew_ms=round(config.max_clock_skew * 1000))
        self._purge_once()
        self.replica = Replica(self.me, self.index, self._clock_at_start(),
                               horizon=int(self.index.get_meta(HORIZON_KEY, 0)))
        self.broker = EmbeddedBroker(BrokerSettings(creds, config.listen.host,
                                                    config.listen.port))
        self.own: OwnClient | None = None
        self.links: dict[Endpoint, tuple[PeerLink, asyncio.Task[None]]] = {}
        self.scanner = Scanner(config.data_dir, cache=StatCache(self.index.db))
        self.data = DataPlane(root=config.data_dir, replica=self.replica, index=self.index,
                              keep=self.keep, scanner=self.scanner, forward=self._forward)
        self.exchange = Exchange(
            self.me, config.cluster, self.replica, self.index, self.epoch,
            publish=self._publish, request=self._request, on_effects=self.data.apply,
            tunnel_port=config.tunnel_listen.port,  # manifest batching: Exchange's (issue 3)
            limits=self.limits,
        )
        # Issue 14: the keep area and the tombstones are collected.
        self.collector = Collector(
            index=self.index, keep=self.keep, kept=self.data.kept,
            set_horizon=self._set_horizon, live_peers=self._live_peers,
            seen_peers=lambda: list(self.exchange.peers),
            limits=KeepLimits(config.keep_for, config.keep_max, config.forget_after,
                              config.max_clock_skew))
        self.pushes = Pushes(me=self.me, epoch=self.epoch, index=self.index, data=self.data,
                             creds=creds, data_dir=config.data_dir,
                             endpoint=self._tunnel_endpoint, catch_up=self._catch_up_events,
                             current=self._peer_current,
                             own_grace=config.lsyncd_delay + OWN_GRACE)
        self.exchange.on_announce = self._announced
        self.exchange.on_synced = self.pushes.sweep
        self.gate = GateServer(config.gate_socket, config.data_dir, self.pushes)
        # Operators (issue 5): metrics, and a control socket for `mesh conflicts`/`verify`.
        self.metrics = Metrics(self.me, self.status, self.index)
        self.metrics.registry.register(StalledCollector(self.stalled))
        self.metrics.registry.register(KeepMetrics(self.collector.stats))
        self.metrics_server = None if config.metrics_listen is None else MetricsServer(
            self.metrics, config.metrics_listen.host, config.metrics_listen.port)
        ops = Operations(me=self.me, index=self.index, exchange=self.exchange,
                         data=self.data, links=self._link_infos)
        ops.handlers.update(VersionOps(self.me, self.data).handlers)  # issue 14
        self.control = ControlServer(socket_path(config.state_dir), ops)
        self.watcher: Watcher | None = None
        # Issue 13: what holds health down, and for how long.
        self.waits = ContentWaits(config.stalled_after)
        self.queues = QueueWatch(config.stalled_after)
        self._stalled_logged: set[str] = set()
        self.admission = PushAdmission(
            self.pushes, announced=self.index.peer_vector,
            wait_applied=self.exchange.wait_applied, limits=self.limits,
            on_delivered=lambda peer: self.waits.delivered(peer, time.monotonic()))
        self.tunnel = TunnelServer(creds, config.tunnel_listen.host, config.tunnel_listen.port,
                                   config.data_dir, self.keep.root,
                                   self.metrics.counting(self.admission), peers=self._is_peer)
        self.lsyncd = LsyncdSupervisor(
            config.state_dir / "lsyncd.conf.lua", [],
            settings=LsyncdSettings(config.data_dir, config.gate_socket,
                                    delay=config.lsyncd_delay))
        self.started = time.time()
        self._group: asyncio.TaskGroup | None = None

    # --- state a peer poisoned before issue 13's bounds ------------------------------

    def _purge_once(self) -> None:
        """Forget, once, what the bounds now refuse from peers (reserved paths, counters
        that overflow, clock stamps far ahead): an index poisoned before made the agent
        exit at every start."""
        if self.index.get_meta("purged") == PURGED:
            return
        now = now_ms()
        counts = self.index.purge(
            self.me, lambda path: reserved(path) is not None,
            lambda e: admit.refusal(e, now, self.limits) is not None,
            lambda v: admit.vector_refusal(v, self.limits) is not None)
        self.index.set_meta("purged", PURGED)
        if any(counts.values()):
            LOG.warning("state: forgot %s: rows a peer sent before their bounds were "
                        "checked (reserved names, overflowing counters, clocks far ahead); "
                        "the paths are scanned again", ", ".join(
                            f"{n} {table}" for table, n in counts.items() if n))

    def _clock_at_start(self) -> int:
        """The persisted hybrid clock, unless a peer pushed it further ahead of the wall
        clock than the maximum skew (then the wall clock: a clock at 2**63-3 made every
        write fail, at every start)."""
        clock = int(self.index.get_meta("clock", 0))
        now = now_ms()
        why = admit.clock_refusal(clock, now, self.limits)
        if why is None:
            return clock
        LOG.warning("state: the persisted %s; starting from the wall clock", why)
        self.index.set_meta("clock", hlc_pack(now))
        return hlc_pack(now)

    # --- wiring ---------------------------------------------------------------------

    def _set_horizon(self, horizon: int) -> None:
        self.replica.horizon = horizon

    def _live_peers(self) -> list[str]:
        """The peers whose links are up now."""
        return [s.peer_id for s in (link.status for link, _ in self.links.values())
                if s.peer_id is not None and s.state is LinkState.UP]

    def _is_peer(self, node: str) -> bool:
        """Whether ``node`` is a current peer: one of our links reached its broker."""
        return any(link.status.peer_id == node for link, _ in self.links.values())

    async def _forward(self, effects: list[Effect]) -> None:
        await self.exchange.handle_effects(effects)

    def _announced(self, version: Version) -> None:
        self.pushes.changed(version)
        self.metrics.announced(version)

    def _link_infos(self) -> list[LinkInfo]:
        return [LinkInfo(f"{host}:{port}", link.status.peer_id,
                         link.status.state is LinkState.UP)
                for (host, port), (link, _) in self.links.items()]

    async def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if self.own is None:
            raise LinkDown("own broker client not started")
        await self.own.publish(topic, payload, qos, retain)

    async def _request(self, peer: str, payload: bytes) -> None:
        for link, _ in self.links.values():
            status = link.status
            if status.peer_id == peer and status.state is LinkState.UP:
                await link.request(payload)
                return
        raise LinkDown(f"no link up to {peer}")

    def _tunnel_endpoint(self, peer: str) -> tuple[str, int] | None:
        view = self.exchange.peers.get(peer)
        if view is None or view.hello is None or not view.hello.tunnel_port:
            return None
        for (host, _), (link, _) in self.links.items():
            status = link.status
            if status.peer_id == peer and status.state is LinkState.UP:
                return host, view.hello.tunnel_port
        return None

    def _peer_current(self, peer: str) -> bool:
        for link, _ in self.links.values():
            status = link.status
            if (status.peer_id == peer and status.state is LinkState.UP
                    and status.connected_since is not None):
                return self.exchange.caught_up(peer, status.connected_since)
        return False

    async def _track_peers(self) -> None:
        """Keep lsyncd's syncs and the pusher's queues to the peers we can push to."""
        while True:
            ready = {p for p in self.exchange.peers if self._tunnel_endpoint(p) is not None}
            for peer in ready:
                self.pushes.add_peer(peer)
            self.lsyncd.update_peers(ready)
            await asyncio.sleep(0.5)

    async def _on_request(self, topic: str, payload: bytes) -> None:
        peer = topic.rsplit("/", 1)[-1]
        await self.exchange.on_request(peer, payload)

    async def _from_link(self, link: PeerLink, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        peer = link.status.peer_id
        if len(parts) < 5 or peer is None or parts[3] != peer:
            LOG.warning("refused message on %s from link %s", topic, link.label)
            return
        await self.exchange.on_peer_message(peer, topic, payload)

    async def _peers_changed(self, added: frozenset[Endpoint], removed: frozenset[Endpoint],
                             ) -> None:
        for endpoint in removed:
            link, task = self.links.pop(endpoint)
            task.cancel()
            LOG.info("peer %s:%d left", *endpoint)
        assert self._group is not None
        for host, port in sorted(added):
            holder: list[PeerLink] = []  # the handler needs the link it belongs to

            async def on_message(topic: str, payload: bytes, holder: list[PeerLink] = holder,
                                 ) -> None:
                await self._from_link(holder[0], topic, payload)

            link = PeerLink(creds=self.creds, host=host, port=port, on_message=on_message)
            holder.append(link)
            task = self._group.create_task(link.run(), name=f"link-{host}:{port}")
            self.links[(host, port)] = (link, task)
            LOG.info("peer %s:%d joined", host, port)

    # --- running --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await self.broker.start()
        await self.tunnel.start()
        self.exchange.tunnel_port = self.tunnel.address[1]
        await self.gate.start()
        await self.control.start()
        if self.metrics_server is not None:
            await self.metrics_server.start()
        host, port = self.broker.address
        self.own = OwnClient(creds=self.creds, host=_dial(host), port=port,
                             on_request=self._on_request)
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                group.create_task(self.own.run(), name="own-client")
                await self.own.wait_up(10)
                group.create_task(self.exchange.run_flusher(), name="flusher")
                group.create_task(self.exchange.run_heads(), name="heads")
                group.create_task(self._discover(), name="discovery")
                group.create_task(self._watch(), name="watcher")
                group.create_task(self._write_status(), name="status")
                group.create_task(self.pushes.run(), name="pusher")
                group.create_task(self._track_peers(), name="peers")
                group.create_task(self.collector.run(), name="collector")
                await self.lsyncd.start()
                await stop.wait()
                LOG.info("stopping")
                await asyncio.wait_for(self.exchange.flush(), SHUTDOWN_S / 2)
                raise _Stop
        except* _Stop:
            pass
        finally:
            await self.lsyncd.stop()
            if self.metrics_server is not None:
                await self.metrics_server.stop()
            await self.control.stop()
            await self.gate.stop()
            await self.tunnel.stop()
            await self.broker.stop()
            self.index.close()

    async def _discover(self) -> None:
        own = {(a, self.config.listen.port) for a in local_addresses()}
        own.add((_dial(self.config.listen.host), self.broker.address[1]))
        watcher = PeerWatcher(self.config.peers, exclude=own, interval=self.config.dns_interval,
                              on_change=self._peers_changed)
        await watcher.run()
        await asyncio.Event().wait()  # static peers: keep the links running

    async def _watch(self) -> None:
        with Watcher(self.config.data_dir, quiet=self.config.batch_quiet,
                     cap=self.config.batch_cap, max_paths=4096) as watcher:
            self.watcher = watcher
            count = await self.data.startup()
            LOG.info("start-up scan: %d paths on disk, %d indexed", count, self.index.count())
            async for batch in watcher.batches():
                if batch.rescan:
                    LOG.warning("inotify queue overflowed: rescanning everything")
                    await self.data.startup()
                else:
                    await self.data.scan(batch.paths, events_read=batch.taken)
                    if self.data.unsettled:
                        await self.data.scan(sorted(self.data.unsettled))

    async def _catch_up_events(self, paths: list[str]) -> None:
        """Before the gate answers: apply every inotify event up to now, scanning each
        changed path once (not again if scanned since its event was read)."""
        batch = self.watcher.take_all() if self.watcher is not None else None
        if batch is None:
            await self.data.scan(paths)
        else:
            await self.data.scan(batch.paths, events_read=batch.taken)

    async def _write_status(self) -> None:
        path = self.config.status_file
        ticks = 0
        while True:
            if ticks % WAITS_EVERY == 0:
                self.waits.update(time.monotonic(), self.index.target_paths())
            ticks += 1
            self.queues.update(time.monotonic(), {p: self.pushes.pending(p)
                                                  for p in self.pushes.peers()})
            logs.flush_repeats()
            doc = self.status()
            self._log_stalled(doc["stalled"])
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(doc, indent=1))
            tmp.replace(path)
            await asyncio.sleep(STATUS_INTERVAL)

    def _holders(self, path: str) -> list[str]:
        """The peers that announced holding what ``path`` waits for."""
        target = self.index.state(path).target
        if target is None:
            return []
        out = []
        for peer in self.exchange.peers:
            seen = self.index.peer_vector(peer, path)
            if seen is not None and seen.compare(target.vector) in (Ordering.EQUAL,
                                                                    Ordering.AFTER):
                out.append(peer)
        return out

    def stalled(self) -> dict[str, Any]:
        """What stopped counting against health (``mesh.core.stall``), for the status."""
        now = time.monotonic()
        content, paths = self.waits.stalled(now, self._holders)
        queues = {}
        for peer, q in self.queues.stalled(now).items():
            why = ("its hello advertises no tunnel, or its link is down"
                   if self._tunnel_endpoint(peer) is None else "pushes to it do not get through")
            queues[peer] = {"paths": q.paths, "for_s": round(now - q.since), "why": why}
        catch_ups = {peer: round(now - view.resync_started)
                     for peer, view in self.exchange.peers.items()
                     if view.resync is not None and not view.resync.done()
                     and now - view.resync_started >= self.config.stalled_after}
        return {"after_s": self.config.stalled_after, "content": content,
                "content_paths": paths, "queues": queues, "catch_ups": catch_ups}

    def _log_stalled(self, stalled: dict[str, Any]) -> None:
        """One line when a peer starts holding health down past the bound, one when it
        stops."""
        now: set[str] = set()
        for peer, n in stalled["content"].items():
            key = f"content:{peer}"
            now.add(key)
            if key not in self._stalled_logged:
                who = "no peer holds it" if peer == NO_HOLDER else f"{peer} announced it"
                LOG.warning("content of %d paths has not come for %.0f s (%s and delivered "
                            "none): stalled, no longer counted against health", n,
                            stalled["after_s"], who)
        for peer, q in stalled["queues"].items():
            key = f"queue:{peer}"
            now.add(key)
            if key not in self._stalled_logged:
                LOG.warning("%d paths queued for %s have not moved for %d s (%s): stalled, "
                            "no longer counted against health", q["paths"], peer, q["for_s"],
                            q["why"])
        for peer, seconds in stalled["catch_ups"].items():
            key = f"catch-up:{peer}"
            now.add(key)
            if key not in self._stalled_logged:
                LOG.warning("the catch-up with %s has run for %d s: stalled, no longer "
                            "counted against health", peer, seconds)
        for key in sorted(self._stalled_logged - now):
            kind, _, peer = key.partition(":")
            what = {"content": "content from", "queue": "the queue to"}.get(kind, "catch-up with")
            LOG.info("%s %s: no longer stalled", what, peer or "no peer")
        self._stalled_logged = now

    def status(self) -> dict[str, Any]:
        peers = {}
        for (host, port), (link, _) in self.links.items():
            s = link.status
            view = self.exchange.peers.get(s.peer_id) if s.peer_id else None
            peers[f"{host}:{port}"] = {
                "node": s.peer_id, "state": s.state.value, "since": s.connected_since,
                "last_message": s.last_message, "reconnects": s.reconnects,
                "error": s.last_error,
                "applied_seq": view.inbox.applied if view else None,
                "epoch": view.inbox.epoch if view else None,
                "manifests": view.applied_manifests if view else 0,
                "resyncs": view.resyncs if view else 0,
                "catching_up": bool(view and view.resync and not view.resync.done()),
                "inbox_pending": len(view.inbox.pending) if view else 0,
            }
        return {
            "node": self.me, "cluster": self.config.cluster, "pid": os.getpid(),
            "epoch": self.epoch, "started": self.started, "now": time.time(),
            "broker": "{}:{}".format(*self.broker.address),
            "data_dir": str(self.config.data_dir), "seq": self.exchange.outbox.seq,
            "backlog": self.exchange.backlog, "index_size": self.index.count(),
            "wants": self.data.wants, "peers": peers,
            "pending_content": self.index.count_targets(),
            "stalled": self.stalled(),
            "keep": self.collector.stats.doc(),
            "watches": self.watcher.watch_count if self.watcher is not None else 0,
            "metrics": self.metrics_server and self.metrics_server.where,
            "pushes": {**dataclasses.asdict(self.pushes.plan.counters),
                       "received": self.pushes.received,
                       "pending": {p: self.pushes.pending(p) for p in self.pushes.peers()},
                       "by_peer": {p: dataclasses.asdict(self.pushes.plan.peer_counters(p))
                                   for p in self.pushes.peers()}},
            "gate": dataclasses.asdict(self.gate.counters),
            "lsyncd": {"pid": self.lsyncd.pid, "peers": self.lsyncd.peers},
        }


class _Stop(Exception):
    pass


def _dial(host: str) -> str:
    """An address to connect to for a listen address (a wildcard means loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104


def run_agent(config: AgentConfig) -> int:
    """Run one node until SIGTERM or SIGINT; returns the process exit code."""
    logs.setup(config.node_id, config.log_format, config.log_level)
    try:
        creds = load_node(config.pki_dir, config.node_id)
        node = Node(config, creds)
    except MeshError as err:
        LOG.error("cannot start: %s", err)
        return 2
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.Runner()
    gcpolicy.tune()  # issue 3: the collector's passes were the latency's tail
    with runner:
        return runner.run(_main(node))


async def _main(node: Node) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    failures: list[BaseException] = []
    try:
        await node.run(stop)
    except* (MeshError, OSError) as group:
        failures = list(group.exceptions)
    for err in failures:
        LOG.error("%s", err if isinstance(err, MeshError) else f"I/O error: {err}")
    if failures:
        return 1 if stop.is_set() else 2
    return 0
