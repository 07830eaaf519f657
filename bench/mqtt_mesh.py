"""The mesh over TLS: announced paths/s node-to-node, and manifest latency.

    .venv/bin/python bench/mqtt_mesh.py [--paths 100000] [--rate 500] [--seconds 10]

Three nodes in one process on 127.0.0.3x, each with its broker, its own client,
links to the two others and an exchange over an in-memory index — the agent's
code minus the data folder. Node n1 announces; n2 and n3 apply. Run four
ways in the same run: amqtt (the product) and Debian's mosquitto (started and
stopped here, with TLS and client certificates) as the brokers, each with
uvloop and with the default event loop; the client code is the same.

Targets (issue 3): >= 20,000 changed paths/s announced node-to-node;
p99 manifest latency <= 20 ms at 500 changes/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mesh import pki
from mesh.adapters.broker import BrokerSettings, EmbeddedBroker
from mesh.adapters.links import OwnClient, PeerLink
from mesh.core.manifest import Entry, Kind, Manifest
from mesh.core.replica import Effect, PathState, Replica
from mesh.core.resolver import Version
from mesh.core.vclock import VersionVector
from mesh.exchange import Exchange
from mesh.store.index import Index

NAMES = ["n1", "n2", "n3"]
PORT = 18883


def host_of(name: str) -> str:
    return f"127.0.0.{30 + int(name[1:])}"


@dataclass
class BenchNode:
    name: str
    exchange: Exchange
    own: OwnClient
    links: list[PeerLink]
    broker: EmbeddedBroker | None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    seen: dict[str, float] = field(default_factory=dict)  # path -> when applied


async def _no_effects(effects: list[Effect]) -> None:
    return None


async def build(name: str, pki_dir: Path, amqtt: bool, on_apply: Callable[[str, Manifest], None]
                ) -> BenchNode:
    creds = pki.load_node(pki_dir, name)
    broker = None
    if amqtt:
        broker = EmbeddedBroker(BrokerSettings(creds, host_of(name), PORT))
        await broker.start()
    index = Index(":memory:")
    links: list[PeerLink] = []

    async def request(peer: str, payload: bytes) -> None:
        for link in links:
            if link.status.peer_id == peer:
                await link.request(payload)

    async def on_request(topic: str, payload: bytes) -> None:
        await exchange.on_request(topic.rsplit("/", 1)[-1], payload)

    own = OwnClient(creds=creds, host=host_of(name), port=PORT, on_request=on_request)

    async def publish(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        await own.publish(topic, payload, qos, retain)

    exchange = Exchange(name, "bench", Replica(name, index), index, 1, publish=publish,
                        request=request, on_effects=_no_effects, quiet=0.002, cap=0.01,
                        on_manifest=on_apply)
    for peer in NAMES:
        if peer != name:
            def handler(p: str = peer) -> Callable[[str, bytes], object]:
                async def on_message(topic: str, payload: bytes) -> None:
                    await exchange.on_peer_message(p, topic, payload)
                return on_message
            links.append(PeerLink(creds=creds, host=host_of(peer), port=PORT,
                                  on_message=handler(), expect_peer=peer))  # type: ignore[arg-type]
    node = BenchNode(name, exchange, own, links, broker)
    node.tasks = [asyncio.create_task(c) for c in
                  (own.run(), exchange.run_flusher(), exchange.run_heads(),
                   *(link.run() for link in links))]
    return node


async def stop(nodes: list[BenchNode]) -> None:
    for n in nodes:
        for t in n.tasks:
            t.cancel()
        await asyncio.gather(*n.tasks, return_exceptions=True)
        if n.broker is not None:
            await n.broker.stop()
        n.exchange.index.close()


def announce(node: BenchNode, start: int, count: int, stamp: dict[str, float]) -> None:
    ex = node.exchange
    with ex.index.batch():
        for i in range(start, start + count):
            path = f"d{i % 100}/f{i}"
            e = Entry(path, VersionVector.of({node.name: 1}), i.to_bytes(32, "big"), 1024,
                      0, 0o644, Kind.FILE, i + 1, node.name)
            v = Version((e,))
            ex.index.set_state(path, PathState(v, None))
            stamp[path] = time.perf_counter()
            ex.announce(v)


async def wait_until(cond: Callable[[], bool], limit: float) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark did not complete in time")
        await asyncio.sleep(0.005)


async def scenario(pki_dir: Path, amqtt: bool, paths: int, rate: int, seconds: float
                   ) -> dict[str, float]:
    applied: dict[str, dict[str, float]] = {n: {} for n in NAMES}

    def recorder(name: str) -> Callable[[str, Manifest], None]:
        def on_apply(peer: str, m: Manifest) -> None:
            now = time.perf_counter()
            for e in m.entries:
                applied[name][e.path] = now
        return on_apply

    nodes = [await build(n, pki_dir, amqtt, recorder(n)) for n in NAMES]
    try:
        await wait_until(lambda: all(link.status.state.value == "up"
                                     for n in nodes for link in n.links), 30)
        await asyncio.sleep(1.5)  # first-contact resyncs settle
        n1 = nodes[0]
        stamp: dict[str, float] = {}
        # Throughput: announce in chunks, measure until both peers applied all.
        started = time.perf_counter()
        for chunk in range(0, paths, 5000):
            announce(n1, chunk, min(5000, paths - chunk), stamp)
            await asyncio.sleep(0)
        await wait_until(lambda: all(len(applied[n]) >= paths for n in ("n2", "n3")), 300)
        took = time.perf_counter() - started
        # Latency at a steady rate: one path every 1/rate s.
        for n in NAMES:
            applied[n].clear()
        stamp.clear()
        total = int(rate * seconds)
        t0 = time.perf_counter()
        for i in range(total):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            announce(n1, 10_000_000 + i, 1, stamp)
        await wait_until(lambda: all(len(applied[n]) >= total for n in ("n2", "n3")), 60)
        lat = sorted((applied[n][p] - stamp[p]) * 1000 for n in ("n2", "n3") for p in stamp)
        return {
            "paths_s": paths / took,
            "p50_ms": statistics.median(lat),
            "p99_ms": lat[int(len(lat) * 0.99) - 1],
            "max_ms": lat[-1],
        }
    finally:
        await stop(nodes)


MOSQUITTO_CONF = """\
listener {port} {host}
cafile {pki}/ca.crt
certfile {pki}/{name}.crt
keyfile {pki}/{name}.key
require_certificate true
use_identity_as_username true
persistence false
max_inflight_messages 100
max_queued_messages 100000
max_packet_size 1048576
log_dest none
user {user}
"""


@contextlib.contextmanager
def mosquittos(pki_dir: Path, work: Path):  # type: ignore[no-untyped-def]
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    procs = []
    try:
        for name in NAMES:
            conf = work / f"mosquitto-{name}.conf"
            # user: as root, mosquitto would switch to "mosquitto", which cannot read
            # the 0700 PKI folder; stay who we are.
            conf.write_text(MOSQUITTO_CONF.format(port=PORT, host=host_of(name), pki=pki_dir,
                                                  name=name, user=getpass.getuser()))
            procs.append(subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        time.sleep(0.5)
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError("mosquitto did not start")
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


def run(pki_dir: Path, amqtt: bool, uvloop_on: bool, args: argparse.Namespace
        ) -> dict[str, float]:
    factory = None
    if uvloop_on:
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(scenario(pki_dir, amqtt, args.paths, args.rate, args.seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paths", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pki_dir = work / "pki"
        pki.init_ca(pki_dir, "bench")
        pki.issue(pki_dir, NAMES, ip_addresses=[host_of(n) for n in NAMES])
        print(f"meshsync mesh benchmark: 3 nodes, {args.paths:,} paths announced by n1, "
              f"latency at {args.rate}/s for {args.seconds:g} s; {os.cpu_count()} cores")
        print(f"{'broker':<10}{'loop':<9}{'paths/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
        for amqtt in (True, False):
            if not amqtt and not shutil.which("mosquitto") and not Path(
                    "/usr/sbin/mosquitto").exists():
                print("mosquitto not installed: skipped")
                continue
            ctx = contextlib.nullcontext() if amqtt else mosquittos(pki_dir, work)
            with ctx:
                for uv in (True, False):
                    r = run(pki_dir, amqtt, uv, args)
                    print(f"{'amqtt' if amqtt else 'mosquitto':<10}"
                          f"{'uvloop' if uv else 'asyncio':<9}{r['paths_s']:>12,.0f}"
                          f"{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['max_ms']:>9.1f}",
                          flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
