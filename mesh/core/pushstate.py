"""Where each path stands with each peer, and how it moves (issue 11): one table.

mesh/core/pushplan.py plans pushes; every change of a path's stage with a peer
goes through ``TRANSITIONS`` (a pair not listed there is a misuse of the
planner: ``LocalProtocolError``), every change of a peer's through
``PEER_TRANSITIONS``, as h11's ``_state.py`` does for HTTP.

Each (peer, path) is in one ``Stage``: queued (due to go, with the time it
became due), sending (a push carries it now), awaiting (a push delivered a
version and the peer has not announced it back), or queued and one of the
others. Events:

CHANGED      our disk holds a new version; or a resync found the peer behind
TAKEN        a push starts carrying it (not while sending or awaiting)
DELIVERED    the push ended with exit 0, our disk unchanged
OVERTAKEN    the push ended as delivered, but our disk moved on meanwhile
FAILED       the push ended with a non-zero status: queued again
RELEASED     the push was abandoned (the agent stops): queued again
DROPPED      picked from the queue, but the gate says no: the peer holds it or newer
CONFIRMING   picked from the queue, but the version it holds is awaited
UNCONFIRMED  the wait for the announcement ran out, or our disk moved past it
CONFIRMED    the peer announced the awaited version or a newer one

Per peer: READY -(a batch of ours starts)-> PUSHING -(exit 0)-> READY, or
-(failure)-> BACKING_OFF -(retry time passed)-> READY; abandoned: READY. A push of
lsyncd's that fails backs our pusher off too (READY or BACKING_OFF -> BACKING_OFF).

``PeerQueue`` holds one peer's side of it (each path's stage, the peer's stage and its
counters) and ``Push`` one push under way; the planner moves them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from mesh.core.replica import Replica
from mesh.core.resolver import Version
from mesh.errors import LocalProtocolError

CONFIRM_S = 30.0  # after a push, how long to wait for the peer's announcement before again


class Stage(enum.Enum):
    """Where one path stands with one peer: (queued, sending, awaiting)."""

    IDLE = (False, False, False)
    QUEUED = (True, False, False)
    SENDING = (False, True, False)
    QUEUED_SENDING = (True, True, False)
    AWAITING = (False, False, True)
    QUEUED_AWAITING = (True, False, True)


class Event(enum.Enum):
    CHANGED = "changed"
    TAKEN = "taken"
    DELIVERED = "delivered"
    OVERTAKEN = "overtaken"
    FAILED = "failed"
    RELEASED = "released"
    DROPPED = "dropped"
    CONFIRMING = "confirming"
    UNCONFIRMED = "unconfirmed"
    CONFIRMED = "confirmed"


class PeerStage(enum.Enum):
    READY = "ready"
    PUSHING = "pushing"  # one push of ours to the peer is running
    BACKING_OFF = "backing off"


class PeerEvent(enum.Enum):
    SENT = "sent"  # a batch of ours starts
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # a push of ours, or of lsyncd's while none of ours runs
    ABANDONED = "abandoned"
    RETRY_DUE = "retry due"  # a tick after the backoff, with paths queued


TRANSITIONS: dict[tuple[Stage, Event], Stage] = {
    (Stage.IDLE, Event.CHANGED): Stage.QUEUED,
    (Stage.IDLE, Event.TAKEN): Stage.SENDING,  # lsyncd's gate, for a path not queued
    (Stage.QUEUED, Event.CHANGED): Stage.QUEUED,  # it keeps the time it first became due
    (Stage.QUEUED, Event.TAKEN): Stage.QUEUED_SENDING,  # it leaves the queue once delivered
    (Stage.QUEUED, Event.DROPPED): Stage.IDLE,
    (Stage.SENDING, Event.CHANGED): Stage.QUEUED_SENDING,
    (Stage.SENDING, Event.DELIVERED): Stage.AWAITING,
    (Stage.SENDING, Event.OVERTAKEN): Stage.AWAITING,
    (Stage.SENDING, Event.FAILED): Stage.QUEUED,
    (Stage.SENDING, Event.RELEASED): Stage.QUEUED,
    (Stage.QUEUED_SENDING, Event.CHANGED): Stage.QUEUED_SENDING,
    (Stage.QUEUED_SENDING, Event.DELIVERED): Stage.AWAITING,
    (Stage.QUEUED_SENDING, Event.OVERTAKEN): Stage.QUEUED_AWAITING,  # the newer one still goes
    (Stage.QUEUED_SENDING, Event.FAILED): Stage.QUEUED,
    (Stage.QUEUED_SENDING, Event.RELEASED): Stage.QUEUED,
    (Stage.AWAITING, Event.CHANGED): Stage.QUEUED_AWAITING,
    (Stage.AWAITING, Event.UNCONFIRMED): Stage.QUEUED,
    (Stage.AWAITING, Event.CONFIRMED): Stage.IDLE,
    (Stage.QUEUED_AWAITING, Event.CHANGED): Stage.QUEUED_AWAITING,
    (Stage.QUEUED_AWAITING, Event.DROPPED): Stage.IDLE,
    (Stage.QUEUED_AWAITING, Event.CONFIRMING): Stage.AWAITING,
    (Stage.QUEUED_AWAITING, Event.UNCONFIRMED): Stage.QUEUED,
    (Stage.QUEUED_AWAITING, Event.CONFIRMED): Stage.QUEUED,
}
PEER_TRANSITIONS: dict[tuple[PeerStage, PeerEvent], PeerStage] = {
    (PeerStage.READY, PeerEvent.SENT): PeerStage.PUSHING,
    (PeerStage.PUSHING, PeerEvent.SUCCEEDED): PeerStage.READY,
    (PeerStage.PUSHING, PeerEvent.FAILED): PeerStage.BACKING_OFF,
    (PeerStage.READY, PeerEvent.FAILED): PeerStage.BACKING_OFF,  # lsyncd's push failed
    (PeerStage.BACKING_OFF, PeerEvent.FAILED): PeerStage.BACKING_OFF,  # ... again
    (PeerStage.PUSHING, PeerEvent.ABANDONED): PeerStage.READY,
    (PeerStage.BACKING_OFF, PeerEvent.RETRY_DUE): PeerStage.READY,
}


@dataclass(frozen=True)
class Push:
    """A push under way: these versions (path, version) to ``peer``."""

    key: int
    peer: str
    versions: tuple[tuple[str, Version], ...]
    started: float
    own: bool  # our pusher's (retried with backoff), else lsyncd's through the gate

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.versions]


@dataclass
class Counters:
    allowed: int = 0  # paths lsyncd's gate let through
    denied: int = 0
    carried: int = 0  # lsyncd's pushes (through the gate) that ended with exit 0
    carried_paths: int = 0
    carry_failures: int = 0
    sent: int = 0  # pushes of our own pusher that ended with exit 0
    sent_paths: int = 0
    send_failures: int = 0

    def count(self, push: Push, ok: bool) -> None:
        if push.own and ok:
            self.sent, self.sent_paths = self.sent + 1, self.sent_paths + len(push.versions)
        elif push.own:
            self.send_failures += 1
        elif ok:
            self.carried += 1
            self.carried_paths += len(push.versions)
        else:
            self.carry_failures += 1


@dataclass
class PeerQueue:
    """Where every path stands with one peer, and the peer's own stage."""

    name: str
    queued: dict[str, float] = field(default_factory=dict)  # path -> since; oldest first
    sending: dict[str, int] = field(default_factory=dict)  # path -> the push's key
    awaiting: dict[str, tuple[Version, float]] = field(default_factory=dict)  # -> until
    # Queued paths found not ours, not due before this time: ``_ready`` skips them until
    # then without asking the view (a burst forwarded is thousands of lookups a tick).
    # Any event of the path forgets it.
    not_before: dict[str, float] = field(default_factory=dict)
    stage: PeerStage = PeerStage.READY
    failures: int = 0
    retry_at: float = 0.0
    counters: Counters = field(default_factory=Counters)
    lsyncd_open: int = 0  # lsyncd's pushes to it under way
    lsyncd_ended: float = 0.0  # when the last of them ended
    # Queued paths lsyncd will not ask about again unless they change, since when.
    left: dict[str, float] = field(default_factory=dict)

    def at(self, path: str) -> Stage:
        try:
            return Stage((path in self.queued, path in self.sending, path in self.awaiting))
        except ValueError:
            raise LocalProtocolError(f"{path} to {self.name}: sending and awaiting") from None

    def move(self, event: PeerEvent) -> None:
        to = PEER_TRANSITIONS.get((self.stage, event))
        if to is None:
            raise LocalProtocolError(f"push to {self.name}: {event.value} while {self.stage.value}")
        self.stage = to


class PushView(Protocol):
    """What the planner asks of the replica."""

    def may_push(self, peer: str, path: str) -> bool:
        """The gate: whether our disk version of ``path`` may overwrite ``peer``'s."""
        ...

    def disk(self, path: str) -> Version | None:
        """The version whose content our data folder holds."""
        ...


@dataclass(frozen=True)
class ReplicaView:
    """A ``PushView`` of a ``Replica`` and its store."""

    replica: Replica

    def may_push(self, peer: str, path: str) -> bool:
        return self.replica.may_push(peer, path)

    def disk(self, path: str) -> Version | None:
        return self.replica.store.state(path).disk


@dataclass(frozen=True)
class Tick:
    pushes: tuple[Push, ...]  # started now: carry each out, then ``end`` it
    wake: float | None  # tick again by then at the latest (None: on the next input)


def earliest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)
