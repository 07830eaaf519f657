"""Prometheus metrics of one agent, served on ``metrics_listen`` at ``/metrics`` (issue 5).

Two kinds of numbers:

* what the node already tracks (links, index size, manifests, gate decisions,
  pending pushes, inotify watches) is read from ``Node.status()`` at scrape
  time, so ``/metrics``, ``mesh status`` and ``agent.json`` never disagree;
* what only an event shows (a change seen, how long a version took to get
  here, a push received, a failed rsync) is counted when it happens;
* what an operator's alerts need besides (issue 15, compose/monitoring): whether
  ``mesh health`` would pass and the data filesystem's free space (statvfs at scrape
  time). The keep area's numbers are the collector's (``mesh.engine.collector.KeepMetrics``).

Pushes are counted where they land: the receiving agent sees every push, whether
lsyncd's gate or the agent's own pusher sent it, with the rsync daemon's exit
status; the sending gate is a separate process. Bytes are the sizes of the
versions a push delivered, not rsync's wire bytes (which its delta transfer cuts).

The HTTP server runs on the agent's event loop, not prometheus-client's thread:
scrapes read the SQLite index, which must stay on the loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from mesh import __version__
from mesh.adapters.rsync.tunnel import PushSink
from mesh.clock import now_ms
from mesh.core import manifest
from mesh.core.replica import group
from mesh.core.resolver import Version
from mesh.core.vclock import hlc_wall_ms
from mesh.engine.ops.health import DEFAULT_MAX_LAG, health_problems, lag_of
from mesh.store.index import Index

LOG = logging.getLogger("mesh.engine.ops.metrics")

LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
MAX_REQUEST_BYTES = 16 * 1024
REQUEST_TIMEOUT = 5.0

Status = Callable[[], dict[str, Any]]


class ConflictTally:
    """Conflicts in the log by rule, counted once per id (a log only grows)."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self._seen: set[str] = set()
        self.by_rule: dict[str, int] = {}

    def update(self) -> dict[str, int]:
        for conflict_id in self.index.conflict_ids():
            if conflict_id in self._seen:
                continue
            row = self.index.conflict(conflict_id)
            if row is not None:
                rule = row.conflict.rule.value
                self.by_rule[rule] = self.by_rule.get(rule, 0) + 1
            self._seen.add(conflict_id)
        return self.by_rule


class Metrics:
    def __init__(self, me: str, status: Status, index: Index) -> None:
        self.me = me
        # A `_created` series per counter is noise to scrape (and the agent is one process).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        self.changes = Counter("mesh_changes", "New versions this node's disk took on, by "
                               "where they were written.", ["origin"], registry=self.registry)
        self.lag = Histogram("mesh_propagation_lag_seconds", "From a peer's write (its HLC "
                             "stamp) until this node holds it.", buckets=LAG_BUCKETS,
                             registry=self.registry)
        self.pushes_in = Counter("mesh_pushes_received", "Pushes into this node, by result.",
                                 ["result"], registry=self.registry)
        self.bytes_in = Counter("mesh_push_bytes", "Bytes of the versions pushes delivered "
                                "to this node.", registry=self.registry)
        self.rsync_failures = Counter("mesh_rsync_failures", "Pushes into this node whose "
                                      "rsync daemon failed.", registry=self.registry)
        for origin in ("local", "peer"):
            self.changes.labels(origin)
        for result in ("ok", "failed"):
            self.pushes_in.labels(result)
        self.registry.register(_StateCollector(me, status, ConflictTally(index)))

    def announced(self, version: Version) -> None:
        """This node's disk now holds ``version``."""
        writer = version.winner.writer
        self.changes.labels("local" if writer == self.me else "peer").inc()
        if writer != self.me:
            lag_ms = now_ms() - hlc_wall_ms(version.winner.hlc)
            self.lag.observe(max(0, lag_ms) / 1000)

    def counting(self, sink: PushSink) -> PushSink:
        return _CountingSink(sink, self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CountingSink:
    """A ``PushSink`` that counts the pushes it hands on."""

    def __init__(self, inner: PushSink, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

    async def begin(self, peer: str, push_id: str, header: bytes) -> object:
        ticket = await self.inner.begin(peer, push_id, header)  # refuses a bad header
        versions = group(manifest.decode(header).entries).values()
        return ticket, sum(v.winner.size for v in versions if v.content is not None)

    async def end(self, ticket: object, returncode: int) -> None:
        assert isinstance(ticket, tuple)
        inner, size = ticket
        try:
            await self.inner.end(inner, returncode)
        finally:
            self.metrics.pushes_in.labels("failed" if returncode else "ok").inc()
            if returncode:
                self.metrics.rsync_failures.inc()
            else:
                self.metrics.bytes_in.inc(size)


class _StateCollector:
    def __init__(self, me: str, status: Status, tally: ConflictTally) -> None:
        self.me = me
        self.status = status
        self.tally = tally

    def collect(self) -> Iterator[Metric]:
        doc = self.status()
        info = GaugeMetricFamily("mesh_agent_info", "Always 1: the agent's node id, cluster "
                                 "and version.", labels=["node", "cluster", "version"])
        info.add_metric([self.me, doc["cluster"], __version__], 1)
        yield info
        yield from _peer_metrics(doc["peers"], doc["pushes"]["pending"])
        yield from _health_metrics(doc)
        yield from _disk_metrics(Path(doc["data_dir"]))
        pushes = doc["pushes"]
        paths = CounterMetricFamily("mesh_push_paths", "Paths the gate was asked to push, by "
                                    "decision.", labels=["decision"])
        paths.add_metric(["allowed"], pushes["allowed"])
        paths.add_metric(["denied"], pushes["denied"])
        yield paths
        sent = CounterMetricFamily("mesh_pushes_sent", "Pushes from this node, by who started "
                                   "them (lsyncd: a batch through the gate; agent: catch-up, "
                                   "forwarding, retries) and result.", labels=["by", "result"])
        sent_paths = CounterMetricFamily("mesh_push_paths_sent", "Paths in the pushes from "
                                         "this node that succeeded, by who started them.",
                                         labels=["by"])
        for by, ok, failed, paths_ok in (("lsyncd", "carried", "carry_failures",
                                          "carried_paths"),
                                         ("agent", "sent", "send_failures", "sent_paths")):
            sent.add_metric([by, "ok"], pushes.get(ok, 0))
            sent.add_metric([by, "failed"], pushes.get(failed, 0))
            sent_paths.add_metric([by], pushes.get(paths_ok, 0))
        yield sent
        yield sent_paths
        yield CounterMetricFamily("mesh_manifests_sent", "Manifests this node published since "
                                  "it started.", value=doc["seq"])
        conflicts = CounterMetricFamily("mesh_conflicts", "Conflicts in this node's log, by "
                                        "the rule that decided.", labels=["rule"])
        for rule, count in sorted(self.tally.update().items()):
            conflicts.add_metric([rule], count)
        yield conflicts
        for name, help_text, value in (
            ("mesh_index_paths", "Paths in the index (tombstones included; counted again "
             "at most every 20 counts' time).", doc["index_size"]),
            ("mesh_inotify_watches", "Directories the watcher watches.", doc["watches"]),
            ("mesh_backlog_entries", "Versions not yet published in a manifest.",
             doc["backlog"]),
            ("mesh_pending_content_paths", "Paths whose newer content this node waits for "
             "(never fewer than there are: between two counts, each target written "
             "adds one).", doc["pending_content"]),
            ("mesh_start_time_seconds", "When the agent started (Unix time).", doc["started"]),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)


def _peer_metrics(peers: dict[str, dict[str, Any]], pending: dict[str, int]
                  ) -> Iterator[Metric]:
    up = GaugeMetricFamily("mesh_link_up", "1 when the link to the peer is up.",
                           labels=["peer", "address"])
    received = CounterMetricFamily("mesh_manifests_received", "Manifests applied from the "
                                   "peer.", labels=["peer"])
    behind = GaugeMetricFamily("mesh_push_pending_paths", "Paths queued for the peer.",
                               labels=["peer"])
    for address, p in sorted(peers.items()):
        peer = p["node"] or "unknown"
        up.add_metric([peer, address], 1 if p["state"] == "up" else 0)
        received.add_metric([peer], p["manifests"])
        behind.add_metric([peer], pending.get(peer, 0))
    yield from (up, received, behind)


def _health_metrics(doc: dict[str, Any]) -> Iterator[Metric]:
    """What ``mesh health`` (the image's HEALTHCHECK) decides, as numbers."""
    yield GaugeMetricFamily("mesh_healthy", f"1 when `mesh health --max-lag {DEFAULT_MAX_LAG}` "
                            "(the image's health check) would pass.",
                            value=0 if health_problems(doc, DEFAULT_MAX_LAG) else 1)
    yield GaugeMetricFamily("mesh_lag_entries", "Entries not yet exchanged: unpublished, "
                            "awaited, queued for peers, manifests held back (what `mesh "
                            "health --max-lag` compares).", value=sum(lag_of(doc).values()))
    catching_up = GaugeMetricFamily("mesh_peer_catching_up", "1 while a catch-up with the "
                                    "peer runs.", labels=["peer"])
    for address, p in sorted(doc["peers"].items()):
        catching_up.add_metric([p["node"] or address], 1 if p["catching_up"] else 0)
    yield catching_up


def _disk_metrics(data_dir: Path) -> Iterator[Metric]:
    with contextlib.suppress(OSError):
        fs = os.statvfs(data_dir)
        yield GaugeMetricFamily("mesh_data_filesystem_avail_bytes", "Bytes free for the agent "
                                "on the data folder's filesystem (the keep area's too).",
                                value=fs.f_bavail * fs.f_frsize)
        yield GaugeMetricFamily("mesh_data_filesystem_size_bytes", "Size of the data "
                                "folder's filesystem.", value=fs.f_blocks * fs.f_frsize)


class MetricsServer:
    """A minimal HTTP/1.0 server for ``GET /metrics`` on the agent's loop."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host, self.port = host, port
        self._server: asyncio.Server | None = None

    @property
    def where(self) -> str | None:
        """``host:port`` while serving (the port is the real one when 0 was asked)."""
        if self._server is None:
            return None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  limit=MAX_REQUEST_BYTES)
        LOG.info("metrics on http://%s/metrics", self.where)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            method, _, target = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            target = target.partition(" ")[0]
            if method not in ("GET", "HEAD"):
                status, body, kind = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif target.split("?", 1)[0] == "/metrics":
                status, body, kind = "200 OK", self.metrics.render(), CONTENT_TYPE_LATEST
            else:
                status, body, kind = "404 Not Found", b"see /metrics\n", "text/plain"
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: "
                         f"{len(body)}\r\nConnection: close\r\n\r\n".encode())
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that went away or sent garbage gets nothing
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class StalledCollector:
    """What stopped counting against health (issue 13, ``mesh.core.stall``), per peer:
    content it announced and never delivered, and a queue to it that does not move.
    Read from ``Node.stalled()`` at scrape time, as the status has it."""

    def __init__(self, stalled: Callable[[], dict[str, Any]]) -> None:
        self.stalled = stalled

    def collect(self) -> Iterator[Metric]:
        doc = self.stalled()
        content = GaugeMetricFamily(
            "mesh_stalled_content_paths", "Paths whose content the peer announced and has "
            "not delivered for longer than --stalled-after: not counted against health "
            "(peer \"\": no peer holds it).", labels=["peer"])
        for peer, n in sorted(doc["content"].items()):
            content.add_metric([peer], n)
        queues = GaugeMetricFamily(
            "mesh_stalled_queue_paths", "Paths queued for the peer that have not moved for "
            "longer than --stalled-after: not counted against health.", labels=["peer"])
        for peer, q in sorted(doc["queues"].items()):
            queues.add_metric([peer], q["paths"])
        yield from (content, queues)
