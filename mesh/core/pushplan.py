"""What this node pushes to which peer, and when (issue 11), with no I/O and no clock.

The caller reports what happened (a new version on our disk, a peer found behind
by a resync, lsyncd's gate asking, a push started or ended, a peer's announcement)
and asks what to push now: ``tick`` returns the pushes to start, each of at most
``PATHS_PER_PUSH`` paths, and when to tick again. Time comes in as ``now`` (seconds,
monotonic), the replica through ``PushView``: the gate and the disk version.

Policy (issue 12: lsyncd is the live push path):

* a healthy mesh moves each version once per peer, and our own writes go by
  lsyncd: its gate asks (``unclaimed``, ``grantable``) and the push it starts is
  ``own=False``. Our pusher takes an own write ``own_grace`` after lsyncd has
  shown it will not carry it: lsyncd asked about it and left it (lsyncd asks once
  per event; a write that changes again is asked about again), a push of it
  failed, was abandoned or never confirmed, or a resync found the peer behind.
  Any other own write is lsyncd's next batch while one of its batches to that
  peer runs (ours if that takes ``LSYNCD_WAIT_GRACES`` graces), and ours
  ``own_grace`` after the last one ended (lsyncd stopped; the peer was away or
  not current);
* a version written elsewhere is *forwarded* once the peer is still behind after
  ``FORWARD_GRACE`` if our link to its writer is down (so a partition heals), after
  ``FORWARD_LINKED_GRACE`` if it is up (the writer pushes it; issue 16: ten nodes
  forwarding what a busy writer had not pushed yet moved each version 2.75 times);
* a path is in at most one push to a peer at a time, and a delivered version
  is not pushed again while the peer's announcement of it is awaited; if none
  came within ``CONFIRM_S``, the path is queued again;
* one push of our own per peer at a time; after a failed push (ours or lsyncd's),
  none of ours to that peer before the backoff (``RETRY_S``, doubling from the
  push's start) is over. Its paths stay queued: a failed push is always ours to
  retry, whoever started it (rsync's exit status is known for both).

The states and transitions are in mesh/core/pushstate.py, in one table; every
move of a path or a peer goes through it. Driving it: ``mesh/engine/pushes.py``
(the agent) and ``tests/core/sim.py`` (a simulated node), with ``changed``,
``behind``, ``heard`` (the peer's manifests), ``linked``, lsyncd's ``unclaimed`` →
scan → ``grantable`` → ``start(own=False)``, ``tick`` for ours, and ``end`` with
rsync's exit status for every push.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from mesh.core.manifest import Entry
from mesh.core.pushstate import (
    CONFIRM_S,
    TRANSITIONS,
    Counters,
    Event,
    PeerEvent,
    PeerQueue,
    PeerStage,
    Push,
    PushView,
    Stage,
    Tick,
    earliest,
)
from mesh.core.replica import group
from mesh.core.resolver import Version
from mesh.core.vclock import Ordering
from mesh.errors import LocalProtocolError

OWN_GRACE = 1.0  # an own write lsyncd has not carried by then is ours to push
# ... and while lsyncd keeps pushing to that peer, this many graces: lsyncd asks once per
# event, and a write whose event it saw before the agent recorded the write (found at a
# push's end, say) is not asked about again.
LSYNCD_WAIT_GRACES = 5
FORWARD_GRACE = 5.0  # a version whose writer our links do not reach
FORWARD_LINKED_GRACE = 30.0  # ... and one whose writer they reach
PATHS_PER_PUSH = 2000  # keeps the announcement under the manifest's size limits
RETRY_S = (1.0, 30.0)  # backoff after a failed push: first, most
VANISHED = 24  # rsync's "some files vanished before they could be transferred"
_HOLDS = (Ordering.EQUAL, Ordering.AFTER)  # a peer's vector against what we pushed
_NOBODY = PeerQueue("")  # what a peer not known yet has: read, never written


class PushPlanner:
    def __init__(self, me: str, view: PushView, *, own_grace: float = OWN_GRACE) -> None:
        self.me = me
        self.view = view
        self.own_grace = own_grace
        self.counters = Counters()
        self._peers: dict[str, PeerQueue] = {}
        self._open: dict[int, Push] = {}
        self._linked: frozenset[str] = frozenset()
        self._keys = itertools.count(1)

    # --- the one place a path changes stage ---------------------------------------

    def _fire(self, q: PeerQueue, path: str, event: Event, now: float, *, key: int = 0,
              pushed: Version | None = None) -> Stage:
        before = q.at(path)
        after = TRANSITIONS.get((before, event))
        if after is None:
            raise LocalProtocolError(f"{path} to {q.name}: {event.value} while {before.name}")
        queued, sending, awaiting = after.value
        q.not_before.pop(path, None)
        if queued:
            q.queued.setdefault(path, now)
        else:
            q.queued.pop(path, None)
        # A change makes an inotify event, so lsyncd asks again; a push that failed, was
        # abandoned or never confirmed makes none: it is our pusher's to send.
        if event is Event.CHANGED or not queued:
            q.left.pop(path, None)
        elif event in (Event.FAILED, Event.RELEASED, Event.UNCONFIRMED):
            q.left[path] = now
        if sending and not before.value[1]:
            q.sending[path] = key
        elif not sending:
            q.sending.pop(path, None)
        if awaiting and pushed is not None:
            q.awaiting.pop(path, None)  # appended anew: the dict stays in deadline order
            q.awaiting[path] = (pushed, now + CONFIRM_S)
        elif not awaiting:
            q.awaiting.pop(path, None)
        return after

    # --- inputs -------------------------------------------------------------------

    def add_peer(self, peer: str) -> None:
        self._queue(peer)

    def peers(self) -> list[str]:
        return list(self._peers)

    def changed(self, path: str, now: float) -> None:
        """Our disk holds a new version of ``path``: every peer may need it."""
        for q in self._peers.values():
            self._fire(q, path, Event.CHANGED, now)

    def behind(self, peer: str, paths: Iterable[str], now: float, *,
               checked: bool = False) -> int:
        """After a resync with ``peer``: queue those of ``paths`` it is behind on (all if
        ``checked``: the gate was asked in bulk). Returns how many are queued for it."""
        q = self._queue(peer)
        for path in paths:
            if checked or self.view.may_push(peer, path):
                self._fire(q, path, Event.CHANGED, now)
                q.left[path] = now  # no event of lsyncd's will name it
        return len(q.queued)

    def unasked(self, path: str, now: float) -> None:
        """After ``changed``: lsyncd may drop the event of our write at ``path`` (noted as
        the agent's own change moments before: ``mesh.adapters.lsyncd.agentwrites``).
        Ours ``own_grace`` from now, not ``LSYNCD_WAIT_GRACES`` graces after."""
        for q in self._peers.values():
            if path in q.queued and path not in q.sending:
                q.left.setdefault(path, now)

    def heard(self, peer: str, entries: Iterable[Entry]) -> None:
        """``peer`` announced these entries (a manifest, a catch-up's): a push awaiting
        the version, or one before it, is confirmed; a path only queued that the gate no
        longer lets go is dropped now, not at its grace (issue 16: among ten nodes)."""
        q = self._peers.get(peer)
        if q is None or not (q.awaiting or q.queued):
            return
        for path, version in group(e for e in entries if e.path in q.awaiting
                                   or e.path in q.queued).items():
            pushed = q.awaiting.get(path)
            if pushed is not None and version.vector.compare(pushed[0].vector) in _HOLDS:
                self._fire(q, path, Event.CONFIRMED, 0.0)  # queues nothing anew
            elif not (pushed or path in q.sending or self.view.may_push(peer, path)):
                self._fire(q, path, Event.DROPPED, 0.0)

    def linked(self, nodes: Iterable[str]) -> None:
        """Our links reach these nodes now: what they wrote is theirs to push."""
        linked = frozenset(nodes)
        if linked != self._linked:
            self._linked = linked
            for q in self._peers.values():
                q.not_before.clear()  # the forwarding graces change

    def unclaimed(self, peer: str, paths: Iterable[str], now: float, *,
                  current: bool = True) -> list[str]:
        """lsyncd's gate asks about ``paths``: those our pusher is not carrying (or has
        carried, awaiting the peer's announcement). Scan them, then ``grantable``. Nothing
        goes to a peer we are not current with: a push would race its partition writes."""
        if not current:
            return []
        q = self._queue(peer)
        return [p for p in paths if p and not self._claimed(q, p, now)]

    def grantable(self, peer: str, paths: Iterable[str], now: float, *, asked: int,
                  ) -> list[str]:
        """After the scan: which of ``paths`` lsyncd may push now (our own writes only),
        counted. ``asked``: how many paths it asked about. Start them in pushes of at
        most ``PATHS_PER_PUSH``, each after ``narrow`` once an earlier one has run."""
        paths = list(paths)
        allowed = self.narrow(peer, paths, now)
        q = self._queue(peer)
        taken = set(allowed)
        for path in paths:  # asked about and left: lsyncd will not ask again unless it changes
            if path not in taken and path in q.queued and path not in q.sending:
                q.left.setdefault(path, now)
        for counters in (self.counters, q.counters):
            counters.allowed += len(allowed)
            counters.denied += asked - len(allowed)
        return allowed

    def narrow(self, peer: str, paths: Iterable[str], now: float) -> list[str]:
        """Those of ``paths`` that may still go to ``peer`` as lsyncd's: our own writes,
        which the gate lets through, that no push carries or awaits confirmation of."""
        q = self._queue(peer)
        return [p for p in paths if self._own(peer, p) and not self._claimed(q, p, now)]

    def start(self, peer: str, paths: Iterable[str], now: float, *, own: bool) -> Push:
        """A push of ``paths`` to ``peer`` starts, at their disk versions now."""
        q = self._queue(peer)
        paths = list(paths)
        if not paths:
            raise LocalProtocolError(f"an empty push to {peer}")
        versions: list[tuple[str, Version]] = []
        for path in paths:
            version = self.view.disk(path)
            if version is None:
                raise LocalProtocolError(f"push of {path} to {peer}: no version on disk")
            if (q.at(path), Event.TAKEN) not in TRANSITIONS:
                raise LocalProtocolError(f"push of {path} to {peer} while {q.at(path).name}")
            versions.append((path, version))
        if len(set(paths)) != len(paths):
            raise LocalProtocolError(f"push to {peer} lists a path twice")
        if own:
            q.move(PeerEvent.SENT)
        else:
            q.lsyncd_open += 1
        push = Push(next(self._keys), peer, tuple(versions), now, own)
        for path in paths:
            self._fire(q, path, Event.TAKEN, now, key=push.key)
        self._open[push.key] = push
        return push

    def end(self, push: Push, now: float, status: int) -> None:
        """``push`` ended with rsync's exit ``status`` (ours or lsyncd's: both are run
        by the agent). Delivered, the peer's announcement confirms it (or the recheck
        after ``CONFIRM_S`` queues it again); failed, its paths are queued for us."""
        q = self._close(push)
        # 24: files vanished before rsync read them (deleted or renamed meanwhile), the
        # rest went. Each vanished path's disk version moved on, so it is OVERTAKEN and
        # goes again with its new version; lsyncd too counts 24 as done.
        ok = status in (0, VANISHED)
        for path, version in push.versions:
            event = (Event.FAILED if not ok else
                     Event.DELIVERED if self.view.disk(path) == version else Event.OVERTAKEN)
            self._fire(q, path, event, now, pushed=version)
        self.counters.count(push, ok)
        q.counters.count(push, ok)
        if not push.own:
            q.lsyncd_open -= 1
            q.lsyncd_ended = now
        if ok:
            if push.own:
                q.move(PeerEvent.SUCCEEDED)
                q.failures = 0
            return
        q.failures += 1
        q.retry_at = push.started + min(RETRY_S[1], RETRY_S[0] * 2 ** (q.failures - 1))
        if push.own or q.stage is not PeerStage.PUSHING:  # else our push's end decides
            q.move(PeerEvent.FAILED)

    def abandon(self, push: Push) -> None:
        """``push`` was cut short by us (the agent stops): release its paths."""
        q = self._close(push)
        for path, _ in push.versions:
            self._fire(q, path, Event.RELEASED, push.started)
        if push.own:
            q.move(PeerEvent.ABANDONED)
        else:
            q.lsyncd_open -= 1

    # --- outputs ------------------------------------------------------------------

    def tick(self, now: float, up: Iterable[str]) -> Tick:
        """Start what is due for the peers in ``up`` (link up, our view of them current):
        for each, one batch of our own unless one is running or it is backing off."""
        pushes: list[Push] = []
        wake: float | None = None
        for peer in up:
            q = self._peers.get(peer)
            if q is None or q.stage is PeerStage.PUSHING:
                continue  # its push's end ticks again
            wake = earliest(wake, self._recheck(q, now))
            if not q.queued:
                continue
            if q.stage is PeerStage.BACKING_OFF:
                if now < q.retry_at:
                    wake = earliest(wake, q.retry_at)
                    continue
                q.move(PeerEvent.RETRY_DUE)
            ready, due = self._ready(q, now)
            wake = earliest(wake, due)
            if ready:
                pushes.append(self.start(peer, ready, now, own=True))
        return Tick(tuple(pushes), wake)

    def pending(self, peer: str) -> int:
        """Paths queued for ``peer`` or on their way to it."""
        q = self._peers.get(peer)
        if q is None:
            return 0
        # Not a union of the two (a set of the whole queue every status second): what
        # is sending is a push's worth, the queue may be a catch-up's.
        return len(q.queued) + sum(1 for p in q.sending if p not in q.queued)

    def looked_at(self, peer: str, now: float, limit: int) -> list[str]:
        """The first ``limit`` paths queued for ``peer`` that a tick at ``now`` asks the
        view about: not on their way, not held back by a grace (issue 16: among ten
        nodes each receiver holds every file it was sent, queued for its other peers
        until they announce it, and read their states at every tick)."""
        q = self._peers.get(peer)
        if q is None or (q.stage is PeerStage.BACKING_OFF and now < q.retry_at):
            return []
        held = q.not_before
        return list(itertools.islice(
            (p for p in q.queued if p not in q.sending and not now < held.get(p, now)),
            limit))

    def stage(self, peer: str, path: str) -> Stage:
        return self._peers.get(peer, _NOBODY).at(path)

    def due_since(self, peer: str, path: str) -> float | None:
        """When ``path`` became due for ``peer``, while it is queued."""
        return self._peers.get(peer, _NOBODY).queued.get(path)

    def peer_stage(self, peer: str) -> PeerStage:
        return self._peers.get(peer, _NOBODY).stage

    def peer_counters(self, peer: str) -> Counters:
        q = self._peers.get(peer)
        return Counters() if q is None else q.counters

    # --- internals ----------------------------------------------------------------

    def _queue(self, peer: str) -> PeerQueue:
        q = self._peers.get(peer)
        if q is None:
            q = self._peers[peer] = PeerQueue(peer)
        return q

    def _close(self, push: Push) -> PeerQueue:
        if self._open.pop(push.key, None) is None:
            raise LocalProtocolError(f"push {push.key} to {push.peer} ended twice")
        return self._peers[push.peer]

    def _own(self, peer: str, path: str) -> bool:
        """Whether this node wrote our version of ``path`` and it may go to ``peer``
        (asked in that order: lsyncd asks about every file a peer pushed in)."""
        disk = self.view.disk(path)
        return (disk is not None and disk.winner.writer == self.me
                and self.view.may_push(peer, path))

    def _claimed(self, q: PeerQueue, path: str, now: float) -> bool:
        """Whether ``path`` is on its way to the peer already: a push carries it now, or
        one delivered our current version and the peer has not announced it back yet."""
        if path in q.sending:
            return True
        pushed = q.awaiting.get(path)
        if pushed is None:
            return False
        if now < pushed[1] and pushed[0] == self.view.disk(path):
            return True
        self._fire(q, path, Event.UNCONFIRMED, now)
        return False

    def _recheck(self, q: PeerQueue, now: float) -> float | None:
        """Pushed paths the peer never announced back go round again; returns the
        next time one will."""
        # In deadline order (``_fire`` appends anew, at a push's end + CONFIRM_S): a tick
        # costs what falls due, not a catch-up's tens of thousands awaiting (issue 16).
        due = list(itertools.takewhile(lambda kv: now >= kv[1][1], q.awaiting.items()))
        for path, _ in due:
            self._fire(q, path, Event.UNCONFIRMED, now)
        return next((until for _, until in q.awaiting.values()), None)

    def _ready(self, q: PeerQueue, now: float) -> tuple[list[str], float | None]:
        """Queued paths due now, oldest first, at most ``PATHS_PER_PUSH``; and when the
        next of the others falls due."""
        ready: list[str] = []
        wake: float | None = None
        for path, since in list(q.queued.items()):
            if path in q.sending:
                continue  # lsyncd's gate carries it; confirmed or retried afterwards
            later = q.not_before.get(path)
            if later is not None and now < later:
                wake = earliest(wake, later)
                continue
            if not self.view.may_push(q.name, path):
                self._fire(q, path, Event.DROPPED, now)  # the peer has it (or newer)
                continue
            if self._claimed(q, path, now):
                self._fire(q, path, Event.CONFIRMING, now)  # rechecked after CONFIRM_S
                continue
            disk = self.view.disk(path)  # may_push held: ours if we wrote it
            if disk is not None and disk.winner.writer == self.me:
                left = q.left.get(path)
                if left is not None:  # lsyncd will not ask about it again
                    due = left + self.own_grace
                elif q.lsyncd_open:  # lsyncd's next batch, unless it is long in coming
                    due = since + LSYNCD_WAIT_GRACES * self.own_grace
                else:
                    due = max(since, q.lsyncd_ended) + self.own_grace
            else:
                linked = disk is not None and disk.winner.writer in self._linked
                due = since + (FORWARD_LINKED_GRACE if linked else FORWARD_GRACE)
            if now >= due:
                ready.append(path)
            else:
                q.not_before[path] = due
                wake = earliest(wake, due)
            if len(ready) >= PATHS_PER_PUSH:
                return ready, now
        return ready, wake

