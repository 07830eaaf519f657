"""Reliable delivery of manifests over links that drop, duplicate and reconnect.

amqtt's QoS 1 drops a message after a 5 s acknowledgement wait and does not
resend in-flight messages after a reconnect (DESIGN.md, amqtt table), so the
mesh carries its own envelope: every manifest has ``(origin, epoch, seq)``.
``epoch`` changes each time the origin starts; ``seq`` counts from 1 within it.

* ``Outbox`` (origin side) numbers manifests and keeps a bounded replay log.
* ``Inbox`` (receiver side, one per origin) applies manifests in order, drops
  duplicates, buffers a bounded number ahead of a gap and asks for a replay
  from the first missing seq; when the log no longer reaches back, or the
  origin restarted (new epoch), or the buffer overflows, or the origin went
  back (an older epoch, or heads behind ``applied``: it lost its state), it asks
  for a *resync*: a digest comparison and the entries that differ.

Applying a manifest twice or out of order is harmless for the replica (its
state is a semilattice), so the inbox exists for completeness and efficiency,
not for safety. No I/O and no clock here: times are passed in.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from mesh.core import manifest
from mesh.core.manifest import Entry, Manifest
from mesh.errors import LocalProtocolError


class Outbox:
    """Numbers this node's manifests and keeps the last ones for replay."""

    def __init__(self, origin: str, epoch: int, *, max_log: int = 4096,
                 max_log_bytes: int = 64 << 20) -> None:
        self.origin = origin
        self.epoch = epoch
        self.seq = 0
        self.max_log = max_log
        self.max_log_bytes = max_log_bytes
        self._log: deque[tuple[int, bytes]] = deque()
        self._log_bytes = 0

    def next(self, entries: tuple[Entry, ...],
             conflicts: tuple[tuple[Entry, Entry], ...] = ()) -> bytes:
        """Encode the next manifest and remember it for replay."""
        self.seq += 1
        payload = manifest.encode(Manifest(self.origin, self.epoch, self.seq, entries, conflicts))
        self._log.append((self.seq, payload))
        self._log_bytes += len(payload)
        while len(self._log) > self.max_log or self._log_bytes > self.max_log_bytes:
            _, old = self._log.popleft()
            self._log_bytes -= len(old)
        return payload

    def replay(self, epoch: int, from_seq: int) -> list[bytes] | None:
        """Manifests ``from_seq``..last of ``epoch``, or None when the log no
        longer reaches back that far (or the epoch is not ours)."""
        if epoch != self.epoch:
            return None
        if from_seq > self.seq:
            return []
        if not self._log or self._log[0][0] > from_seq:
            return None
        first = self._log[0][0]
        return [payload for _, payload in list(self._log)[from_seq - first:]]


class Need(enum.Enum):
    NOTHING = "nothing"
    REPLAY = "replay"   # ask the origin to resend from ``Inbox.applied + 1``
    RESYNC = "resync"   # compare digests and fetch what differs


@dataclass
class Inbox:
    """Receiver-side sequencing for one origin."""

    origin: str
    max_pending: int = 512
    retry_s: float = 2.0
    epoch: int | None = None
    applied: int = 0
    pending: dict[int, Manifest] = field(default_factory=dict)
    replay_asked_at: float | None = None
    resync_asked_at: float | None = None
    resync_pending: bool = False  # asked and not completed: asked again after retry_s
    applied_at_head: int | None = None  # ``applied`` when the previous head came
    behind_at_head: bool = False  # the previous head was behind ``applied``
    applied_at_resync: int | None = None  # ``applied`` when the pending resync was asked
    duplicates: int = 0
    gaps: int = 0

    def offer(self, m: Manifest, now: float) -> tuple[list[Manifest], Need]:
        """A manifest arrived: what to apply now, in order, and what to ask for."""
        if m.origin != self.origin:
            raise LocalProtocolError("manifest offered to the wrong inbox")
        need = Need.NOTHING
        if self.epoch is None or m.epoch > self.epoch:
            # First contact or the origin restarted: what came before is unknown.
            self.epoch, self.applied, self.pending = m.epoch, m.seq - 1, {}
            self.replay_asked_at = None
            need = self._ask_resync(now)
        elif m.epoch < self.epoch:
            self.duplicates += 1  # a late message of an older incarnation
            return [], Need.NOTHING
        if m.seq <= self.applied or m.seq in self.pending:
            self.duplicates += 1
            return [], need
        self.pending[m.seq] = m
        ready = self._drain()
        if self.pending:
            if len(self.pending) > self.max_pending:
                self.pending.clear()
                self.gaps += 1
                return ready, self._ask_resync(now)
            if need is Need.NOTHING:
                need = self._ask_replay(now)
        return ready, need

    def head(self, epoch: int, seq: int, now: float) -> Need:
        """The origin says it is at ``seq`` of ``epoch`` (a liveness message).

        A head ahead of ``applied`` asks for a replay only when nothing was applied
        since the previous head: while manifests still arrive, the tail is in flight
        (heads overtake them, and a busy link holds hundreds), and a gap in the middle
        shows in ``offer``. Replaying the whole window on every head doubled the traffic
        of a busy link (tests/integration/test_mesh.py, 10,000 manifests)."""
        stalled = self.applied_at_head == self.applied
        self.applied_at_head = self.applied
        was_behind, self.behind_at_head = self.behind_at_head, False
        if self.epoch is None or epoch > self.epoch:
            self.epoch, self.applied, self.pending = epoch, seq, {}
            return self._ask_resync(now)
        if self.resync_pending or epoch < self.epoch:
            # An older epoch than one we heard of: that one was not the origin's own (a
            # forged or corrupt message), or its epoch went back. Dropping its manifests
            # as late ones would deafen us to it for good; its answer to a resync settles
            # which epoch is current (``resynced``).
            return self._ask_resync(now)
        if seq < self.applied:
            # Behind what we applied: a head that lost a race with a manifest, or twice
            # running, an origin that restarted without its state (same epoch, counting
            # from 1 again), whose manifests we would drop as duplicates. A resync costs
            # a digest; its answer tells which (``resynced``).
            self.behind_at_head = True
            return self._ask_resync(now) if was_behind else Need.NOTHING
        if epoch == self.epoch and seq > self.applied and stalled:
            return self._ask_replay(now)
        return Need.NOTHING

    def replay_gone(self, now: float) -> Need:
        """The origin's log does not reach back: fall back to a resync."""
        self.replay_asked_at = None
        return self._ask_resync(now, force=True)

    def resynced(self, epoch: int, seq: int) -> list[Manifest]:
        """A resync brought us up to ``seq`` of ``epoch``: skip what it covered.

        The epoch is the origin's own answer, so it is current even when lower than
        ours (see ``head``)."""
        floor, self.applied_at_resync = self.applied_at_resync, None
        self.resync_asked_at = None
        self.resync_pending = False
        if self.epoch is None or epoch != self.epoch:
            self.epoch, self.applied, self.pending = epoch, seq, {}
            return []
        # The answer was made after what we had applied when we asked had been sent; it
        # is below that only when the origin restarted without its state (see ``head``).
        # Newer manifests may have been applied meanwhile: above ``floor`` is no news.
        went_back = floor is not None and seq < floor
        if went_back or seq > self.applied:
            self.applied = seq
            self.pending = {s: m for s, m in self.pending.items() if s > seq}
        return self._drain()

    def _drain(self) -> list[Manifest]:
        ready = []
        while (nxt := self.pending.pop(self.applied + 1, None)) is not None:
            ready.append(nxt)
            self.applied += 1
        if not self.pending:
            self.replay_asked_at = None
        return ready

    def _ask_replay(self, now: float) -> Need:
        if self.resync_asked_at is not None and now - self.resync_asked_at < self.retry_s:
            return Need.NOTHING  # a resync in flight covers the gap
        if self.replay_asked_at is not None and now - self.replay_asked_at < self.retry_s:
            return Need.NOTHING
        self.replay_asked_at = now
        self.gaps += 1
        return Need.REPLAY

    def _ask_resync(self, now: float, *, force: bool = False) -> Need:
        if (not force and self.resync_asked_at is not None
                and now - self.resync_asked_at < self.retry_s):
            return Need.NOTHING
        if not self.resync_pending:
            self.applied_at_resync = self.applied
        self.resync_asked_at = now
        self.resync_pending = True
        return Need.RESYNC
