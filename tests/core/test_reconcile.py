"""The start-up reconcile's rule (``mesh.core.reconcile``, issue 16): a path it calls
unchanged is one a scan would find holding its disk version's content, so skipping
its scan changes nothing; and an unchanged tree is not scanned at all."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mesh.core.manifest import Kind
from mesh.core.reconcile import Known, Seen, unchanged

idents = st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3), st.integers(0, 3))
hashes = st.sampled_from([b"", b"a" * 32, b"b" * 32])
modes = st.sampled_from([0o644, 0o600, 0o755])
kinds = st.sampled_from([Kind.FILE, Kind.DIR, Kind.SYMLINK])
seens = st.builds(Seen, st.none() | st.sampled_from([Kind.FILE, Kind.DIR]), modes, idents)
knowns = st.none() | st.builds(Known, kinds, st.none() | hashes, modes,
                               st.none() | st.tuples(idents, hashes))


def scanned(seen: Seen, known: Known | None, fresh: bytes) -> tuple[Kind, bytes, int] | None:
    """The content a scan finds (``Scanner.observe``): a file's hash comes from the
    stat cache when its record is this very file, else from reading it (``fresh``)."""
    if seen.kind is None:
        return None  # not decided by one stat
    if seen.kind is Kind.DIR:
        return (Kind.DIR, b"", seen.mode)
    cached = known.cached if known is not None else None
    digest = cached[1] if cached is not None and cached[0] == seen.identity else fresh
    return (Kind.FILE, digest, seen.mode)


@given(seens, knowns, hashes)
def test_what_is_called_unchanged_a_scan_finds_as_indexed(
        seen: Seen, known: Known | None, fresh: bytes) -> None:
    if unchanged(seen, known):
        assert known is not None and known.hash is not None
        assert scanned(seen, known, fresh) == (known.kind, known.hash, known.mode)


@given(st.sampled_from([Kind.FILE, Kind.DIR]), modes, idents, hashes)
def test_a_path_as_it_was_indexed_is_not_scanned(
        kind: Kind, mode: int, ident: tuple[int, int, int, int], digest: bytes) -> None:
    digest = b"" if kind is Kind.DIR else digest
    cached = (ident, digest) if kind is Kind.FILE else None
    assert unchanged(Seen(kind, mode, ident), Known(kind, digest, mode, cached))


def test_a_delete_a_symlink_or_a_file_the_cache_does_not_know_is_scanned() -> None:
    ident = (1, 2, 3, 4)
    file = Seen(Kind.FILE, 0o644, ident)
    assert not unchanged(file, None)
    assert not unchanged(file, Known(Kind.FILE, None, 0o644, (ident, b"a" * 32)))
    assert not unchanged(file, Known(Kind.FILE, b"a" * 32, 0o644, None))
    assert not unchanged(file, Known(Kind.FILE, b"a" * 32, 0o644, ((1, 2, 9, 4), b"a" * 32)))
    assert not unchanged(file, Known(Kind.FILE, b"a" * 32, 0o644, (ident, b"b" * 32)))
    assert not unchanged(Seen(None, 0, ident), Known(Kind.SYMLINK, b"a" * 32, 0))
