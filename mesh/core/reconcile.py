"""Whether a path is unchanged since it was indexed, from one ``lstat`` (issue 16).

A restart reconciles the index with the disk. Scanning every path (open its folder,
stat, look the stat cache up, read the index row, feed the replica) was most of a
100,000-file restart; for a path whose ``lstat`` matches what the stat cache recorded
when it hashed the file, and whose hash and mode are the index's disk version, the
scan would find the disk version's content and the replica would do nothing
(``Replica.local``: seen content equal to the disk version's). Such a path is not
scanned at all; every other one is.

No I/O: the caller brings what ``lstat`` said (``Seen``) and what the index and the
stat cache hold (``Known``).
"""

from __future__ import annotations

from typing import NamedTuple

from mesh.core.manifest import Kind

Identity = tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode: a file as hashed


class Seen(NamedTuple):
    """One ``lstat`` of a path: ``kind`` None for what is not synced as it is (a
    symlink, whose target must be read, or a fifo, a socket, a device). A named tuple,
    as ``Known``: a walk makes one of each per path (a million at a restart), and a
    frozen dataclass took three times as long to make."""

    kind: Kind | None
    mode: int  # the permission bits that are synced
    identity: Identity


class Known(NamedTuple):
    """The index's disk version of a path (its winner's kind, hash and mode; hash None
    for a delete), and the stat cache's record of the file when it was hashed."""

    kind: Kind
    hash: bytes | None
    mode: int
    cached: tuple[Identity, bytes] | None = None


Fingerprint = tuple[int, ...]
"""What one ``lstat`` shows of a path that decides whether it is unchanged: a
folder's mode; a regular file's mode and identity. The lengths differ, so a folder
never shows a file's fingerprint, nor a file a folder's."""


def shown(seen: Seen) -> Fingerprint | None:
    """The fingerprint ``seen`` shows; None for what one ``lstat`` does not decide."""
    if seen.kind is Kind.DIR:
        return (seen.mode,)
    if seen.kind is Kind.FILE:
        return (seen.mode, *seen.identity)
    return None


def expected(known: Known | None) -> Fingerprint | None:
    """The fingerprint a path shows when a scan of it would find the content of the disk
    version ``known``; None when no ``lstat`` tells (it is scanned).

    A folder: its mode is all its content. A regular file: the very file the stat
    cache hashed (size, mtime, ctime, inode; the cache keeps no racily clean entry,
    ``Scanner``), with the disk version's hash and mode. A delete, a symlink, a file
    the cache does not know by the disk version's hash: none. The walk reads these
    straight from the index (``mesh.store.known``), one tuple per path."""
    if known is None or known.hash is None:
        return None
    if known.kind is Kind.DIR:
        return (known.mode,) if known.hash == b"" else None
    if known.kind is Kind.FILE and known.cached is not None and known.cached[1] == known.hash:
        return (known.mode, *known.cached[0])
    return None


def unchanged(seen: Seen, known: Known | None) -> bool:
    """Whether a scan of the path would find the content of the disk version ``known``:
    what ``seen`` shows is what ``known`` expects."""
    want = expected(known)
    return want is not None and want == shown(seen)
