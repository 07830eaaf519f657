"""Coalesce change notifications into batches: a quiet delay plus a cap.

Like Syncthing's watch aggregator: a batch is due once no new path arrived for
``quiet`` seconds, or once the oldest pending path has waited ``cap`` seconds
(so a steady trickle cannot postpone it forever), or once ``max_paths``
distinct paths are pending. Time is passed in; nothing here sleeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.errors import LocalProtocolError


@dataclass
class Batcher:
    quiet: float = 0.05
    cap: float = 0.5
    max_paths: int = 4096
    _pending: dict[str, None] = field(default_factory=dict, init=False)
    _first: float | None = field(default=None, init=False)
    _last: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not 0 <= self.quiet <= self.cap or self.max_paths < 1:
            raise LocalProtocolError("batcher needs 0 <= quiet <= cap and max_paths >= 1")

    def add(self, path: str, now: float) -> None:
        """Note that ``path`` changed at ``now``; repeated paths coalesce."""
        if self._first is None:
            self._first = now
        self._last = now
        self._pending[path] = None

    def __len__(self) -> int:
        return len(self._pending)

    def deadline(self) -> float | None:
        """When the pending batch falls due, or None when nothing is pending."""
        if self._first is None or self._last is None:
            return None
        if len(self._pending) >= self.max_paths:
            return self._last
        return min(self._last + self.quiet, self._first + self.cap)

    def due(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def take(self, now: float) -> list[str]:
        """The pending paths in arrival order if the batch is due, else []."""
        if not self.due(now):
            return []
        return self.flush()

    def flush(self) -> list[str]:
        """All pending paths now, due or not."""
        batch = list(self._pending)
        self._pending.clear()
        self._first = self._last = None
        return batch
