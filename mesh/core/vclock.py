"""Version vectors and the hybrid logical clock.

A version vector maps node ids to counters. Two vectors are equal, one is
before the other, or they are concurrent (neither saw the other). Counters
of absent nodes are zero. Values are immutable; every operation returns a new
vector. Time never comes from the machine here: callers pass it in.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from mesh.errors import LocalProtocolError

NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_COUNTER = 2**63 - 1


def check_node_id(node: str) -> str:
    """Return ``node`` if it is a valid node id, else raise ``LocalProtocolError``."""
    if not isinstance(node, str) or NODE_ID_RE.fullmatch(node) is None:
        raise LocalProtocolError(f"invalid node id {node!r}")
    return node


class Ordering(enum.Enum):
    EQUAL = "equal"
    BEFORE = "before"
    AFTER = "after"
    CONCURRENT = "concurrent"


@dataclass(frozen=True, slots=True)
class VersionVector(Mapping[str, int]):
    """An immutable ``{node_id: counter}`` map with zero counters dropped."""

    _items: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        previous = None
        for node, counter in self._items:
            check_node_id(node)
            if type(counter) is not int or not 0 < counter <= MAX_COUNTER:
                raise LocalProtocolError(f"invalid counter {counter!r} for {node}")
            if previous is not None and node <= previous:
                raise LocalProtocolError("vector items must be sorted and unique")
            previous = node

    @classmethod
    def of(cls, counters: Mapping[str, int] | None = None) -> VersionVector:
        """Build from a mapping; zero counters are dropped."""
        if not counters:
            return _EMPTY
        return cls(tuple(sorted((n, c) for n, c in counters.items() if c != 0)))

    # Mapping protocol -------------------------------------------------------
    def __getitem__(self, node: str) -> int:
        for n, c in self._items:
            if n == node:
                return c
        raise KeyError(node)

    def get(self, node: str, default: int = 0) -> int:  # type: ignore[override]
        for n, c in self._items:
            if n == node:
                return c
        return default

    def __iter__(self) -> Iterator[str]:
        return (n for n, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> tuple[tuple[str, int], ...]:  # type: ignore[override]
        """The (node, counter) pairs, sorted by node: the stored tuple itself."""
        return self._items

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}:{c}" for n, c in self._items)
        return f"VV({inner})"

    # Operations -------------------------------------------------------------
    def compare(self, other: VersionVector) -> Ordering:
        """How ``self`` relates to ``other``."""
        less = greater = False
        a, b = dict(self._items), dict(other._items)
        for node in a.keys() | b.keys():
            x, y = a.get(node, 0), b.get(node, 0)
            if x < y:
                less = True
            elif x > y:
                greater = True
            if less and greater:
                return Ordering.CONCURRENT
        if less:
            return Ordering.BEFORE
        if greater:
            return Ordering.AFTER
        return Ordering.EQUAL

    def merge(self, other: VersionVector) -> VersionVector:
        """Pointwise maximum."""
        merged = dict(self._items)
        for node, counter in other._items:
            if counter > merged.get(node, 0):
                merged[node] = counter
        return VersionVector(tuple(sorted(merged.items())))

    def increment(self, node: str) -> VersionVector:
        """This vector with ``node``'s counter one higher."""
        bumped = dict(self._items)
        bumped[check_node_id(node)] = bumped.get(node, 0) + 1
        return VersionVector(tuple(sorted(bumped.items())))

    def dominates(self, other: VersionVector) -> bool:
        """True when ``self`` is strictly after ``other``."""
        return self.compare(other) is Ordering.AFTER

    def to_dict(self) -> dict[str, int]:
        return dict(self._items)


_EMPTY = VersionVector()

# --- hybrid logical clock ---------------------------------------------------
#
# A stamp packs wall milliseconds and a logical counter into one integer,
# (ms << LOGICAL_BITS) | logical, so stamps compare as plain integers and fit
# msgpack's int64. The logical part orders events within one millisecond and
# lets a node stay ahead of a peer whose clock runs fast.

LOGICAL_BITS = 16
MAX_HLC = 2**63 - 1


def hlc_pack(wall_ms: int, logical: int = 0) -> int:
    return (wall_ms << LOGICAL_BITS) | logical


def hlc_wall_ms(stamp: int) -> int:
    return stamp >> LOGICAL_BITS


def hlc_tick(last: int, wall_ms: int) -> int:
    """A stamp for a local event: after ``last`` and at least the wall clock."""
    physical = hlc_pack(wall_ms)
    return physical if physical > last else last + 1


def hlc_observe(last: int, remote: int, wall_ms: int) -> int:
    """The clock after receiving ``remote``: after both, at least the wall clock."""
    return hlc_tick(max(last, remote), wall_ms)
