"""A catch-up's pushes landing on a receiver, in one process (issue 16): no network, no
rsync, no watcher, so what is left is the agent's own work per path.

    .venv/bin/python bench/landing.py --files 20000 [--profile out.prof]
    .venv/bin/python bench/landing.py --files 100000 --sender

With --sender, the other side: a sender's catch-up of a peer behind on every path (the
sweep, the pusher's ticks, orders and push ends) with rsync replaced by a stub that
reports success; CPU seconds until every path was pushed.

The receiver's index is a file (WAL, as an agent's). As in a join: the receiver first
learns the sender's versions as announcements (the exchange's catch-up), then each push
of PATHS_PER_PUSH paths: its header admitted (``PushAdmission.begin``), its files
staged as rsync would, and its end (``PushAdmission.end`` -> ``DataPlane.push_ended``).
Prints CPU seconds (process time) per phase and per 1,000 paths; with --profile, a
cProfile of the pushes (``python -m pstats``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import hashlib
import tempfile
import time
from pathlib import Path

from mesh.adapters.fs.scanner import Scanner
from mesh.adapters.rsync import push as rsync_push
from mesh.core import admit, manifest
from mesh.core.effects import Effect
from mesh.core.manifest import Entry, Kind, Manifest
from mesh.core.pushplan import PATHS_PER_PUSH
from mesh.core.replica import Replica
from mesh.core.resolver import Version
from mesh.core.vclock import VersionVector, hlc_pack
from mesh.engine.admission import PushAdmission
from mesh.engine.dataplane import DataPlane
from mesh.engine.keep import KeepArea
from mesh.engine.pushes import Pushes
from mesh.store import bulk
from mesh.store.index import Index

SENDER = "n1"
NOW_MS = time.time_ns() // 1_000_000


def entry(i: int) -> tuple[Entry, bytes]:
    rel = f"d{i % 1000:03d}/f{i:07d}"
    data = f"file {i}\n".encode().ljust(1024, b".")
    return Entry(rel, VersionVector.of({SENDER: 1}), hashlib.sha256(data).digest(),
                 len(data), 1_700_000_000_000_000_000, 0o644, Kind.FILE,
                 hlc_pack(NOW_MS - 10_000_000 + i), SENDER), data


async def run(files: int, root: Path, profile: str | None) -> None:
    data_dir = root / "data"
    data_dir.mkdir()
    keep = KeepArea(data_dir)
    index = Index(root / "index.db", keep=keep.has)
    replica = Replica("n2", index)

    async def nowhere(effects: list[Effect]) -> None:
        pass

    plane = DataPlane(root=data_dir, replica=replica, index=index, keep=keep,
                      scanner=Scanner(data_dir), forward=nowhere)
    sink = Pushes(me="n2", epoch=1, index=index, data=plane,
                  creds=None, data_dir=data_dir,  # type: ignore[arg-type]
                  endpoint=lambda peer: None)

    async def applied(_timeout: float) -> bool:
        return True

    admission = PushAdmission(sink, announced=functools.partial(bulk.peer_vectors, index),
                              wait_applied=applied, limits=admit.Limits())
    made = [entry(i) for i in range(files)]
    t0 = time.process_time()
    for start in range(0, files, 4096):  # the exchange applies announcements in chunks
        chunk = [e for e, _ in made[start:start + 4096]]
        with index.batch():
            index.prefetch([e.path for e in chunk], SENDER)
            fx = replica.remote(SENDER, chunk, (), 0)
        await plane.apply(fx)
    learned = time.process_time() - t0
    prof = cProfile.Profile() if profile else None
    landed = 0.0
    for n, start in enumerate(range(0, files, PATHS_PER_PUSH)):
        batch = made[start:start + PATHS_PER_PUSH]
        push_id = f"{SENDER}-1-{n + 1}"
        staging = keep.staging_dir(push_id)
        for e, data in batch:  # rsync's part: not counted below
            f = staging / e.path
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(data)
            f.chmod(0o644)
        header = manifest.encode(Manifest(SENDER, 1, 0, tuple(e for e, _ in batch)))
        if prof:
            prof.enable()
        t0 = time.process_time()
        ticket = await admission.begin(SENDER, push_id, header)
        await admission.end(ticket, 0)
        landed += time.process_time() - t0
        if prof:
            prof.disable()
    assert index.count_targets() == 0, "not every push landed"
    assert all((data_dir / e.path).read_bytes() == d for e, d in made[::997])
    print(f"{files} files: announcements learned {learned:.2f} CPU-s; pushes landed "
          f"(begin + end) {landed:.2f} CPU-s, {landed / files * 1000:.3f} per 1,000 paths")
    if prof and profile:
        prof.dump_stats(profile)
    index.close()


async def send(files: int, root: Path) -> None:
    index = Index(root / "index.db")
    index.upsert_versions(Version.of(entry(i)[0]) for i in range(files))
    replica = Replica(SENDER, index)

    class Data:  # what the pusher asks of the data plane: the replica, and lsyncd's scans
        def __init__(self) -> None:
            self.replica = replica

        async def scan(self, paths: list[str]) -> None:
            pass

    pushes = Pushes(me=SENDER, epoch=1, index=index, data=Data(),  # type: ignore[arg-type]
                    creds=None, data_dir=root,  # type: ignore[arg-type]
                    endpoint=lambda peer: ("127.0.0.1", 1), own_grace=0.0)
    pushed = 0
    done = asyncio.Event()

    async def stub(order: rsync_push.PushOrder, *_args: object, **_kw: object) -> int:
        nonlocal pushed
        pushed += len(order.paths)
        if pushed >= files:
            done.set()
        return 0

    rsync_push.push = stub  # type: ignore[assignment]
    pushes.add_peer("n2")
    t0 = time.process_time()
    pushes.sweep("n2")
    task = asyncio.create_task(pushes.run())
    await asyncio.wait_for(done.wait(), 600)
    cpu = time.process_time() - t0
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    print(f"sender, {files} paths: {cpu:.2f} CPU-s, {cpu / files * 1000:.3f} per 1,000 paths")
    index.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--profile")
    ap.add_argument("--sender", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(send(args.files, Path(tmp)) if args.sender
                    else run(args.files, Path(tmp), args.profile))


if __name__ == "__main__":
    main()
