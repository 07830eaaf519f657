"""A compromised node (issue 13): ``n9`` holds a certificate of the cluster CA (``mesh pki
issue``) and the two honest agents take it for a peer; ``n8`` holds one too and is
nobody's peer. Each attack of the issue that is not about the data plane's own file
operations is made here, through the real broker and the real tunnel, and must be
refused, logged once, and leave both honest agents running and syncing.

The honest agents are processes (``tests.cluster``, on 127.0.31.x behind proxies on
127.0.32.x); the attackers run in this process, on an event loop of their own, with
meshsync's own parts put to hostile use: a broker, a client and an exchange (so n9
answers catch-ups like any node), and the push client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import pytest

from mesh import pki
from mesh.adapters.mqtt.broker import BrokerSettings, EmbeddedBroker
from mesh.adapters.mqtt.connection import LinkDown
from mesh.adapters.mqtt.links import OwnClient
from mesh.adapters.rsync.push import PushOrder, push
from mesh.core import manifest, wire
from mesh.core.effects import Effect, PathState
from mesh.core.manifest import Entry, Kind, Manifest
from mesh.core.replica import Replica
from mesh.core.resolver import Version
from mesh.core.vclock import MAX_COUNTER, MAX_HLC, VersionVector, hlc_pack
from mesh.engine.exchange import Exchange
from mesh.errors import MeshError
from mesh.store.index import Index
from tests.cluster import BROKER_PORT, TUNNEL_PORT, Cluster, Node, running, wait_for
from tests.integration.test_conflicts import state_db

pytestmark = pytest.mark.integration

NETS = ("127.0.31", "127.0.32")  # see tests.cluster.Cluster.nets
ATTACKER_HOST = "127.0.33.9"  # n9's broker, which the honest agents link to
STALLED_AFTER = "3"  # the agents' --stalled-after, in seconds
CLUSTER = "test"
T = TypeVar("T")


# --- the attackers ---------------------------------------------------------------------------


async def _no_effects(effects: list[Effect]) -> None:
    return None


class Attacker:
    """A certified node run by the test on a loop of its own: its broker (the honest
    agents link to it), its own client, and an exchange over an empty index that answers
    their catch-ups. What it publishes beyond that is the test's choice."""

    def __init__(self, pki_dir: Path, name: str, host: str | None) -> None:
        self.name = name
        self.creds = pki.load_node(pki_dir, name)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tasks: list[asyncio.Task[None]] = []
        self.broker: EmbeddedBroker | None = None
        self.own: OwnClient | None = None
        self.exchange: Exchange | None = None
        self.index: Index | None = None
        if host is not None:
            self.call(self._serve(host))

    def call(self, coro: Coroutine[Any, Any, T], within: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(within)

    async def _serve(self, host: str) -> None:
        self.broker = EmbeddedBroker(BrokerSettings(self.creds, host, BROKER_PORT))
        await self.broker.start()
        self.index = Index(":memory:")
        self.exchange = Exchange(self.name, CLUSTER, Replica(self.name, self.index), self.index,
                                 1, publish=self._publish, request=self._request,
                                 on_effects=_no_effects)
        self.own = OwnClient(creds=self.creds, host=host, port=BROKER_PORT,
                             on_request=self._on_request)
        self.tasks.append(asyncio.create_task(self.own.run()))
        await self.own.wait_up(10)
        self.tasks += [asyncio.create_task(self.exchange.run_heads()),
                       asyncio.create_task(self.exchange.run_flusher())]

    async def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        assert self.own is not None
        await self.own.publish(topic, payload, qos, retain)

    async def _request(self, peer: str, payload: bytes) -> None:
        raise LinkDown("the attacker asks nothing")

    async def _on_request(self, topic: str, payload: bytes) -> None:
        assert self.exchange is not None
        await self.exchange.on_request(topic.rsplit("/", 1)[-1], payload)

    # --- what it sends ------------------------------------------------------------------

    def announce(self, entries: list[Entry], conflicts: tuple[tuple[Entry, Entry], ...] = ()
                 ) -> None:
        """A manifest of these entries, next in n9's stream (so it is applied in order)."""
        assert self.exchange is not None
        payload = self.exchange.outbox.next(tuple(entries), conflicts)
        self.publish(self.exchange.topics.manifest, payload)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.call(self._publish(topic, payload, qos, retain))

    async def spray(self, topic: str, payloads: list[bytes], done: threading.Event) -> int:
        """``payloads`` on ``topic`` over and over until ``done``, each acknowledged by our
        broker before the next (as fast as a subscriber keeps up); how many went out."""
        assert self.own is not None
        sent = 0
        while not done.is_set():
            for payload in payloads:
                try:
                    await self.own.publish(topic, payload, 1, False)
                    sent += 1
                except LinkDown:
                    await self.own.wait_up(10)
        return sent

    def hello(self, tunnel_port: int) -> None:
        """A new retained hello: where n9 says its tunnel listens."""
        assert self.exchange is not None
        hello = wire.Hello(self.name, 1, "0.1.0", tunnel_port, int(time.time() * 1000))
        self.publish(self.exchange.topics.hello, wire.encode(hello), retain=True)

    def push(self, to: Node, push_id: str, paths: list[str], header: bytes, source: Path
             ) -> int:
        """A push into ``to``'s tunnel, straight to its address; rsync's exit status, or
        -1 when the receiver refused it before rsync ran."""
        order = PushOrder(to.name, to.host, TUNNEL_PORT, push_id, tuple(paths), header)
        try:
            return self.call(push(order, source, self.creds))
        except MeshError:
            return -1

    def close(self) -> None:
        async def stop() -> None:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            if self.broker is not None:
                await self.broker.stop()
            if self.index is not None:
                self.index.close()

        with contextlib.suppress(Exception):
            self.call(stop(), within=20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def hostile_mesh(base: Path) -> Iterator[tuple[Cluster, Attacker]]:
    """n1 and n2, honest agents that also link to n9, started and linked."""
    with running(base, size=2, start=False, nets=NETS,
                 extra_args=["--stalled-after", STALLED_AFTER],
                 extra_peers=[f"{ATTACKER_HOST}:{BROKER_PORT}"]) as cluster:
        pki_dir = base / "pki"
        subprocess.run([sys.executable, "-m", "mesh", "pki", "issue", "n9", "n8", "--dir",
                        str(pki_dir), "--ip", ATTACKER_HOST], check=True, capture_output=True)
        n9 = Attacker(pki_dir, "n9", ATTACKER_HOST)
        try:
            cluster.start_all()
            wait_for(lambda: all(n.up_peers() == 2 for n in cluster.nodes), 30,
                     "n1 and n2 linked to each other and to n9")
            yield cluster, n9
        finally:
            n9.close()


# --- what the tests look at ------------------------------------------------------------------


def log_lines(node: Node, *parts: str) -> list[str]:
    text = node.log.read_text(errors="replace")
    return [line for line in text.splitlines() if all(p in line for p in parts)]


def logged_once(node: Node, *parts: str, within: float = 20) -> str:
    """Wait for a line of ``node``'s log holding every part; there must be exactly one."""
    wait_for(lambda: bool(log_lines(node, *parts)), within, f"{parts} in {node.name}'s log")
    lines = log_lines(node, *parts)
    assert len(lines) == 1, lines[:5]
    return lines[0]


def still_syncing(cluster: Cluster, tag: str) -> None:
    """Both honest agents run, and a new file written on each reaches the other."""
    n1, n2 = cluster.nodes
    assert n1.alive() and n2.alive()
    for node in (n1, n2):
        (node.data / f"{tag}-{node.name}.txt").write_text(f"{tag} from {node.name}\n")
    wait_for(lambda: all((n.data / f"{tag}-{m.name}.txt").is_file()
                         and (n.data / f"{tag}-{m.name}.txt").read_text()
                         == f"{tag} from {m.name}\n" for n in (n1, n2) for m in (n1, n2)),
             30, f"{tag} files on both nodes")
    for node in (n1, n2):
        assert not log_lines(node, "Traceback"), log_lines(node, "Traceback")[:3]


def written(src: Node, dst: Node, name: str, text: str) -> None:
    """``text`` written at ``name`` on ``src``, and there on ``dst`` too."""
    (src.data / name).write_text(text)
    wait_for(lambda: (dst.data / name).is_file() and (dst.data / name).read_text() == text,
             30, f"{name} from {src.name} on {dst.name}")


def indexed(node: Node, paths: list[str]) -> list[str]:
    """Which of ``paths`` any table of ``node``'s index names."""
    with state_db(node) as db:
        found = set()
        for table in ("versions", "targets", "peer_vectors", "conflicts"):
            found |= {p for (p,) in db.execute(f"SELECT path FROM {table}")}
    return sorted(found & set(paths))


def now_hlc() -> int:
    return hlc_pack(time.time_ns() // 1_000_000)


def write(path: str, *, hlc: int | None = None, kind: Kind = Kind.FILE, mode: int = 0o644,
          digest: bytes | None = b"\x01" * 32, **vector: int) -> Entry:
    """An entry as n9 makes it up (a tombstone when ``digest`` is None)."""
    if kind is Kind.DIR and digest is not None:
        digest = b""
    return Entry(path, VersionVector.of(vector or {"n9": 1}), digest,
                 0 if digest is None else 5, 0, mode, kind, now_hlc() if hlc is None else hlc,
                 "n9")


def keep_area(node: Node) -> tuple[int, int, list[str]]:
    keep = node.data / ".mesh-keep"
    return (keep.stat().st_mode & 0o7777, (keep / "objects").stat().st_mode & 0o7777,
            sorted(p.name for p in (keep / "objects").iterdir()))


# --- 1. the data root ---------------------------------------------------------------------------


def _file_entry(source: Path, rel: str, mode: int) -> Entry:
    data = (source / rel).read_bytes()
    return Entry(rel, VersionVector.of({"n9": 1}), hashlib.sha256(data).digest(), len(data),
                 (source / rel).stat().st_mtime_ns, mode, Kind.FILE, now_hlc(), "n9")


def test_a_symlinked_folder_never_lets_a_restore_out_of_the_data_root(tmp_path: Path) -> None:
    """Attack 1: n9 makes ``lure`` a symlink to a folder outside the root, then pushes
    ``lure/canary.txt`` (with setuid bits in its mode, and staged under a real folder on
    n9's side). The file outside stays as it was; nothing appears next to it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary.txt").write_text("outside, untouched\n")
    with hostile_mesh(tmp_path) as (cluster, n9):
        n1, _ = cluster.nodes
        first = tmp_path / "attacker-1"
        first.mkdir()
        (first / "lure").symlink_to(outside)
        target = os.fsencode(str(outside))
        link = Entry("lure", VersionVector.of({"n9": 1}), hashlib.sha256(target).digest(),
                     len(target), 0, 0, Kind.SYMLINK, now_hlc(), "n9")
        n9.announce([link])
        wait_for(lambda: indexed(n1, ["lure"]) == ["lure"], 20, "n9's link announced on n1")
        header = manifest.encode(Manifest("n9", 1, 0, (link,)))
        assert n9.push(n1, "n9-1-1", ["lure"], header, first) == 0
        wait_for(lambda: (n1.data / "lure").is_symlink(), 30, "the link on n1")

        second = tmp_path / "attacker-2"
        (second / "lure").mkdir(parents=True)
        (second / "lure" / "canary.txt").write_text("pwned\n")
        (second / "lure" / "canary.txt").chmod(0o4755)
        # rsync stages the bits; what lands is compared with permission bits only
        canary = _file_entry(second, "lure/canary.txt", 0o755)
        n9.announce([canary])
        wait_for(lambda: indexed(n1, ["lure/canary.txt"]) == ["lure/canary.txt"], 20,
                 "the canary announced on n1")
        header = manifest.encode(Manifest("n9", 1, 0, (canary,)))
        assert n9.push(n1, "n9-1-2", ["lure/canary.txt"], header, second) == 0
        logged_once(n1, "restore lure/canary.txt: ", "'lure' on the way is a symlink")
        still_syncing(cluster, "symlink")
        assert (outside / "canary.txt").read_text() == "outside, untouched\n"
        assert sorted(p.name for p in outside.iterdir()) == ["canary.txt"]
        for found in n1.data.rglob("*"):
            if found.is_file() and not found.is_symlink():
                assert found.stat().st_mode & 0o7000 == 0, found


# --- 2. the keep area and the other reserved names -------------------------------------------


def test_names_the_agent_keeps_are_refused_and_the_keep_area_stays_intact(
    tmp_path: Path,
) -> None:
    with hostile_mesh(tmp_path) as (cluster, n9):
        n1, n2 = cluster.nodes
        written(n1, n2, "a.txt", "object A\n")
        before = {n.name: keep_area(n) for n in cluster.nodes}
        object_a = before["n1"][2][0] if before["n1"][2] else "ab" * 32
        n9.announce([
            write(f".mesh-keep/objects/{object_a}", digest=b"\x02" * 32),  # another's bytes
            write(".mesh-keep", kind=Kind.DIR, mode=0o777),
            write("dir/.report.txt.Ab12cd"),
        ])
        n9.announce([write("after.txt", digest=None)])  # the stream goes on behind it
        header = manifest.encode(Manifest("n9", 1, 0, (write(f".mesh-keep/objects/{object_a}"),)))
        source = tmp_path / "n9-data"
        (source / ".mesh-keep" / "objects").mkdir(parents=True)
        (source / ".mesh-keep" / "objects" / object_a).write_text("not object A\n")
        assert n9.push(n1, "n9-1-1", [f".mesh-keep/objects/{object_a}"], header, source) != 0
        for node in (n1, n2):
            logged_once(node, "refused message from n9 on mesh/v1/test/n9/manifest: reserved "
                        "path '.mesh-keep/objects/")
            wait_for(lambda node=node: indexed(node, ["after.txt"]) == ["after.txt"], 20,
                     f"n9's next manifest applied on {node.name}")
            assert indexed(node, [".mesh-keep", f".mesh-keep/objects/{object_a}",
                                  "dir/.report.txt.Ab12cd"]) == []
        logged_once(n1, "tunnel: refused push n9-1-1 from n9:", "reserved path")
        still_syncing(cluster, "keep")
        for node in cluster.nodes:
            mode, objects_mode, objects = keep_area(node)
            assert (mode, objects_mode) == before[node.name][:2], oct(mode)
            assert set(before[node.name][2]) <= set(objects)
            for name in objects:  # every object holds the bytes of its name
                data = (node.data / ".mesh-keep" / "objects" / name).read_bytes()
                assert name == hashlib.sha256(data).hexdigest(), name


# --- 3. the crash loop: counters and clocks ----------------------------------------------------


def test_counters_and_clocks_that_would_overflow_are_refused_before_the_index(
    tmp_path: Path,
) -> None:
    with hostile_mesh(tmp_path) as (cluster, n9):
        n1, n2 = cluster.nodes
        written(n1, n2, "victim.txt", "v1\n")
        n9.announce([
            write("victim.txt", digest=None, n1=MAX_COUNTER, n9=1),  # {victim: 2**63-1}
            write("late-3.txt", hlc=MAX_HLC - 2),
            write("late-1.txt", hlc=MAX_HLC),
            write("fine.txt", digest=None),
        ])
        for node in (n1, n2):
            line = logged_once(node, "refused from n9: 3 path(s):")
            assert "'late-1.txt': clock stamp 9223372036854775807 is" in line, line
            assert "counter 9223372036854775807 of n1 is above" in line, line
            wait_for(lambda node=node: indexed(node, ["fine.txt"]) == ["fine.txt"], 20,
                     f"the rest of the manifest applied on {node.name}")
            assert indexed(node, ["late-1.txt", "late-3.txt"]) == []
            with state_db(node) as db:
                (clock,) = db.execute("SELECT value FROM meta WHERE key = 'clock'").fetchone()
            assert clock < now_hlc() + (600_000 << 16)
        # The next ordinary writes: each ended an honest agent, at every start.
        written(n1, n2, "victim.txt", "v2 from n1\n")
        written(n2, n1, "other.txt", "n2 writes\n")
        assert cluster.stop(n1) == 0
        cluster.start(n1)
        cluster.wait_linked()
        still_syncing(cluster, "restarted")
        assert not log_lines(n1, "OverflowError") and not log_lines(n2, "OverflowError")


@pytest.mark.parametrize("heard", [True, False], ids=["heard", "unheard"])
def test_a_state_poisoned_before_the_bounds_does_not_stop_the_agent(
    tmp_path: Path, heard: bool,
) -> None:
    """What the attacks above left behind in an index of an older release: a clock at
    2**63-3, a version with {n2: 2**63-1} under a file the user edits again, a keep-area
    path. The agent starts, forgets them (one line each), and syncs.

    ``unheard``: n2 stopped before n1's announcement that it holds n2's first write
    reached it (the fresh-clone CI run of d42d146), so nothing stands in for the
    forgotten version; n2's next write must still be new to n1
    (``tests/core/test_simulation.py::test_a_node_that_forgot_a_path_never_reuses_its_counter``)."""
    with hostile_mesh(tmp_path) as (cluster, _):
        n1, n2 = cluster.nodes
        written(n2, n1, "p.txt", "before\n")
        assert cluster.stop(n2) == 0
        index = Index(n2.state / "state.db")
        with index.batch():
            if not heard:
                index.db.execute("DELETE FROM peer_vectors WHERE path = 'p.txt'")
            # An older release's state: it never had the one-time purge of this one.
            index.db.execute("DELETE FROM meta WHERE key = 'purged'")
            index.set_meta("clock", MAX_HLC - 2)
            poisoned = write("p.txt", digest=None, n2=MAX_COUNTER, n9=1)
            index.set_state("p.txt", PathState(Version((poisoned,)), None))
            index.set_state(".mesh-keep/objects/x", PathState(Version((write(
                ".mesh-keep/objects/x"),)), None))
        index.close()
        (n2.data / "p.txt").write_text("after, on n2\n")
        cluster.start(n2)
        logged_once(n2, "state: the persisted clock 9223372036854775805 is")
        logged_once(n2, "state: forgot 2 versions")
        wait_for(lambda: (n1.data / "p.txt").read_text() == "after, on n2\n", 30,
                 "n2's edit of p.txt on n1")
        still_syncing(cluster, "poisoned")


# --- 4. answering for another node -----------------------------------------------------------


def test_a_reply_counts_only_from_the_node_asked(tmp_path: Path) -> None:
    """n2 frozen, `mesh verify` on n1 asks it; n9 sprays answers for every request id it
    can think of on its response topic to n1: n2 must come out unreachable, not holding
    what n9 made up."""
    with hostile_mesh(tmp_path) as (cluster, n9):
        n1, n2 = cluster.nodes
        assert n9.exchange is not None
        topic = n9.exchange.topics.resp("n1")
        made_up = Entry("made-up.txt", VersionVector.of({"n2": 1}), b"\x07" * 32, 9, 0,
                        0o644, Kind.FILE, now_hlc(), "n2")
        answers = [wire.encode(reply) for rid in range(1, 201)  # the old ids were 1, 2, 3...
                   for reply in (wire.TreeReply(rid, (("", 12345, 1),), True),
                                 wire.EntriesReply(rid, (made_up,), True))]
        done = threading.Event()
        cluster.pause(n2)
        try:
            verify = subprocess.Popen([sys.executable, "-m", "mesh", "verify", "--json",
                                       "--state-dir", str(n1.state)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            spray = asyncio.run_coroutine_threadsafe(n9.spray(topic, answers, done), n9.loop)
            try:
                out, _ = verify.communicate(timeout=60)
            finally:
                done.set()
                sent = spray.result(30)
        finally:
            cluster.resume(n2)
        assert sent >= len(answers), sent  # every guess went out at least once
        result = json.loads(out)
        assert "n2" in result["unreachable"], result
        assert "n2" not in result["paths"], result
        assert not any("n2" in d["held"] for d in result["differences"]), result
        still_syncing(cluster, "verify")


# --- 5. pushes from a stranger, and headers saying more than was announced ----------------------


def test_pushes_come_only_from_current_peers_and_as_announced(tmp_path: Path) -> None:
    with hostile_mesh(tmp_path) as (cluster, n9):
        n1, _ = cluster.nodes
        source = tmp_path / "attacker-data"
        source.mkdir()
        for name in ("stranger.txt", "unannounced.txt", "announced.txt"):
            (source / name).write_text(f"{name} from an attacker\n")
        n8 = Attacker(tmp_path / "pki", "n8", None)  # certified, in nobody's --peers
        try:
            header = manifest.encode(Manifest("n8", 1, 0, (write("stranger.txt"),)))
            assert n8.push(n1, "n8-1-1", ["stranger.txt"], header, source) != 0
        finally:
            n8.close()
        logged_once(n1, "tunnel: refused push from n8 (", "not a peer of this node")
        header = manifest.encode(Manifest("n9", 1, 0, (write("unannounced.txt"),)))
        assert n9.push(n1, "n9-1-1", ["unannounced.txt"], header, source) != 0
        logged_once(n1, "tunnel: refused push n9-1-1 from n9: push n9-1-1 holds what n9 never "
                    "announced: 1 path(s): 'unannounced.txt': never announced")
        # What n9 did announce it can push: a certified peer writes inside the data root.
        data = (source / "announced.txt").read_bytes()
        entry = Entry("announced.txt", VersionVector.of({"n9": 1}),
                      hashlib.sha256(data).digest(), len(data),
                      (source / "announced.txt").stat().st_mtime_ns, 0o644, Kind.FILE,
                      now_hlc(), "n9")
        n9.announce([entry])
        wait_for(lambda: indexed(n1, ["announced.txt"]) == ["announced.txt"], 20,
                 "n9's announcement on n1")
        header = manifest.encode(Manifest("n9", 1, 0, (entry,)))
        assert n9.push(n1, "n9-1-2", ["announced.txt"], header, source) == 0
        wait_for(lambda: (n1.data / "announced.txt").is_file(), 30, "announced.txt on n1")
        for name in ("stranger.txt", "unannounced.txt"):
            assert not (n1.data / name).exists()
        still_syncing(cluster, "pushes")


# --- 6. floods --------------------------------------------------------------------------------


def test_floods_are_one_line_not_one_per_packet(tmp_path: Path) -> None:
    with hostile_mesh(tmp_path) as (cluster, n9):
        n1, n2 = cluster.nodes
        for i in range(3):  # 1.2 MB of zeros: 600,000 reserved packets (type 0), each time
            n9.call(_zeros_after_connect(n9.creds, n1.host, f"n9/flood{i}"))
        assert n9.exchange is not None
        for _ in range(300):
            n9.publish(n9.exchange.topics.manifest, b"\xc1" * 16)
        wait_for(lambda: len(log_lines(n1, "reserved packet type 0")) == 3, 20,
                 "three cut connections")
        logged_once(n1, "refused message from n9 on mesh/v1/test/n9/manifest: undecodable")
        logged_once(n2, "refused message from n9 on mesh/v1/test/n9/manifest: undecodable")
        still_syncing(cluster, "flood")
        assert log_lines(n1, "Received reserved packet") == []
        assert len(log_lines(n1, "refused message from n9")) == 1


async def _zeros_after_connect(creds: pki.NodeCredentials, host: str, client_id: str) -> None:
    reader, writer = await asyncio.open_connection(
        host, BROKER_PORT, ssl=pki.client_ssl_context(creds))
    try:
        body = (b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big")
                + client_id.encode())
        writer.write(bytes([0x10, len(body)]) + body)
        assert await reader.readexactly(4) == b"\x20\x02\x00\x00"
        writer.write(bytes(1_200_000))
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.drain()
            await reader.read()
    finally:
        writer.transport.abort()


# --- 7. health -------------------------------------------------------------------------------


def test_one_peer_cannot_hold_health_down_for_good(tmp_path: Path) -> None:
    """n9 announces 200 files whose content never comes, and advertises a tunnel nobody
    can push to: past --stalled-after both are reported and no longer count."""
    with hostile_mesh(tmp_path) as (cluster, n9):
        n1, _ = cluster.nodes
        n9.hello(TUNNEL_PORT)  # nothing listens there
        wait_for(lambda: "n9" in (n1.status() or {}).get("pushes", {}).get("pending", {}), 20,
                 "n9 among the peers n1 pushes to")
        n9.announce([write(f"phantom/{i}.bin", digest=bytes([i % 256]) * 32)
                     for i in range(200)])
        for i in range(5):
            (n1.data / f"for-everyone-{i}.txt").write_text(f"{i}\n")

        def health() -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "mesh", "health", "--state-dir",
                                   str(n1.state)], capture_output=True, text=True)

        def stalled() -> dict[str, Any]:
            doc = n1.status()
            return {} if doc is None else dict(doc["stalled"])

        wait_for(lambda: stalled().get("content", {}).get("n9") == 200
                 and "n9" in stalled().get("queues", {}), 60, "n9's stalls on n1")
        doc = n1.status()
        assert doc is not None and doc["pending_content"] >= 200  # over --max-lag 100
        result = health()
        assert result.returncode == 0, result.stderr
        assert "stalled, not counted: 200 paths n9 announced have not come" in result.stdout
        assert "paths queued for n9 have not moved for" in result.stdout
        logged_once(n1, "content of 200 paths has not come for 3 s (n9 announced it")
        logged_once(n1, "queued for n9 have not moved for")
        still_syncing(cluster, "health")


def test_the_attack_values_pass_the_codec() -> None:
    """The crash-loop values are valid entries: the refusals above come from the bounds
    (mesh.core.admit), not from the codec."""
    payload = manifest.encode(Manifest("n9", 1, 1, (write("t", hlc=MAX_HLC, n1=MAX_COUNTER),)))
    assert msgpack.unpackb(payload)["n"][0][7] == MAX_HLC
