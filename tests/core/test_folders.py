"""The folder rule of ``Replica`` (DESIGN.md, "Folders"), one node at a time."""

from __future__ import annotations

import hashlib

from mesh.core.effects import Logged, Observed, PathState, WriteCopy
from mesh.core.manifest import Entry, Kind
from mesh.core.replica import Replica
from mesh.core.resolver import Version
from mesh.core.vclock import VersionVector, hlc_pack
from tests.core.sim import MemoryStore

NOW = 1_790_000_000_000


def node(name: str) -> Replica:
    """A node holding folder d (written by n1) with d/c in it."""
    r = Replica(name, MemoryStore())
    d = Entry("d", VersionVector.of({"n1": 1}), b"", 0, 0, 0o755, Kind.DIR, hlc_pack(NOW), "n1")
    c = Entry("d/c", VersionVector.of({"n1": 1}), hashlib.sha256(b"c").digest(), 1, 0, 0o644,
              Kind.FILE, hlc_pack(NOW), "n1")
    r.remote("n1", [d, c])
    r.local("d", Observed(Kind.DIR, b"", 0, 0, 0o755), NOW)
    r.local("d/c", Observed(Kind.FILE, c.hash or b"", 1, 0, 0o644), NOW)
    return r


def test_a_file_in_place_of_a_folder_that_keeps_an_entry_loses_to_the_folder() -> None:
    """n1 replaced d by a file while n2 still holds d/c: on n2 the folder stays, as a
    write concurrent with the file, and the file is a conflict's loser; n1, which holds
    the file's bytes, keeps them as the conflict copy when it hears of n2's folder."""
    data = b"a file named d"
    file = Entry("d", VersionVector.of({"n1": 2}), hashlib.sha256(data).digest(), len(data), 0,
                 0o644, Kind.FILE, hlc_pack(NOW + 10), "n1")
    n2 = node("n2")
    fx = n2.remote("n1", [file], wall_ms=NOW + 20)
    st = n2.store.state("d")
    assert st.target is None and st.disk is not None
    assert st.disk.content == (Kind.DIR, b"", 0o755)
    logged = [f.conflict for f in fx if isinstance(f, Logged)]
    assert [c.loser for c in logged] == [file]

    n1 = Replica("n1", MemoryStore())
    n1.store.set_state("d", PathState(Version.of(file), None))  # n1 wrote it, holds it
    folder = [h for h in st.disk.heads if h.kind is Kind.DIR]
    fx = n1.remote("n2", folder, wall_ms=NOW + 30)
    copies = [f for f in fx if isinstance(f, WriteCopy)]
    assert [c.source.content for c in copies] == [Version.of(file).content]
