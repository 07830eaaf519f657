"""One meshsync node: every part wired together under a TaskGroup.

    broker ◄── own client ◄── exchange ──► peer links (one per peer address)
                                 ▲ │
            watcher ─► data plane ┘ └─► replica + index (SQLite)

The replica's effects have one dispatcher, ``Exchange.handle_effects``: announcements
and conflicts go out as manifests (and to the pusher and the metrics, ``on_announce``),
file work to the data plane; the data plane hands its effects there too. The servers
(broker, tunnel, gate, control socket, metrics) start in one order and stop in the
reverse, and the whole stop sequence runs within ``SHUTDOWN_S`` of the stop. The process
around a node (signals, uvloop, exit codes) is ``mesh.engine.agent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Container, Coroutine
from typing import Any, Protocol

from mesh import logs
from mesh.adapters.fs.watcher import Watcher
from mesh.adapters.lsyncd.agentwrites import AgentWrites
from mesh.adapters.lsyncd.gate import GateServer
from mesh.adapters.lsyncd.supervisor import LsyncdSettings, LsyncdSupervisor
from mesh.adapters.mqtt.broker import BrokerSettings, EmbeddedBroker
from mesh.adapters.mqtt.connection import LinkDown
from mesh.adapters.mqtt.links import OwnClient
from mesh.adapters.mqtt.peers import local_addresses
from mesh.adapters.mqtt.session import LinkState
from mesh.adapters.rsync.tunnel import TunnelServer
from mesh.config import AgentConfig
from mesh.core.effects import Effect
from mesh.core.pushplan import OWN_GRACE
from mesh.core.replica import Replica
from mesh.core.resolver import Version
from mesh.core.vclock import Ordering
from mesh.engine.admission import PushAdmission
from mesh.engine.bounds import clock_at_start
from mesh.engine.collector import HORIZON_KEY, Collector, KeepLimits, KeepMetrics
from mesh.engine.dataplane import DataPlane
from mesh.engine.exchange import Exchange
from mesh.engine.nodestate import NodeState
from mesh.engine.ops.control import ControlServer, Operations, socket_path
from mesh.engine.ops.health import DEFAULT_MAX_LAG, health_problems
from mesh.engine.ops.metrics import Metrics, MetricsServer, StalledCollector
from mesh.engine.ops.versions import VersionOps
from mesh.engine.peerlinks import PeerLinks
from mesh.engine.peerview import catching_up
from mesh.engine.pushes import Pushes
from mesh.engine.stalls import Stalls
from mesh.engine.startwalk import StartWalk
from mesh.pki import NodeCredentials
from mesh.store import bulk
from mesh.store.sizes import IndexSizes
from mesh.store.waits import ContentWaitTable

LOG = logging.getLogger("mesh.engine.node")
SHUTDOWN_S = 5.0
STATUS_INTERVAL = 1.0


class Node:
    """The parts of one node and the tasks that run them."""

    def __init__(self, config: AgentConfig, creds: NodeCredentials, state: NodeState,
                 startwalk: StartWalk, started: float) -> None:
        """``state``: opened by the agent, and ``startwalk`` begun over it, before this
        module was imported (``mesh.engine.nodestate``); ``started``: when the agent's
        process started (``time.monotonic()``), for "caught up after start"."""
        self.config = config
        self.creds = creds
        self.me = config.node_id
        self._reachable = asyncio.Event()  # a link or a hello changed: which peers to push to
        self.keep, self.index, self.epoch = state.keep, state.index, state.epoch
        self.limits, self.scanner = state.limits, state.scanner
        self.startwalk = startwalk
        self.replica = Replica(self.me, self.index, clock_at_start(self.index, self.limits),
                               horizon=int(self.index.get_meta(HORIZON_KEY, 0)))
        self.broker = EmbeddedBroker(BrokerSettings(creds, config.listen.host, config.listen.port))
        self.own: OwnClient | None = None
        self.data = DataPlane(root=config.data_dir, replica=self.replica, index=self.index,
                              keep=self.keep, scanner=self.scanner, forward=self._forward,
                              being_written=self._being_written)
        self.links = PeerLinks(creds, on_message=self._from_peer, on_change=self._reachable.set)
        self.agent_writes = AgentWrites(config.state_dir / "lsyncd-agent-writes")
        self.keep.fs.changing = self.agent_writes.note  # lsyncd passes over these
        self.pushes = Pushes(me=self.me, epoch=self.epoch, index=self.index, data=self.data,
                             creds=creds, data_dir=config.data_dir, current=self._peer_current,
                             endpoint=self._tunnel_endpoint, catch_up=self._catch_up_events,
                             unasked=self.agent_writes.noted,
                             own_grace=OWN_GRACE + max(config.lsyncd_delay, config.lsyncd_pace))
        self.exchange = Exchange(
            self.me, config.cluster, self.replica, self.index, self.epoch,
            publish=self._publish, request=self.links.request, on_effects=self.data.apply,
            tunnel_port=config.tunnel_listen.port,  # manifest batching: Exchange's (issue 3)
            limits=self.limits, on_announce=self._announced, on_synced=self._synced,
            on_hello=lambda _peer: self._reachable.set(), on_heard=self.pushes.plan.heard,
        )
        # Issue 14: the keep area and the tombstones are collected.
        self.collector = Collector(
            index=self.index, keep=self.keep, kept=self.data.kept,
            set_horizon=self._set_horizon, live_peers=self.links.live_peers,
            seen_peers=lambda: list(self.exchange.peers),
            limits=KeepLimits(config.keep_for, config.keep_max, config.forget_after,
                              config.max_clock_skew))
        self.gate = GateServer(config.gate_socket, config.data_dir, self.pushes)
        # Operators (issue 5): metrics, and a control socket for `mesh conflicts`/`verify`.
        self.metrics = Metrics(self.me, self.status, self.index)
        self.metrics.registry.register(StalledCollector(self.stalled))
        self.metrics.registry.register(KeepMetrics(self.collector.stats))
        self.metrics_server = None if config.metrics_listen is None else MetricsServer(
            self.metrics, config.metrics_listen.host, config.metrics_listen.port)
        ops = Operations(me=self.me, index=self.index, exchange=self.exchange,
                         data=self.data, links=self.links.infos)
        ops.handlers.update(VersionOps(self.me, self.data).handlers)  # issue 14
        self.control = ControlServer(socket_path(config.state_dir), ops)
        self.watcher: Watcher | None = None
        self.sizes = IndexSizes(self.index)  # counted at most every few counts' time
        self.waits = ContentWaitTable(self.index, config.stalled_after)  # what holds health
        self.stalls = Stalls(config.stalled_after, self.waits)
        self.admission = PushAdmission(
            self.pushes, announced=functools.partial(bulk.peer_vectors, self.index),
            wait_applied=self.exchange.wait_applied, limits=self.limits,
            on_delivered=lambda peer: self.stalls.waits.delivered(peer, time.monotonic()))
        self.tunnel = TunnelServer(creds, config.tunnel_listen.host, config.tunnel_listen.port,
                                   config.data_dir, self.keep.root,
                                   self.metrics.counting(self.admission), peers=self.links.is_peer)
        self.lsyncd = LsyncdSupervisor(config.state_dir / "lsyncd.conf.lua", [], settings=(
            LsyncdSettings(config.data_dir, config.gate_socket, delay=config.lsyncd_delay,
                           pace=config.lsyncd_pace, agent_writes=self.agent_writes.path)))
        self.started = time.time()
        self._since_start = started
        self.scanned: float | None = None  # when the start-up scan ended (monotonic)
        self._caught_up_logged = False
        self._status_now = asyncio.Event()  # write the status without waiting the interval
        self._group: asyncio.TaskGroup | None = None

    # --- wiring ---------------------------------------------------------------------

    def _set_horizon(self, horizon: int) -> None:
        self.replica.horizon = horizon

    async def _forward(self, effects: list[Effect]) -> None:
        await self.exchange.handle_effects(effects)

    def _announced(self, version: Version) -> None:
        self.pushes.changed(version)
        self.metrics.announced(version)

    def _synced(self, peer: str) -> None:
        self.pushes.sweep(peer)
        self._status_now.set()

    async def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if self.own is None:
            raise LinkDown("own broker client not started")
        await self.own.publish(topic, payload, qos, retain)

    def _tunnel_endpoint(self, peer: str) -> tuple[str, int] | None:
        view = self.exchange.peers.get(peer)
        if view is None or view.hello is None or not view.hello.tunnel_port:
            return None
        for (host, _), status in self.links.up():
            if status.peer_id == peer:
                return host, view.hello.tunnel_port
        return None

    def _peer_current(self, peer: str) -> bool:
        for _, status in self.links.up():
            if status.peer_id == peer and status.connected_since is not None:
                return self.exchange.caught_up(peer, status.connected_since)
        return False

    async def _track_peers(self) -> None:
        """lsyncd's syncs and the pusher's queues, one per peer whose hello named its
        tunnel port, kept while it is down (``Pushes.carry`` refuses its batches): lsyncd
        restarts only for a new peer. And the peers our links reach (``linked``)."""
        while True:
            self._reachable.clear()
            known = {peer for peer, view in self.exchange.peers.items()
                     if view.hello is not None and view.hello.tunnel_port}
            for peer in known:
                self.pushes.add_peer(peer)
            self.lsyncd.update_peers(known)
            self.pushes.plan.linked(self.links.live_peers())
            await self._reachable.wait()

    async def _on_request(self, topic: str, payload: bytes) -> None:
        peer = topic.rsplit("/", 1)[-1]
        await self.exchange.on_request(peer, payload)

    async def _from_peer(self, peer: str, topic: str, payload: bytes) -> None:
        await self.exchange.on_peer_message(peer, topic, payload)

    # --- running --------------------------------------------------------------------

    def _servers(self) -> list[tuple[str, Server]]:
        """What listens, in the order it starts (and stops in reverse)."""
        servers: list[tuple[str, Server]] = [
            ("broker", self.broker), ("tunnel", self.tunnel), ("gate", self.gate),
            ("control socket", self.control)]
        if self.metrics_server is not None:
            servers.append(("metrics", self.metrics_server))
        return servers

    async def run(self, stop: asyncio.Event) -> None:
        """Start the servers, run every task until ``stop``, then stop it all within
        ``SHUTDOWN_S`` of the stop (one deadline for the whole sequence)."""
        started: list[tuple[str, Server]] = []
        deadline: float | None = None
        try:
            await self.startwalk.walking()  # begun by the agent, as a rule
            for name, server in self._servers():
                await server.start()
                started.append((name, server))
            self.exchange.tunnel_port = self.tunnel.address[1]
            host, port = self.broker.address
            self.own = OwnClient(creds=self.creds, host=_dial(host), port=port,
                                 on_request=self._on_request)
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
                deadline = asyncio.get_running_loop().time() + SHUTDOWN_S
                await _within(deadline, "publishing what is pending", self.exchange.flush())
                raise _Stop
        except* _Stop:
            pass
        finally:
            if deadline is None:  # a start failed, or a task did
                deadline = asyncio.get_running_loop().time() + SHUTDOWN_S
            await _within(deadline, "lsyncd", self.lsyncd.stop())
            await _within(deadline, "the start-up walk", self.startwalk.abandon())
            for name, server in reversed(started):
                await _within(deadline, name, server.stop())
            self.index.close()
            self.agent_writes.close()

    async def _discover(self) -> None:
        own = {(a, self.config.listen.port) for a in local_addresses()}
        own.add((_dial(self.config.listen.host), self.broker.address[1]))
        await self.links.run(self.config.peers, own, self.config.dns_interval)

    async def _watch(self) -> None:
        watcher, found = await self.startwalk.take()
        with watcher:
            self.watcher = watcher
            count = await self.data.startup(found)
            self.scanned = time.monotonic()
            LOG.info("start-up scan: %d paths on disk, %d indexed, in %.1f s", count,
                     self.index.count(), self.scanned - self._since_start)
            self._status_now.set()
            async for batch in watcher.batches():
                if batch.rescan:
                    LOG.warning("inotify queue overflowed: rescanning everything")
                    await self.data.startup()
                else:
                    await self.data.scan(batch.paths, events_read=batch.taken)
                    if self.data.unsettled:
                        await self.data.scan(sorted(self.data.unsettled))

    def _being_written(self) -> Container[str]:
        return self.watcher.being_written() if self.watcher is not None else frozenset()

    async def _catch_up_events(self, paths: list[str]) -> None:
        """Before the gate answers: apply every inotify event up to now, scanning each
        changed path once (not again if scanned since its event was read), and wait for
        the scans under way of ``paths`` (the watcher's, another peer's batch's)."""
        batch = self.watcher.take_all() if self.watcher is not None else None
        await self.data.scan(paths if batch is None else batch.paths,
                             events_read=None if batch is None else batch.taken)
        await self.data.marks.running(paths)

    async def _write_status(self) -> None:
        path = self.config.status_file
        while True:
            self.waits.update(time.monotonic())
            self.stalls.queues.update(time.monotonic(), {p: self.pushes.pending(p)
                                                         for p in self.pushes.peers()})
            logs.flush_repeats()
            doc = self.status()
            self.stalls.log(doc["stalled"])
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(doc, indent=1))
            tmp.replace(path)
            self._log_caught_up(doc)
            self._status_now.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STATUS_INTERVAL):
                    await self._status_now.wait()

    def _log_caught_up(self, doc: dict[str, Any]) -> None:
        """Once, the first time the status is healthy: how long that took from the start
        (issue 16: a restart on unchanged files is to be healthy within seconds)."""
        if self._caught_up_logged or health_problems(doc, DEFAULT_MAX_LAG):
            return
        self._caught_up_logged = True
        LOG.info("caught up after start in %.1f s", time.monotonic() - self._since_start)

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
        """What stopped counting against health (``mesh.engine.stalls``), for the status."""
        resyncs = {peer: view.resync_started for peer, view in self.exchange.peers.items()
                   if view.resync is not None and not view.resync.done()}
        return self.stalls.doc(time.monotonic(), self._holders,
                               lambda peer: self._tunnel_endpoint(peer) is not None, resyncs)

    def status(self) -> dict[str, Any]:
        peers, now = {}, time.monotonic()
        for (host, port), (link, _) in self.links.links.items():
            s = link.status
            view = self.exchange.peers.get(s.peer_id) if s.peer_id else None
            peers[f"{host}:{port}"] = {
                "node": s.peer_id, "state": s.state.value, "since": s.connected_since,
                "last_message": s.last_message, "reconnects": s.reconnects,
                "error": s.last_error,
                "catching_up": s.state is LinkState.UP and catching_up(view, s.connected_since),
                **(view.doc() if view else {"applied_seq": None, "epoch": None,
                                            "manifests": 0, "resyncs": 0, "catch_ups": 0,
                                            "inbox_pending": 0}),
            }
        return {
            "node": self.me, "cluster": self.config.cluster, "pid": os.getpid(),
            "epoch": self.epoch, "started": self.started, "now": time.time(),
            "scanning": self.scanned is None,
            "broker": "{}:{}".format(*self.broker.address),
            "data_dir": str(self.config.data_dir), "seq": self.exchange.outbox.seq,
            "backlog": self.exchange.backlog, "index_size": self.sizes.versions(now),
            "wants": self.data.wants, "peers": peers,
            "pending_content": self.sizes.pending(now),
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


class Server(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


async def _within(deadline: float, what: str, step: Coroutine[Any, Any, None]) -> None:
    """One step of the stop sequence, cut off at the stop's deadline."""
    try:
        async with asyncio.timeout_at(deadline):
            await step
    except TimeoutError:
        LOG.warning("stop: %s did not finish within %.0f s of the stop", what, SHUTDOWN_S)


def _dial(host: str) -> str:
    """An address to connect to for a listen address (a wildcard means loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
