"""Coalesce change notifications into batches: a quiet delay plus a cap.

Like Syncthing's watch aggregator: a batch is due once no new path arrived for
``quiet`` seconds, or once the oldest pending path has waited ``cap`` seconds
(so a steady trickle cannot postpone it forever), or once ``max_paths``
distinct paths are pending. Time is passed in; nothing here sleeps.

``spacing`` is the least time from one batch to the next (a full batch does
not wait for it). With ``quiet`` 0 it batches by load alone: a change after a
lull goes out at once, and a steady stream goes out once per ``spacing``, in
batches as large as the stream (the manifests' batcher, mesh.engine.exchange).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.errors import LocalProtocolError


@dataclass
class Batcher:
    quiet: float = 0.05
    cap: float = 0.5
    max_paths: int = 4096
    spacing: float = 0.0
    _pending: dict[str, None] = field(default_factory=dict, init=False)
    _first: float | None = field(default=None, init=False)
    _last: float | None = field(default=None, init=False)
    _taken: float | None = field(default=None, init=False)  # when the last batch went

    def __post_init__(self) -> None:
        if not 0 <= self.quiet <= self.cap or self.max_paths < 1 or self.spacing < 0:
            raise LocalProtocolError(
                "batcher needs 0 <= quiet <= cap, spacing >= 0 and max_paths >= 1")

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
        due = min(self._last + self.quiet, self._first + self.cap)
        if self._taken is not None:
            due = max(due, self._taken + self.spacing)
        return due

    def due(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def take(self, now: float) -> list[str]:
        """The pending paths in arrival order if the batch is due, else []."""
        if not self.due(now):
            return []
        return self.flush(now)

    def flush(self, now: float | None = None) -> list[str]:
        """All pending paths now, due or not; ``now`` starts the ``spacing``."""
        batch = list(self._pending)
        self._pending.clear()
        self._first = self._last = None
        if now is not None:
            self._taken = now
        return batch
