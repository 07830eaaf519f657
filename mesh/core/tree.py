"""Per-folder tree digests: where the nodes' trees differ (``mesh verify``, issue 5).

Invariant 1 of DESIGN.md says that once writes stop every node holds the same
tree (paths, content, modes) under the same vectors. To check it without
shipping every entry, each node sums what it holds into one 64-bit XOR per
folder (its direct children only, so a difference is located to a folder);
the asking node compares the folder sums of every node and fetches the
entries of the folders that differ, then names each path that differs and
what each node holds there.

Only live versions count: a tombstone is bookkeeping, and nodes may drop
acknowledged tombstones at different times while their trees are the same.
A node that still holds a deleted file is caught by the file itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mesh.core.manifest import Entry
from mesh.core.paths import parent

FolderSums = dict[str, tuple[int, int]]
"""folder ("" for the top) -> (XOR of its children's item hashes, child count)."""


def folder_of(path: str) -> str:
    return parent(path) or ""


def item_hash(entry: Entry) -> int:
    """What a node holds at one path: content, permission bits and vector."""
    content = entry.content
    material = "\x00".join([
        entry.path,
        "" if content is None else f"{int(content[0])}:{content[1].hex()}:{content[2]:o}",
        repr(entry.vector.items()),
    ]).encode()
    return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big")


def folder_sums(entries: Iterable[Entry]) -> FolderSums:
    """Sum live entries (one resolved entry per path) per folder."""
    sums: FolderSums = {}
    for e in entries:
        if e.deleted:
            continue
        folder = folder_of(e.path)
        acc, count = sums.get(folder, (0, 0))
        sums[folder] = (acc ^ item_hash(e), count + 1)
    return sums


def differing_folders(sums: Mapping[str, FolderSums]) -> list[str]:
    """Folders whose sums are not the same on every node (absent: nothing there)."""
    folders = {f for node_sums in sums.values() for f in node_sums}
    return sorted(f for f in folders
                  if len({node_sums.get(f, (0, 0)) for node_sums in sums.values()}) > 1)


@dataclass(frozen=True, slots=True)
class PathDiff:
    """One path the nodes disagree on: what each node holds (None: nothing)."""

    path: str
    held: dict[str, Entry | None]


def differences(listings: Mapping[str, Iterable[Entry]]) -> list[PathDiff]:
    """Paths whose content or vector is not the same on every node listed."""
    held: dict[str, dict[str, Entry]] = {}
    for node, entries in listings.items():
        for e in entries:
            if not e.deleted:
                held.setdefault(e.path, {})[node] = e
    out = []
    for path in sorted(held):
        by_node = held[path]
        states = {(e.content, e.vector) if e is not None else None
                  for e in (by_node.get(n) for n in listings)}
        if len(states) > 1:
            out.append(PathDiff(path, {n: by_node.get(n) for n in sorted(listings)}))
    return out
