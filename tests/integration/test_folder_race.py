"""A folder delete racing a file created in that folder on another node (issue 11,
mechanism 1): the delete takes what the deleter held, never the new file.

n1 removes folder ``d`` (empty on n1, or holding files every node holds) while n2 has just
created ``d/child.bin``, which n2's agent has not scanned yet, so n1 cannot know of it
when its push lands on n2. Made deterministic the way ``test_data_faults`` holds an edit
unscanned: n2's writer keeps the file open and writes it again and again, so the watcher
sees CREATE and MODIFY but no CLOSE_WRITE and waits for the file to settle (lsyncd's gate
scans only what the watcher reported). Once n2 has taken n1's delete in, the writer
writes more and closes the file.

The rule: a folder delete is a delete of each entry the deleter held; a file created
concurrently survives, with every byte written to it, and so does the folder around it,
on every node. With the old include list (``/d/***``) n1's push renamed the open file into
n2's keep area, so the bytes written after that went there; n2 wrote a copy back, and
the trees settled on the earlier bytes only (d empty on n1) or with a spurious conflict
copy beside the file (d holding files), as seen without this file's first assertion.

Three agents as processes (``tests.cluster``), real lsyncd, real rsync over TLS.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from mesh.core.manifest import entry_from_wire
from mesh.core.resolver import Version
from tests.cluster import Cluster, Node, running, wait_for
from tests.integration.test_conflicts import (
    Row,
    leftovers,
    same_everywhere,
    sha,
    state_db,
    versions,
)

pytestmark = pytest.mark.integration

NETS = ("127.0.21", "127.0.22")  # see tests.cluster.Cluster.nets
CHILD = "d/child.bin"
DATA = b"n2's new file in d, still open for writing\n"
MORE = b"written after n1's push landed\n"
KNOWN = {"d/known.txt": b"a file every node holds\n", "d/sub/deep.txt": b"deeper\n"}


def seed_all(cluster: Cluster, paths: list[str]) -> None:
    """Wait until every node holds ``paths`` alike, has indexed each of them and has
    finished every push it received (a folder deleted while the push that made it is
    still landing is another race than this file's)."""
    wait_for(lambda: same_everywhere(cluster, paths) and all(
        set(paths) <= set(versions(n, paths)) and not leftovers(n) for n in cluster.nodes),
        60, f"{paths} on every node, indexed")


def targets(node: Node, paths: list[str]) -> dict[str, Row]:
    """path -> the version it converges to, where the node's index holds one apart
    from its disk version (a restore not yet made)."""
    with state_db(node) as db:
        rows: list[Any] = db.execute("SELECT path, heads FROM targets").fetchall()
    out = {}
    for path, blob in rows:
        if path in paths:
            version = Version(tuple(entry_from_wire(raw) for raw in msgpack.unpackb(blob)))
            out[path] = Row(version.vector.to_dict(), tuple(
                None if h.hash is None else h.hash.hex() for h in version.heads))
    return out


def ours(path: Path, fd: int) -> bool:
    """Whether ``path`` is still the file open as ``fd``: rsync renames what it removes
    into the push's backup dir, and the agent may then write the content back as a new
    file, so the name alone says nothing."""
    try:
        return path.lstat().st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("n1_held", [False, True], ids=["d empty on n1", "d holding files"])
def test_a_folder_delete_spares_a_file_created_in_it_meanwhile(tmp_path: Path,
                                                               n1_held: bool) -> None:
    known = dict(KNOWN) if n1_held else {}
    with running(tmp_path, nets=NETS) as cluster:
        n1, n2, n3 = cluster.nodes
        # n2 makes d itself: once n2 has indexed it, n2's watcher has taken in d's arrival
        # (watched it, listed it). A d that arrived by a push could still be listed later,
        # with the new file in it: scanned at once, not the race.
        (n2.data / "d").mkdir()
        seed_all(cluster, ["d"])
        for rel, data in known.items():  # n1's files in d, which every node then holds
            (n1.data / rel).parent.mkdir(parents=True, exist_ok=True)
            (n1.data / rel).write_bytes(data)
        seeded = list(dict.fromkeys(["d", *(p.rpartition("/")[0] for p in known), *known]))
        seed_all(cluster, seeded)
        before = versions(n2, ["d"])["d"].vector.get("n1", 0)

        def n1_delete_landed_on_n2() -> bool:
            """n1's push ended on n2: its deletes of what n1 held are applied, and n2 has
            taken in n1's delete of d (on disk, or as the target its child holds up)."""
            held = versions(n2, ["d", *known])
            d = targets(n2, ["d"]).get("d") or held["d"]
            return d.vector.get("n1", 0) > before and all(
                held[p].hashes == (None,) for p in known)

        child = n2.data / CHILD
        fd = os.open(child, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, DATA)
            shutil.rmtree(n1.data / "d")
            deadline = time.monotonic() + 60
            while not n1_delete_landed_on_n2():
                scanned = CHILD in versions(n2, [CHILD])  # before the file is looked at
                if not ours(child, fd):
                    break  # the push took it (n2 then indexes it as displaced): failed below
                assert not scanned, "n2 scanned its new file before n1's push landed: not the race"
                assert time.monotonic() < deadline, "n1's delete never landed on n2"
                os.pwrite(fd, DATA, 0)  # a MODIFY: the watcher waits for it to settle again
                time.sleep(0.1)
            assert ours(child, fd), "n1's push removed d/child.bin, which n1 never saw"
            os.pwrite(fd, MORE, len(DATA))  # the writer goes on, then closes the file
        finally:
            os.close(fd)

        expected = {"d": ("dir", 0o755, ""), CHILD: ("file", 0o644, sha(DATA + MORE))}
        paths = ["d", CHILD, *seeded]

        def converged() -> bool:
            return (all(cluster.tree(n) == expected for n in cluster.nodes)
                    and same_everywhere(cluster, paths))

        wait_for(converged, 90, "d/child.bin and d, and nothing else, on every node", step=0.2)
        cluster.wait_converged(timeout=60, stable=2.0)
        for node in (n1, n2, n3):
            assert cluster.tree(node) == expected, node.name
            held = versions(node, paths)
            assert held[CHILD].hashes == (sha(DATA + MORE),), node.name
            assert held["d"].hashes != (None,), f"{node.name} holds d as deleted"
            for rel in known:
                assert held[rel].hashes == (None,), f"{node.name}: {rel} not deleted"
