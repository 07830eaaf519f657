"""Hypothesis strategies for core values."""

from __future__ import annotations

from hypothesis import strategies as st

from mesh.core.manifest import Entry, Kind
from mesh.core.paths import reserved
from mesh.core.vclock import VersionVector

NODES = ["a", "b", "c", "d"]

vectors = st.dictionaries(st.sampled_from(NODES), st.integers(1, 6), min_size=1).map(
    VersionVector.of
)
hashes = st.binary(min_size=32, max_size=32)
names = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
    min_size=1, max_size=12,
).filter(lambda s: s not in (".", ".."))
# A synced path is never one the agent keeps for itself (".mesh-keep", temp names...).
paths = st.lists(names, min_size=1, max_size=3).map("/".join).filter(
    lambda p: reserved(p) is None)


@st.composite
def entries(draw: st.DrawFn, path: str | None = None) -> Entry:
    deleted = draw(st.booleans())
    return Entry(
        path=path if path is not None else draw(paths),
        vector=draw(vectors),
        hash=None if deleted else draw(st.sampled_from([b"\x01" * 32, b"\x02" * 32])),
        size=draw(st.integers(0, 2**40)),
        mtime_ns=draw(st.integers(-(2**62), 2**62)),
        mode=draw(st.sampled_from([0o644, 0o600, 0o755])),
        kind=Kind.FILE,
        hlc=draw(st.integers(0, 2**50)),
        writer=draw(st.sampled_from(NODES)),
    )
