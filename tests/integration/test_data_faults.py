"""Faults of the data plane on real agents: a node away while its peers change a thousand
paths, an empty node joining, a receiver killed in the middle of a transfer, the gate
facing a newer version, and a push landing on an edit nobody has scanned yet (DESIGN.md,
"Data plane" and "the race to design for"; invariants 1, 2 and 5).

Three agents as processes (``tests.cluster``), real lsyncd, real rsync over TLS.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import msgpack
import pytest

from mesh.adapters.fs.listing import PREHASH_BYTES
from mesh.adapters.fs.scanner import Scanner
from mesh.adapters.fs.watcher import Watcher
from mesh.adapters.lsyncd.call import target_of
from mesh.adapters.lsyncd.supervisor import GATE
from mesh.core import manifest
from mesh.core.effects import Effect, PathState
from mesh.core.manifest import Entry, Kind, Manifest
from mesh.core.replica import Replica
from mesh.core.resolver import Version
from mesh.core.vclock import VersionVector, hlc_pack
from mesh.engine.dataplane import DataPlane
from mesh.engine.keep import KeepArea
from mesh.engine.pushes import Pushes
from mesh.store.index import Index
from tests.cluster import Cluster, Node, running, wait_for
from tests.integration.test_conflicts import (
    check_kept,
    conflicts,
    leftovers,
    lsyncd_kept,
    lsyncd_of,
    same_everywhere,
    seed,
    sha,
    state_db,
    versions,
    wait_resolved,
)

pytestmark = pytest.mark.integration

NETS = ("127.0.9", "127.0.10")  # see tests.cluster.Cluster.nets
BIG_MIB = 128  # a transfer that lasts long enough to be caught in the middle


def log_since(node: Node, offset: int) -> str:
    with node.log.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def keeps_everything(tree: dict[str, tuple[str, int, str]],
                     before: dict[str, tuple[str, int, str]]) -> bool:
    return all(tree.get(p) == v for p, v in before.items())


# --- a node away, a node new ------------------------------------------------------------


def test_node_stopped_while_peers_change_a_thousand_paths_catches_up(tmp_path: Path) -> None:
    with running(tmp_path, nets=NETS) as cluster:
        n1, n2, n3 = cluster.nodes
        base = {f"base/{i // 100}/f{i}.txt": f"base {i}\n".encode() for i in range(2000)}
        write_files(n1.data, base)
        wait_for(lambda: same_everywhere(cluster, []) and len(versions(n3)) >= 2020, 90,
                 "the base everywhere")
        assert cluster.stop(n3) == 0  # SIGTERM: a clean stop
        names = sorted(base)
        changes = 0
        for k, node in enumerate((n1, n2)):
            mine = names[k * 250:(k + 1) * 250]  # 125 edits and 125 deletes each
            write_files(node.data, {p: f"edited on {node.name}: {p}\n".encode()
                                    for p in mine[:125]})
            for p in mine[125:]:
                (node.data / p).unlink()
            write_files(node.data, {f"new/{node.name}/g{i}.bin": os.urandom(64 + i)
                                    for i in range(250)})
            changes += 500
        assert changes == 1000
        wait_for(lambda: cluster.converged([n1, n2]), 90, "n1 and n2 alike")
        offset = n3.log.stat().st_size
        cluster.start(n3)
        wait_for(lambda: same_everywhere(cluster, names[:500]), 120, "n3 caught up")
        assert len(cluster.tree(n3)) == len(cluster.tree(n1))
        log = log_since(n3, offset)
        for peer in (n1, n2):
            caught = re.search(rf"caught up with {peer.name}: \d+ buckets differed, (\d+) "
                               "entries", log)
            assert caught is not None, f"no resync with {peer.name} in n3's log"
            # Only the buckets that differ travel, not the peer's whole index.
            assert int(caught.group(1)) < len(versions(peer))


def test_empty_node_joining_deletes_nothing(tmp_path: Path) -> None:
    with running(tmp_path, start=False, nets=NETS) as cluster:
        n1, n2, n3 = cluster.nodes
        cluster.start(n1)
        cluster.start(n2)
        cluster.wait_linked([n1, n2])
        write_files(n1.data, {f"n1/{i}.txt": f"one {i}\n".encode() for i in range(50)})
        write_files(n2.data, {f"n2/deep/{i}.txt": f"two {i}\n".encode() for i in range(50)})
        (n2.data / "n2" / "link").symlink_to("deep/1.txt")
        wait_for(lambda: cluster.converged([n1, n2]), 60, "n1 and n2 alike")
        before = cluster.tree(n1)
        assert len(before) == 50 + 50 + 4
        cluster.start(n3)  # empty data folder, fresh state

        def joined() -> bool:
            for node in (n1, n2):
                assert keeps_everything(cluster.tree(node), before), f"{node.name} lost data"
            return cluster.tree(n3) == before and same_everywhere(cluster, [])

        wait_for(joined, 60, "n3 holding everything", step=0.2)
        assert cluster.tree(n1) == cluster.tree(n2) == before


# --- a receiver killed in the middle of a transfer --------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
                if int(fields[1]) == pid:
                    out.append(int(entry.name))
    return out


def crash(cluster: Cluster, node: Node) -> None:
    """SIGKILL the agent and everything it runs, at one instant, like a container dying:
    the tunnel's rsync daemons run in process groups of their own."""
    assert node.proc is not None
    groups = [node.proc.pid, *(os.getpgid(p) for p in _children(node.proc.pid))]
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGSTOP)
    for group in groups[1:]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    cluster.kill(node)


def test_receiver_killed_mid_transfer_adopts_no_partial_file(tmp_path: Path) -> None:
    with running(tmp_path, nets=NETS) as cluster:
        n1, n2, _ = cluster.nodes
        digest = hashlib.sha256()
        with (n1.data / "big.bin").open("wb") as f:
            for i in range(BIG_MIB):
                chunk = i.to_bytes(8, "big") + os.urandom((1 << 20) - 8)
                digest.update(chunk)
                f.write(chunk)
        full = digest.hexdigest()
        temp = re.compile(r"\.big\.bin\.[A-Za-z0-9]{6}")

        def receiving() -> bool:  # rsync's temp file, in the push's staging dir
            return any(temp.fullmatch(p.name) and p.stat().st_size >= 1 << 20
                       for p in (n2.data / ".mesh-keep" / "in").glob("*/*"))

        wait_for(receiving, 60, "n2 receiving big.bin", step=0.01)
        crash(cluster, n2)
        assert not (n2.data / "big.bin").exists(), "the transfer had finished: use a bigger file"
        cluster.start(n2)

        def partial_never_indexed() -> bool:
            for node in cluster.nodes:
                row = versions(node, ["big.bin"]).get("big.bin")
                assert row is None or row.hashes == (full,), f"{node.name} indexed {row}"
            # No partial file and no unfinished push anywhere (pushes that lsyncd
            # retries after n2 came back may still be landing: wait for them).
            return same_everywhere(cluster, ["big.bin"]) and all(
                cluster.tree(n) == {"big.bin": ("file", 0o644, full)} and not leftovers(n)
                for n in cluster.nodes)

        wait_for(partial_never_indexed, 120, "big.bin everywhere", step=0.5)
        written = versions(n1)["big.bin"].vector
        assert list(written) == ["n1"], written
        for node in cluster.nodes:
            # Only n1 ever wrote it, once: a partial file adopted as n2's edit would show
            # in the vector even after a later repair.
            assert versions(node)["big.bin"].vector == written, node.name
            assert conflicts(node) == {}, node.name


# --- the gate ---------------------------------------------------------------------------


def _cut_into(cluster: Cluster, node: Node) -> None:
    """Nobody reaches ``node`` (no push lands, nobody reads its broker); ``node`` still
    reaches everyone, so it hears every announcement."""
    for other in cluster.nodes:
        if other is not node:
            cluster.proxies.set_mode((other.index, node.index), "refuse")


def _denied(node: Node) -> int:
    doc = node.status()
    return -1 if doc is None else int(doc["pushes"]["denied"])


def _counters(node: Node, peer: str, *, since: float = 0.0) -> dict[str, int]:
    """``node``'s push counters for ``peer`` (lsyncd's batches and its own pushes) and its
    gate's, from a status file it wrote after ``since`` (it rewrites it every second)."""
    def written() -> bool:
        doc = node.status()
        return doc is not None and doc["now"] > since and peer in doc["pushes"]["by_peer"]

    wait_for(written, 30, f"{node.name}'s status after {since}")
    doc = node.status()
    assert doc is not None
    gate = {f"gate_{name}": value for name, value in doc["gate"].items()}
    return {**doc["pushes"]["by_peer"][peer], **gate}


def _run_gate(node: Node, peer: str, paths: list[str]) -> subprocess.CompletedProcess[bytes]:
    """Hand ``node``'s agent a batch for ``peer`` the way lsyncd does: run the gate
    (``lsyncd/gate.pl``) with lsyncd's rsync command line (``default.rsync``, as
    ``mesh.adapters.lsyncd.supervisor`` describes it) and the include patterns on stdin,
    ``MESH_GATE_SOCKET`` naming the agent's socket. The gate answers when the agent's
    push, if any, is over."""
    argv = [str(GATE), "-plogstD", "-r", "--delete", "--ignore-errors", "--force", "--from0",
            "--include-from=-", "--exclude=*", f"{node.data}/", target_of(peer)]
    patterns = b"\0".join([b"/", *(b"/" + os.fsencode(p) for p in paths)])
    env = {"PATH": os.environ["PATH"], "MESH_GATE_SOCKET": str(node.state / "gate.sock")}
    return subprocess.run(argv, input=patterns, capture_output=True, env=env, timeout=60,
                          check=False)


def test_gate_never_lets_an_older_version_overwrite_a_newer_one(tmp_path: Path) -> None:
    with running(tmp_path, nets=NETS) as cluster:
        n1, n2, n3 = cluster.nodes
        seed(cluster, n1, "doc.txt", b"v1\n")
        before = {n.name: lsyncd_of(n) for n in cluster.nodes}
        _cut_into(cluster, n1)
        lsyncd_kept(cluster, before)
        newer = b"v2, written on n2\n"
        (n2.data / "doc.txt").write_bytes(newer)

        def n1_heard_but_holds_v1() -> bool:
            with state_db(n1) as db:
                heard = db.execute("SELECT vector FROM peer_vectors WHERE peer = 'n2' "
                                   "AND path = 'doc.txt'").fetchone()
            held = versions(n1, ["doc.txt"])["doc.txt"].vector
            return (heard is not None and msgpack.unpackb(heard[0]).keys() == {"n1", "n2"}
                    and msgpack.unpackb(heard[0])["n1"] == held["n1"] and list(held) == ["n1"]
                    and (n3.data / "doc.txt").read_bytes() == newer)

        # n2 announced a version that dominates n1's; n1 cannot have it.
        wait_for(n1_heard_but_holds_v1, 30, "n1 to hear of v2 while holding v1")
        # The gate's answer itself, asked the way lsyncd asks it: the batch is done (exit
        # 0, nothing for lsyncd's log) and the agent let nothing go: its one path denied,
        # no push carried nor failed.
        for peer in ("n2", "n3"):
            counted = _counters(n1, peer, since=time.time())  # a status from now on
            gate = _run_gate(n1, peer, ["doc.txt"])
            assert (gate.returncode, gate.stderr) == (0, b""), gate
            expected = {**counted, "denied": counted["denied"] + 1,
                        "gate_batches": counted["gate_batches"] + 1}
            assert _counters(n1, peer, since=time.time()) == expected, peer
        # And lsyncd firing on n1's older copy (a touch: same content, new mtime).
        denied = _denied(n1)
        os.utime(n1.data / "doc.txt")
        wait_for(lambda: _denied(n1) >= denied + 2, 30, "n1's gate to be asked for both peers")
        for node in (n2, n3):
            assert (node.data / "doc.txt").read_bytes() == newer, node.name
        cluster.heal()
        wait_for(lambda: same_everywhere(cluster, ["doc.txt"]), 60, "v2 everywhere")
        assert (n1.data / "doc.txt").read_bytes() == newer
        assert all(conflicts(node) == {} for node in cluster.nodes)


# --- the race to design for -------------------------------------------------------------


def test_push_landing_on_an_unscanned_edit_keeps_the_edit(tmp_path: Path) -> None:
    """DESIGN.md "the race to design for": n1's push arrives while n2's user is still
    writing the same file, unscanned. n2 must not put n1's version over it: its restore
    scans first and finds the file unsettled. Once the writer closes it, the edit is a
    write of n2's, concurrent with n1's: one conflict everywhere, both contents kept."""
    with running(tmp_path, nets=NETS) as cluster:
        n1, n2, _ = cluster.nodes
        seed(cluster, cluster.nodes[2], "shared.txt", b"v0\n")
        # n2's lsyncd syncing to both peers: it restarts when a peer's tunnel becomes
        # known, and an event in that instant (the seed's landing, say) is not seen. Waiting
        # for its gate to deny the seed's echo raced that restart (a CI run, 30 s).
        wait_for(lambda: sorted((n2.status() or {}).get("lsyncd", {}).get("peers", []))
                 == ["n1", "n3"], 30, "n2's lsyncd to sync to n1 and n3")
        written = {"n2": b"n2's edit, still open for writing\n", "n1": b"n1's edit\n"}
        path = n2.data / "shared.txt"
        kept_on_n2 = n2.data / ".mesh-keep" / "objects" / sha(written["n1"])
        # A writer that keeps the file open: the watcher sees MODIFY and no CLOSE_WRITE, so
        # it waits for the file to settle, and each write (the same bytes again) restarts
        # that wait. Nothing scans the edit until it is closed.
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, written["n2"])
            (n1.data / "shared.txt").write_bytes(written["n1"])
            deadline = time.monotonic() + 30
            while not kept_on_n2.exists():  # n1's push ended on n2: its bytes are kept
                assert path.stat().st_ino == os.fstat(fd).st_ino, "the push replaced the edit"
                assert time.monotonic() < deadline, "n1's push never landed on n2"
                os.pwrite(fd, written["n2"], 0)
                time.sleep(0.2)
            assert path.read_bytes() == written["n2"]
        finally:
            os.close(fd)
        c = wait_resolved(cluster, "shared.txt")
        check_kept(cluster, "shared.txt", c, written)


# --- a push landing, in one process ---------------------------------------------------
#
# The receiving side of a push without the network: the agent's own data plane and push
# sink, with the tunnel's part (make the push's staging dir, run rsync) played here. rsync
# writes only into the staging dir (mesh.core.landing); the watcher's scan is
# ``plane.scan``, called where it can run in the agent.


class Receiver:
    def __init__(self, root: Path, node: str = "n3", watcher: Watcher | None = None) -> None:
        root.mkdir(exist_ok=True)
        self.root = root
        self.keep = KeepArea(root)
        self.index = Index(":memory:", keep=self.keep.has)
        self.replica = Replica(node, self.index)
        self.first: dict[str, int] = {}  # path -> the counter of our first write of it

        async def nowhere(effects: list[Effect]) -> None:
            pass

        self.plane = DataPlane(
            root=root, replica=self.replica, index=self.index, keep=self.keep,
            scanner=Scanner(root), forward=nowhere,
            being_written=frozenset if watcher is None else watcher.being_written)
        # begin/end use neither the exchange nor the credentials.
        self.sink = Pushes(me=node, epoch=1, index=self.index, data=self.plane,
                           creds=None, data_dir=root,  # type: ignore[arg-type]
                           endpoint=lambda peer: None)

    async def write(self, rel: str, data: bytes) -> int:
        """A local write, scanned; its counter (the first is kept, ``writes_of_mine``)."""
        (self.root / rel).write_bytes(data)
        (self.root / rel).chmod(0o644)
        await self.plane.scan([rel])
        disk = self.index.state(rel).disk
        assert disk is not None
        counter = disk.vector.get(self.replica.node)
        self.first.setdefault(rel, counter)
        return counter

    async def begin(self, push_id: str, *writes: Entry) -> object:
        self.keep.staging_dir(push_id).mkdir(parents=True)
        header = manifest.encode(Manifest(writes[0].writer, 1, 0, writes))
        return await self.sink.begin(writes[0].writer, push_id,
                                     manifest.decode_push(header, writes[0].writer, push_id))

    def stage(self, push_id: str, rel: str, data: bytes) -> None:
        """What rsync does with one file: write it into the push's staging dir."""
        staged = self.keep.staging_dir(push_id) / rel
        staged.parent.mkdir(parents=True, exist_ok=True)
        staged.write_bytes(data)
        staged.chmod(0o644)

    def writes_of_mine(self, rel: str) -> list[Entry]:
        """Heads of ``rel`` that claim a write of this node beyond the first."""
        st = self.index.state(rel)
        heads = [h for v in (st.disk, st.target) if v is not None for h in v.heads]
        return [h for h in heads if h.vector.get(self.replica.node) > self.first.get(rel, 0)]


def write(rel: str, data: bytes, writer: str, vector: dict[str, int], at_ms: int) -> Entry:
    return Entry(rel, VersionVector.of(vector), hashlib.sha256(data).digest(), len(data), 0,
                 0o644, Kind.FILE, hlc_pack(at_ms), writer)


NOW_MS = 1_790_000_000_000


async def test_a_push_reaches_the_folder_only_at_its_end(tmp_path: Path) -> None:
    r = Receiver(tmp_path / "data")
    v0 = await r.write("p", b"v0 by n3\n")
    e1 = write("p", b"n1's edit\n", "n1", {"n1": 1, "n3": v0}, NOW_MS)
    ticket = await r.begin("n1-1-1", e1)
    r.stage("n1-1-1", "p", b"n1's edit\n")
    await r.plane.scan(["p"])  # the watcher: nothing changed in the folder yet
    assert (r.root / "p").read_bytes() == b"v0 by n3\n"
    await r.sink.end(ticket, 0)
    assert (r.root / "p").read_bytes() == b"n1's edit\n"
    assert r.writes_of_mine("p") == []
    assert r.index.state("p") == PathState(Version.of(e1), None)
    assert r.keep.has((Kind.FILE, hashlib.sha256(b"v0 by n3\n").digest(), 0o644))
    assert not r.keep.staging_dir("n1-1-1").exists()


async def test_an_edit_made_while_the_push_ran_is_kept_and_resolved(tmp_path: Path) -> None:
    """DESIGN.md "the race to design for": our user edits the file while the push is on
    its way. The restore scans before it replaces, so the edit is a write of ours,
    concurrent with the pushed one: resolved by the rule, the loser kept as a copy."""
    r = Receiver(tmp_path / "data")
    v0 = await r.write("p", b"v0 by n3\n")
    e1 = write("p", b"n1's edit\n", "n1", {"n1": 1, "n3": v0}, NOW_MS)
    ticket = await r.begin("n1-1-1", e1)
    r.stage("n1-1-1", "p", b"n1's edit\n")
    (r.root / "p").write_bytes(b"n3's own edit, not yet scanned\n")
    await r.sink.end(ticket, 0)
    contents = {f.read_bytes() for f in r.root.iterdir() if f.is_file()}
    assert contents == {b"n1's edit\n", b"n3's own edit, not yet scanned\n"}
    assert len(list(r.index.conflicts_on({"p"}))) == 1


async def test_an_edit_in_the_instant_before_a_restore_replaces_is_kept_and_resolved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The restore's window: our user writes the file after the restore scanned it and
    before the new content takes its place. The swap is undone, the edit is recorded as
    a write of ours, and the rule resolves it against the pushed version: both kept."""
    r = Receiver(tmp_path / "data")
    v0 = await r.write("p", b"v0 by n3\n")
    e1 = write("p", b"n1's edit\n", "n1", {"n1": 1, "n3": v0}, NOW_MS)
    ticket = await r.begin("n1-1-1", e1)
    r.stage("n1-1-1", "p", b"n1's edit\n")
    real = r.plane.fs.exchange
    edits: list[str] = []

    def user_writes_first(a: str, b: str) -> bool:
        if not edits:
            edits.append(b)
            (r.root / b).write_bytes(b"n3's edit in the instant before\n")
        return real(a, b)

    monkeypatch.setattr(r.plane.fs, "exchange", user_writes_first)
    await r.sink.end(ticket, 0)
    assert edits == ["p"]
    contents = {f.read_bytes() for f in r.root.iterdir() if f.is_file()}
    assert contents == {b"n1's edit\n", b"n3's edit in the instant before\n"}
    assert len(list(r.index.conflicts_on({"p"}))) == 1
    assert not any(f.name.startswith(".p.") for f in r.root.iterdir())  # no temp left


async def test_a_restore_waits_for_a_writer_that_has_the_file_open(tmp_path: Path) -> None:
    """DESIGN.md §5: a push lands while our user's program rewrites the file in place
    (truncate, then write). The restore leaves it while it is open (a scan then would
    record the empty file as a write of ours, and a second conflict: the fresh-clone
    CI flake of test_same_existing_file_edited_on_two_nodes); its close brings the
    scan, and the restore again: one conflict, between the two whole versions."""
    root = tmp_path / "data"
    root.mkdir()
    with Watcher(root) as watcher:
        r = Receiver(root, watcher=watcher)
        v0 = await r.write("p", b"v0 by n3\n")
        assert watcher.take_all() is not None  # the write's own events, scanned already
        e1 = write("p", b"n1's edit\n", "n1", {"n1": 1, "n3": v0}, NOW_MS)
        ticket = await r.begin("n1-1-1", e1)
        r.stage("n1-1-1", "p", b"n1's edit\n")
        with (root / "p").open("wb") as f:  # truncated: the file is empty now
            f.write(b"n3's ")
            f.flush()
            await r.sink.end(ticket, 0)
            assert (root / "p").read_bytes() == b"n3's "  # left for its writer
            assert r.writes_of_mine("p") == []
            assert r.index.state("p").target == Version.of(e1)
            f.write(b"rewrite, in place\n")
        batch = watcher.take_all()
        assert batch is not None and batch.paths == ["p"]
        await r.plane.scan(batch.paths, events_read=batch.taken)
    contents = {f.read_bytes() for f in root.iterdir() if f.is_file()}
    assert contents == {b"n1's edit\n", b"n3's rewrite, in place\n"}
    conflicts = list(r.index.conflicts_on({"p"}))
    assert len(conflicts) == 1, conflicts
    assert r.index.state("p").target is None


async def test_bytes_other_than_the_announced_version_never_land(tmp_path: Path) -> None:
    """The sender's file changed while rsync read it: those bytes are not the version the
    push announced, and not a write of ours either. They are dropped; the version stays
    wanted, and the path untouched."""
    r = Receiver(tmp_path / "data")
    v0 = await r.write("p", b"v0 by n3\n")
    e1 = write("p", b"n1's edit\n", "n1", {"n1": 1, "n3": v0}, NOW_MS)
    ticket = await r.begin("n1-1-1", e1)
    r.stage("n1-1-1", "p", b"n1's edit, and more written while rsync read it\n")
    await r.sink.end(ticket, 0)
    assert (r.root / "p").read_bytes() == b"v0 by n3\n"
    assert r.writes_of_mine("p") == []
    assert r.index.state("p").target == Version.of(e1)
    assert r.plane.wants >= 1


async def test_a_pushed_losing_head_is_kept_not_taken_for_an_edit(tmp_path: Path) -> None:
    r = Receiver(tmp_path / "data")
    v0 = await r.write("p", b"v0 by n3\n")
    e1 = write("p", b"n1's edit\n", "n1", {"n1": 1, "n3": v0}, NOW_MS)
    e2 = write("p", b"n2's later edit\n", "n2", {"n2": 1, "n3": v0}, NOW_MS + 5)
    r.replica.remote("n2", [e2])
    r.replica.remote("n1", [e1])  # e2 wins; n1 pushes e1 before it heard of e2
    ticket = await r.begin("n1-1-1", e1)
    r.stage("n1-1-1", "p", b"n1's edit\n")
    await r.sink.end(ticket, 0)
    assert r.writes_of_mine("p") == []
    assert r.index.state("p").target == Version.of(e1, e2)  # still waiting for e2's bytes
    assert e1.content is not None and r.keep.has(e1.content)  # for the loser's conflict copy


async def test_two_pushes_on_one_path_land_in_the_order_they_end(tmp_path: Path) -> None:
    """Two concurrent edits of v0 pushed at once (n3 heard of both: e2 wins). Whatever
    order their ends come in, v0 is never written back as a new write of ours and the
    winner ends up in place."""
    for first_ends in ("n1-1-1", "n2-1-1"):
        r = Receiver(tmp_path / first_ends)
        v0 = await r.write("p", b"v0 by n3\n")
        e1 = write("p", b"n1's edit\n", "n1", {"n1": 1, "n3": v0}, NOW_MS)
        e2 = write("p", b"n2's later edit\n", "n2", {"n2": 1, "n3": v0}, NOW_MS + 5)
        tickets = {"n1-1-1": await r.begin("n1-1-1", e1), "n2-1-1": await r.begin("n2-1-1", e2)}
        r.stage("n1-1-1", "p", b"n1's edit\n")
        r.stage("n2-1-1", "p", b"n2's later edit\n")
        for push_id in sorted(tickets, key=lambda k: k != first_ends):
            await r.sink.end(tickets[push_id], 0)
        assert r.writes_of_mine("p") == []
        assert r.index.state("p") == PathState(Version.of(e1, e2), None)
        assert (r.root / "p").read_bytes() == b"n2's later edit\n"


async def test_a_large_pushed_file_is_moved_into_place_not_copied(tmp_path: Path) -> None:
    """The staged file is renamed into the keep area and from there into place: the
    file in the folder is the very inode rsync wrote."""
    r = Receiver(tmp_path / "data")
    data = os.urandom(PREHASH_BYTES)
    v0 = await r.write("big", b"v0 by n3\n")
    e1 = write("big", data, "n1", {"n1": 1, "n3": v0}, NOW_MS)
    ticket = await r.begin("n1-1-1", e1)
    r.stage("n1-1-1", "big", data)
    inode = (r.keep.staging_dir("n1-1-1") / "big").stat().st_ino
    await r.sink.end(ticket, 0)
    assert (r.root / "big").stat().st_ino == inode
    assert r.index.state("big").disk == Version.of(e1)


async def test_what_a_push_staged_survives_a_kill(tmp_path: Path) -> None:
    """The agent stopped after rsync staged the file, before the push's end: the next
    start keeps the staged bytes and restores them."""
    r = Receiver(tmp_path / "data")
    v0 = await r.write("p", b"v0 by n3\n")
    e1 = write("p", b"n1's edit\n", "n1", {"n1": 1, "n3": v0}, NOW_MS)
    await r.begin("n1-1-1", e1)
    r.stage("n1-1-1", "p", b"n1's edit\n")
    again = Receiver.__new__(Receiver)  # the same folder and index, a new agent
    again.__dict__.update(r.__dict__)
    again.keep = KeepArea(r.root)
    assert again.keep.unfinished == ["n1-1-1"]
    again.plane = DataPlane(root=r.root, replica=r.replica, index=r.index, keep=again.keep,
                            scanner=Scanner(r.root), forward=r.plane.forward)
    await again.plane.startup()
    assert (r.root / "p").read_bytes() == b"n1's edit\n"
    assert again.writes_of_mine("p") == []
    assert r.index.state("p") == PathState(Version.of(e1), None)


@pytest.mark.parametrize("change", ["delete", "overwrite"])
async def test_a_change_right_after_a_push_landed_sees_the_pushed_version(
        tmp_path: Path, change: str) -> None:
    """A file changed the moment a push lands it: the change saw the pushed version (the
    agent recorded it as on disk when it put it there), so it is an edit on top of it,
    not a write concurrent with it: no conflict, and a delete is not undone."""
    r = Receiver(tmp_path / "data")
    e1 = write("p", b"n1's new file\n", "n1", {"n1": 1}, NOW_MS)
    ticket = await r.begin("n1-1-1", e1)
    r.stage("n1-1-1", "p", b"n1's new file\n")
    await r.sink.end(ticket, 0)
    if change == "delete":
        (r.root / "p").unlink()
    else:
        (r.root / "p").write_bytes(b"n3's edit of it\n")
    await r.plane.scan(["p"])
    disk = r.index.state("p").disk
    assert disk is not None and len(disk.heads) == 1, disk
    assert disk.vector.dominates(e1.vector) and list(disk.vector.to_dict()) == ["n1", "n3"]
    assert (disk.winner.hash is None) == (change == "delete")
    assert list(r.index.conflicts_on({"p"})) == []


# --- a compromised peer (issue 13) --------------------------------------------------------


async def test_a_restore_never_writes_through_a_symlinked_folder(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The attack of issue 13: ``lure`` became a symlink to a folder outside the root,
    and a peer's version of ``lure/canary.txt`` is then restored. Nothing is written,
    renamed or filed outside; the refusal is logged."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary.txt").write_bytes(b"outside, untouched\n")
    r = Receiver(tmp_path / "data")
    (r.root / "lure").mkdir()
    await r.write("lure/canary.txt", b"v0 by n3\n")
    (r.root / "lure" / "canary.txt").unlink()
    (r.root / "lure").rmdir()
    (r.root / "lure").symlink_to(outside)
    await r.plane.scan(["lure/canary.txt", "lure"])
    e1 = write("lure/canary.txt", b"pwned\n", "n1", {"n1": 1, "n3": 9}, NOW_MS)
    ticket = await r.begin("n1-1-1", e1)
    r.stage("n1-1-1", "lure/canary.txt", b"pwned\n")
    await r.sink.end(ticket, 0)
    assert (outside / "canary.txt").read_bytes() == b"outside, untouched\n"
    assert sorted(p.name for p in outside.iterdir()) == ["canary.txt"]
    assert (r.root / "lure").is_symlink()
    assert "restore lure/canary.txt: " in caplog.text
    assert "'lure' on the way is a symlink" in caplog.text


async def test_no_mode_the_data_plane_writes_sets_setuid_setgid_or_sticky(
        tmp_path: Path) -> None:
    """Peers' entries with such bits are refused at decode; whatever the data plane is
    asked to write (here an old index's mode), it writes permission bits only."""
    r = Receiver(tmp_path / "data")
    data = b"#!/bin/sh\nid\n"
    content = (Kind.FILE, hashlib.sha256(data).digest(), 0o6755)
    (r.root / "kept").write_bytes(data)
    r.keep.file_away("kept", content)
    r.plane.write_back("kept", Kind.FILE, content, 0o6755, "tool")
    assert (r.root / "tool").read_bytes() == data
    assert (r.root / "tool").stat().st_mode & 0o7777 == 0o755
    r.plane.write_back("tool", Kind.DIR, (Kind.DIR, b"", 0o3777), 0o3777, "folder")
    assert (r.root / "folder").stat().st_mode & 0o7777 == 0o777
