"""The mesh over TLS: announced paths/s node-to-node, and manifest latency.

    .venv/bin/python bench/mqtt_mesh.py [--paths 100000] [--rate 500] [--seconds 10]
        [--runs 3] [--only amqtt/uvloop,mosquitto/uvloop] [--index disk|memory]

Three nodes in one process on 127.0.0.3x, each with its broker, its own client,
links to the two others and an exchange over its own SQLite index on disk — the
agent's code minus the data folder, with the agent's batching defaults. Node n1
announces; n2 and n3 apply. Run four ways in the same run: amqtt (the product)
and Debian's mosquitto (started and stopped here, with TLS, client certificates
and TCP_NODELAY like our own sockets) as the brokers, each with uvloop and with
the default event loop; the client code is the same. With ``--runs N`` the
variants take turns N times and the medians are printed last.

Columns: paths/s and CPU µs per path (this process) while 100,000 paths go
n1 -> n2, n3; manifest latency p50/p99/max at the steady rate; entries per
manifest in both phases; and how long the process waited, runnable, for a CPU
per second of the steady phase (rq ms/s): other work on a shared machine.

All three nodes share one Python process (one core's worth of CPU, beside the
mosquitto processes), so the throughput is a floor for a real mesh, where every
node has its own.

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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mesh import pki
from mesh.adapters.mqtt.broker import BrokerSettings, EmbeddedBroker
from mesh.adapters.mqtt.links import OwnClient, PeerLink
from mesh.core.effects import Effect, PathState
from mesh.core.manifest import Entry, Kind, Manifest
from mesh.core.replica import Replica
from mesh.core.resolver import Version
from mesh.core.vclock import VersionVector
from mesh.engine import gcpolicy
from mesh.engine.exchange import Exchange
from mesh.store.index import Index

NAMES = ["n1", "n2", "n3"]
PORT = 18883


def host_of(name: str) -> str:
    return f"127.0.0.{30 + int(name[1:])}"


@dataclass(frozen=True)
class Options:
    pki_dir: Path
    work: Path
    memory: bool  # an in-memory index instead of a file, as the agent has
    batch: tuple[float, float] | None  # (quiet, cap) instead of the exchange's defaults
    paths: int
    rate: int
    seconds: float


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


async def build(name: str, opts: Options, amqtt: bool,
                on_apply: Callable[[str, Manifest], None]) -> BenchNode:
    creds = pki.load_node(opts.pki_dir, name)
    broker = None
    if amqtt:
        broker = EmbeddedBroker(BrokerSettings(creds, host_of(name), PORT))
        await broker.start()
    state = opts.work / f"{name}-{time.monotonic_ns()}.db"
    index = Index(":memory:" if opts.memory else state)
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

    batching = {} if opts.batch is None else {"quiet": opts.batch[0], "cap": opts.batch[1]}
    # As the agent builds it (mesh.engine.node): the exchange's own batching defaults.
    exchange = Exchange(name, "bench", Replica(name, index), index, 1, publish=publish,
                        request=request, on_effects=_no_effects, on_manifest=on_apply,
                        **batching)  # type: ignore[arg-type]
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


def run_queue_ns() -> int:
    """Nanoseconds this thread has waited, runnable, for a CPU (Linux schedstat): what
    the other work on a shared machine added to the latency. 0 where not known."""
    try:
        stat = Path(f"/proc/self/task/{threading.get_native_id()}/schedstat").read_text()
        return int(stat.split()[1])
    except (OSError, IndexError, ValueError):
        return 0


async def wait_until(cond: Callable[[], bool], limit: float) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark did not complete in time")
        await asyncio.sleep(0.005)


async def scenario(opts: Options, amqtt: bool) -> dict[str, float]:
    paths, rate, seconds = opts.paths, opts.rate, opts.seconds
    applied: dict[str, dict[str, float]] = {n: {} for n in NAMES}

    def recorder(name: str) -> Callable[[str, Manifest], None]:
        def on_apply(peer: str, m: Manifest) -> None:
            now = time.perf_counter()
            for e in m.entries:
                applied[name][e.path] = now
        return on_apply

    nodes = [await build(n, opts, amqtt, recorder(n)) for n in NAMES]
    try:
        await wait_until(lambda: all(link.status.state.value == "up"
                                     for n in nodes for link in n.links), 30)
        await asyncio.sleep(1.5)  # first-contact resyncs settle
        n1 = nodes[0]
        stamp: dict[str, float] = {}
        # Throughput: announce in chunks, measure until both peers applied all.
        started, cpu = time.perf_counter(), time.process_time()
        for chunk in range(0, paths, 5000):
            announce(n1, chunk, min(5000, paths - chunk), stamp)
            await asyncio.sleep(0)
        await wait_until(lambda: all(len(applied[n]) >= paths for n in ("n2", "n3")), 300)
        took = time.perf_counter() - started
        cpu = time.process_time() - cpu
        manifests = n1.exchange.outbox.seq
        # Latency at a steady rate: one path every 1/rate s.
        for n in NAMES:
            applied[n].clear()
        stamp.clear()
        total = int(rate * seconds)
        t0 = time.perf_counter()
        seq0, waited_ns = n1.exchange.outbox.seq, run_queue_ns()
        for i in range(total):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            announce(n1, 10_000_000 + i, 1, stamp)
        waited = (run_queue_ns() - waited_ns) / 1e6 / (time.perf_counter() - t0)
        await wait_until(lambda: all(len(applied[n]) >= total for n in ("n2", "n3")), 60)
        lat = sorted((applied[n][p] - stamp[p]) * 1000 for n in ("n2", "n3") for p in stamp)
        return {
            "paths_s": paths / took,
            # CPU of this process (all three nodes, and amqtt's brokers) per path
            # announced: steadier than paths/s on a shared machine.
            "cpu_us": cpu / paths * 1e6,
            "p50_ms": statistics.median(lat),
            "p99_ms": lat[int(len(lat) * 0.99) - 1],
            "max_ms": lat[-1],
            "per_manifest": paths / max(1, manifests),
            "per_manifest_lat": total / max(1, n1.exchange.outbox.seq - seq0),
            "run_queue_ms_s": waited,
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
set_tcp_nodelay true
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


VARIANTS = [("amqtt", "uvloop"), ("amqtt", "asyncio"), ("mosquitto", "uvloop"),
            ("mosquitto", "asyncio")]
COLUMNS = ("paths_s", "cpu_us", "p50_ms", "p99_ms", "max_ms", "per_manifest", "per_manifest_lat",
           "run_queue_ms_s")


def run(opts: Options, broker: str, loop: str) -> dict[str, float]:
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(scenario(opts, broker == "amqtt"))


def line(broker: str, loop: str, r: dict[str, float]) -> str:
    return (f"{broker:<10}{loop:<9}{r['paths_s']:>12,.0f}{r['cpu_us']:>8.1f}{r['p50_ms']:>9.1f}"
            f"{r['p99_ms']:>9.1f}{r['max_ms']:>9.1f}{r['per_manifest']:>9.0f}"
            f"{r['per_manifest_lat']:>9.1f}{r['run_queue_ms_s']:>8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paths", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=1, help="turns of every variant")
    parser.add_argument("--only", default="", help="e.g. amqtt/uvloop,mosquitto/uvloop")
    parser.add_argument("--index", choices=("disk", "memory"), default="disk")
    parser.add_argument("--batch", default=None,
                        help="QUIET,CAP seconds instead of the exchange's defaults")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)
    variants = [v for v in VARIANTS if not args.only or "/".join(v) in args.only.split(",")]
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        print("mosquitto not installed: skipped")
        variants = [v for v in variants if v[0] != "mosquitto"]
    batch = None if args.batch is None else tuple(float(x) for x in args.batch.split(","))
    gcpolicy.tune()  # as the agent does once started (mesh.engine.agent.run_agent)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        opts = Options(work / "pki", work, args.index == "memory", batch,  # type: ignore[arg-type]
                       args.paths, args.rate, args.seconds)
        pki.init_ca(opts.pki_dir, "bench")
        pki.issue(opts.pki_dir, NAMES, ip_addresses=[host_of(n) for n in NAMES])
        print(f"meshsync mesh benchmark: 3 nodes, {args.paths:,} paths announced by n1, "
              f"latency at {args.rate}/s for {args.seconds:g} s; {os.cpu_count()} cores; "
              f"index {args.index}; load {os.getloadavg()[0]:.2f}")
        print(f"{'broker':<10}{'loop':<9}{'paths/s':>12}{'cpu µs':>8}{'p50 ms':>9}{'p99 ms':>9}"
              f"{'max ms':>9}{'e/m thr':>9}{'e/m lat':>9}{'rq ms/s':>8}")
        results: dict[tuple[str, str], list[dict[str, float]]] = {v: [] for v in variants}
        for _ in range(args.runs):
            for broker in ("amqtt", "mosquitto"):
                todo = [v for v in variants if v[0] == broker]
                if not todo:
                    continue
                ctx = mosquittos(opts.pki_dir, work) if broker == "mosquitto" else (
                    contextlib.nullcontext())
                with ctx:
                    for v in todo:
                        r = run(opts, *v)
                        results[v].append(r)
                        print(line(*v, r), flush=True)
        if args.runs > 1:
            print(f"median of {args.runs} runs; load {os.getloadavg()[0]:.2f}")
            for v, rs in results.items():
                med = {k: statistics.median(r[k] for r in rs) for k in COLUMNS}
                print(line(*v, med), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
