"""What this node knows of one peer's stream (``mesh.engine.exchange`` keeps one a peer)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from mesh.core import wire
from mesh.core.delivery import Inbox


@dataclass
class PeerView:
    """What this node knows of one peer's stream."""

    inbox: Inbox
    hello: wire.Hello | None = None
    last_head: float | None = None
    head: tuple[float, int, int] | None = None  # the last head: (wall time, epoch, seq)
    # What had to be applied before our view of the peer was current again after its
    # link last came up: (that link's start, epoch, seq); see ``caught_up``.
    mark: tuple[float, int, int] | None = None
    resync: asyncio.Task[None] | None = None
    resync_started: float = 0.0  # monotonic time the running (or last) resync began
    applied_manifests: int = 0
    resyncs: int = 0  # catch-ups begun (a retry of one that failed counts again)
    caught_ups: int = 0  # ... and completed

    def doc(self) -> dict[str, Any]:
        """For the status: where its stream stands with us, and its last head."""
        inbox = self.inbox
        return {"applied_seq": inbox.applied, "epoch": inbox.epoch,
                "manifests": self.applied_manifests, "resyncs": self.resyncs,
                "catch_ups": self.caught_ups,
                "inbox_pending": len(inbox.pending), "resync_pending": inbox.resync_pending,
                "head_seq": None if self.head is None else self.head[2],
                "head_at": None if self.head is None else self.head[0]}

    def caught_up(self, since: float) -> bool:
        """Whether we hold all that the peer had published when its link came up at
        ``since`` (wall time): the first head it sent after that, applied. Until then
        what we know of its versions is stale — in a partition it wrote on — and a push
        of ours would race its writes instead of resolving with them first."""
        if self.head is None:
            return False
        inbox = self.inbox
        if self.mark is None or self.mark[0] != since or (
                inbox.epoch is not None and inbox.epoch > self.mark[1]):
            if self.head[0] < since:
                return False  # no head heard on this link yet
            self.mark = (since, self.head[1], self.head[2])
        _, epoch, seq = self.mark
        syncing = inbox.resync_pending or (self.resync is not None and not self.resync.done())
        return not syncing and inbox.epoch == epoch and inbox.applied >= seq


def catching_up(view: PeerView | None, since: float | None) -> bool:
    """Whether we are still to catch up with a peer whose link is up (since ``since``):
    nothing heard from it yet, no head of this link's yet, a catch-up running, or one
    that failed and waits for its retry (``Inbox.resync_pending``), or manifests up to
    its first head not applied. Issue 16: health counted only a catch-up running, and
    was satisfied between the attempts of one that kept failing."""
    return view is None or since is None or not view.caught_up(since)
