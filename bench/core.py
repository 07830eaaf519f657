"""Core throughput: vector compare/merge, manifest encode/decode, index upsert.

    .venv/bin/python bench/core.py [--paths 100000]

Prints one line per figure. Targets (issue 2): decode + validate >= 50,000
entries/s, index upsert >= 20,000 paths/s, on one core.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mesh.core import manifest
from mesh.core.manifest import Entry, Kind, Manifest
from mesh.core.replica import Replica
from mesh.core.resolver import Version
from mesh.core.vclock import VersionVector
from mesh.store.index import Index


def rate(label: str, count: int, fn: Callable[[], object], unit: str) -> float:
    start = time.perf_counter()
    fn()
    took = time.perf_counter() - start
    per_s = count / took
    print(f"{label:<34} {per_s:>12,.0f} {unit}/s   ({count:,} in {took:.3f} s)")
    return per_s


def make_entries(n: int, nodes: int, rng: random.Random) -> list[Entry]:
    names = [f"node-{i}" for i in range(nodes)]
    return [
        Entry(
            f"dir{i % 97}/sub{i % 13}/file-{i}.dat",
            VersionVector.of({w: rng.randint(1, 50) for w in rng.sample(names, 3)}),
            rng.randbytes(32), rng.randint(0, 1 << 30), time.time_ns(), 0o644, Kind.FILE,
            rng.randint(1, 1 << 60), rng.choice(names),
        )
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paths", type=int, default=100_000)
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the target says
    rng = random.Random(7)
    n = args.paths
    entries = make_entries(n, 5, rng)
    vectors = [e.vector for e in entries]
    pairs = list(itertools.pairwise(vectors))
    print(f"meshsync core benchmark, {n:,} paths, one core (pid {os.getpid()})")
    rate("vector compare", len(pairs), lambda: [a.compare(b) for a, b in pairs], "ops")
    rate("vector merge", len(pairs), lambda: [a.merge(b) for a, b in pairs], "ops")

    batch = 2000  # entries per manifest, as the agent batches them
    manifests = [Manifest("node-0", 1, i, tuple(entries[i:i + batch]))
                 for i in range(0, n, batch)]
    blobs: list[bytes] = []
    rate("manifest encode", n, lambda: blobs.extend(manifest.encode(m) for m in manifests),
         "entries")
    rate("manifest decode + validate", n, lambda: [manifest.decode(b) for b in blobs], "entries")
    print(f"{'manifest size':<34} {sum(map(len, blobs)) / n:>12.1f} bytes/entry")

    versions = [Version((e,)) for e in entries]
    with tempfile.TemporaryDirectory() as tmp:
        idx = Index(Path(tmp) / "state.db")
        rate("index upsert (one transaction)", n, lambda: idx.upsert_versions(versions), "paths")
        def batched() -> None:
            for i in range(0, n, 1000):
                idx.upsert_versions(versions[i:i + 1000])
        rate("index upsert (batches of 1,000)", n, batched, "paths")
        rate("index point read", 10_000,
             lambda: [idx.state(versions[rng.randrange(n)].path) for _ in range(10_000)],
             "reads")
        idx.close()
        # What a receiver does per manifest (mesh.engine.exchange): decode, then one transaction.
        later = [Manifest("node-0", 1, i, tuple(e.with_vector(e.vector.increment("node-0"))
                                                for e in m.entries))
                 for i, m in enumerate(manifests)]
        again = [manifest.encode(m) for m in later]
        receiver = Index(Path(tmp) / "receiver.db")
        replica = Replica("node-9", receiver)

        def receive(payloads: list[bytes]) -> None:
            for payload in payloads:
                m = manifest.decode(payload)
                with receiver.batch():
                    receiver.prefetch([e.path for e in m.entries], m.origin)
                    replica.remote(m.origin, m.entries, m.conflicts, 0)
                    receiver.set_meta("clock", replica.clock)
        rate("receive (decode + apply), new paths", n, lambda: receive(blobs), "entries")
        rate("receive, newer versions of known paths", n, lambda: receive(again), "entries")
        receiver.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'peak RSS':<34} {peak:>12.0f} MB")


if __name__ == "__main__":
    main()
