"""Every write the harness made, what each one saw, and what that implies (issue 7).

A write on node X to path P *saw* the earlier writes of P whose content X held
when it wrote — at P or in a conflict copy of P — and everything those saw.
From that alone:

* two writes of P by different nodes are **concurrent** iff neither saw the
  other (the resolver's notion: neither node had the other's version);
* a write is **lost** if no later write saw it and, once the nodes have
  converged, some node holds its content neither at its path nor in a conflict
  copy of that path (a rename is a delete of the old path that saw the
  content, and a write of the new one);
* a content is **invented** if a node holds it at a path (or in a conflict copy
  of a path) where no write made it: a half-received file, an old version
  written back under another name;
* the **heads** of P are its writes no later write saw; after convergence P
  must hold one of them (or be absent if all are deletes).

Expected conflicts. The resolver logs, per path, one conflict per head that
loses to the winner, whenever a node holds several heads; a write that loses
is logged as the loser at least once. For a group of k writes that are
pairwise concurrent (what a storm makes) exactly k - 1 of them lose, whatever
order the nodes learn them in: the winner is the rule's maximum and never
loses. A group that is connected by concurrency but not pairwise concurrent
(A || B, B || C, C saw A) has an outcome that depends on the rule's order of
the writes, which the harness cannot know (the hybrid clock stamps of the
scans): it expects at least one loser there and counts such groups apart.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loadtest.probe import original_of

SHOWN = 20  # findings listed by name in a report


@dataclass(frozen=True)
class Record:
    rid: int
    wid: int
    node: int
    path: str
    hash: str | None  # None: the path was deleted
    t0: float
    t: float
    changed: int  # bytes of content changed
    saw: frozenset[int]  # direct: the writes of this path whose content the node held
    kind: str
    forced: bool = False


@dataclass
class History:
    records: list[Record] = field(default_factory=list)
    by_content: dict[tuple[str, str], int] = field(default_factory=dict)
    by_path: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    heads: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    closure: list[frozenset[int]] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)  # writes a later write saw

    def need(self, path: str) -> list[str | None]:
        """What a node must hold before it writes ``path`` without a conflict."""
        hashes = [self.records[r].hash for r in sorted(self.heads.get(path, ()))]
        edits = [h for h in hashes if h is not None]
        return list(edits) if edits else ([None] if hashes else [])

    def add(self, *, wid: int, node: int, path: str, hash: str | None, t0: float, t: float,
            changed: int, held: Iterable[str | None], kind: str, forced: bool = False
            ) -> Record:
        saw = frozenset(self.by_content[(path, h)] for h in held
                        if h is not None and (path, h) in self.by_content)
        rec = Record(len(self.records), wid, node, path, hash, t0, t, changed, saw, kind, forced)
        self.records.append(rec)
        closure = set(saw)
        for r in saw:
            closure |= self.closure[r]
        self.closure.append(frozenset(closure))
        self.seen |= closure
        if hash is not None:
            self.by_content.setdefault((path, hash), rec.rid)
        self.by_path[path].append(rec.rid)
        self.heads[path] = {h for h in self.heads[path] if h not in closure} | {rec.rid}
        return rec

    def concurrent(self, a: Record, b: Record) -> bool:
        return (a.node != b.node and a.rid not in self.closure[b.rid]
                and b.rid not in self.closure[a.rid])

    # --- after convergence ----------------------------------------------------------------

    def lost(self, trees: Iterable[Mapping[str, str]], anywhere: bool = False
             ) -> list[Record]:
        """Writes no later write saw whose content no node holds at the path or in a
        conflict copy of it; with ``anywhere``, those some node lacks (the same once
        the trees are identical). Before issue 11 a content anywhere on some node
        passed, at another path too."""
        held = [placed(tree) for tree in trees]
        test = any if anywhere else all
        return [r for r in self.records
                if r.hash is not None and r.rid not in self.seen
                and test(r.hash not in at.get(r.path, ()) for at in held)]

    def invented(self, tree: Mapping[str, str]) -> list[tuple[str, str]]:
        """(path, content) of each file whose content no write made at its path (or,
        for a conflict copy, at the path it is a copy of). ``ready/`` holds the
        harness's start-up markers."""
        return sorted((path, h) for path, h in tree.items()
                      if not path.startswith("ready/")
                      and (original_of(path) or path, h) not in self.by_content)

    def final_state(self, tree: Mapping[str, str]) -> tuple[list[str], list[str]]:
        """Paths a delete should have removed but hold content (resurrected), and
        paths that hold none of their heads' contents (stale or missing)."""
        resurrected, stale = [], []
        for path, heads in sorted(self.heads.items()):
            hashes = {self.records[r].hash for r in heads}
            edits = hashes - {None}
            if not edits:
                if path in tree:
                    resurrected.append(path)
            elif tree.get(path) not in edits:
                stale.append(path)
        return resurrected, stale

    def groups(self) -> list[tuple[list[int], bool]]:
        """Groups of writes joined by concurrency with different content: (members,
        whether they are pairwise concurrent)."""
        out = []
        for rids in self.by_path.values():
            recs = [self.records[r] for r in rids]
            parent = {r.rid: r.rid for r in recs}

            def find(x: int, parent: dict[int, int] = parent) -> int:
                while parent[x] != x:
                    parent[x] = parent[parent[x]]
                    x = parent[x]
                return x

            linked: set[int] = set()
            for i, a in enumerate(recs):
                for b in recs[i + 1:]:
                    if a.hash != b.hash and self.concurrent(a, b):
                        parent[find(a.rid)] = find(b.rid)
                        linked |= {a.rid, b.rid}
            members: dict[int, list[int]] = defaultdict(list)
            for r in sorted(linked):
                members[find(r)].append(r)
            for group in members.values():
                clique = all(self.concurrent(self.records[x], self.records[y])
                             for i, x in enumerate(group) for y in group[i + 1:])
                out.append((group, clique))
        return out

    def loser_of(self, path: str, node: int, hash: str | None) -> int | None:
        """The write a logged conflict's loser is: by content, or for a delete one of the
        node's deletes of the path. A node may delete a path again once a later write
        brought it back: the delete that lost is one concurrent with another write
        (the last such), else the last."""
        if hash is not None:
            return self.by_content.get((path, hash))
        rids = self.by_path.get(path, [])
        deletes = [r for r in rids
                   if self.records[r].hash is None and self.records[r].node == node]
        contested = [d for d in deletes
                     if any(self.records[o].hash is not None
                            and self.concurrent(self.records[d], self.records[o])
                            for o in rids)]
        return (contested or deletes or [None])[-1]


def placed(tree: Mapping[str, str]) -> dict[str, set[str]]:
    """Per path, the contents a node holds at it and in its conflict copies."""
    out: dict[str, set[str]] = defaultdict(set)
    for path, h in tree.items():
        out[original_of(path) or path].add(h)
    return out


def conflicts(history: History, logged: Mapping[int, list[tuple[str, int, str | None, str]]]
              ) -> dict[str, Any]:
    """Expected against logged. ``logged`` maps a node to its log: (path, loser's node,
    loser's hash or None, conflict id)."""
    losers: set[int] = set()
    unmatched: set[str] = set()
    ids_per_node: dict[int, set[str]] = {}
    for node, entries in logged.items():
        ids_per_node[node] = {cid for *_, cid in entries}
        for path, loser_node, loser_hash, cid in entries:
            rid = history.loser_of(path, loser_node, loser_hash)
            if rid is None:
                unmatched.add(cid)
            else:
                losers.add(rid)
    expected = missing = indeterminate = 0
    in_groups: set[int] = set()
    for members, clique in history.groups():
        in_groups.update(members)
        found = len(losers.intersection(members))
        if clique:
            expected += len(members) - 1
            missing += max(0, len(members) - 1 - found)
        else:
            indeterminate += 1
            expected += 1
            missing += 0 if found else 1
    every = set.intersection(*ids_per_node.values()) if ids_per_node else set()
    union = set.union(*ids_per_node.values()) if ids_per_node else set()
    return {
        "conflicts_expected": expected,
        "conflicts_logged": len(losers) + len(unmatched),
        "conflicts_missing": missing,
        "conflicts_unexpected": len(losers - in_groups),
        "conflicts_unexpected_paths": sorted({history.records[r].path
                                              for r in losers - in_groups})[:SHOWN],
        "conflicts_unmatched": len(unmatched),
        "conflicts_indeterminate_groups": indeterminate,
        "conflicts_logged_per_node": {str(n): len(ids) for n, ids in sorted(ids_per_node.items())},
        "conflicts_not_on_every_node": len(union - every),
    }


def first_after(times: list[float], t: float) -> float | None:
    i = bisect.bisect_left(times, t)
    return times[i] if i < len(times) else None
