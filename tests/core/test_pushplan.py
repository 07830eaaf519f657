"""The push planner: every transition of its table, and its policy, with time passed in.

The laws over random runs are in test_pushplan_laws.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from mesh.core.manifest import Entry, Kind
from mesh.core.pushplan import (
    FORWARD_GRACE,
    FORWARD_LINKED_GRACE,
    LSYNCD_WAIT_GRACES,
    OWN_GRACE,
    PATHS_PER_PUSH,
    RETRY_S,
    PushPlanner,
)
from mesh.core.pushstate import (
    CONFIRM_S,
    PEER_TRANSITIONS,
    TRANSITIONS,
    Event,
    PeerStage,
    Push,
    Stage,
)
from mesh.core.resolver import Version
from mesh.core.vclock import VersionVector
from mesh.errors import LocalProtocolError

ME, PEER, OTHER = "n1", "n2", "n9"


@dataclass
class View:
    """The replica as the planner sees it: our disk versions, the peers' announcements,
    and the gate's rule (our disk version strictly dominates the peer's)."""

    disks: dict[str, Version] = field(default_factory=dict)
    seen: dict[tuple[str, str], VersionVector] = field(default_factory=dict)

    def may_push(self, peer: str, path: str) -> bool:
        disk = self.disks.get(path)
        seen = self.seen.get((peer, path))
        return disk is not None and (seen is None or disk.vector.dominates(seen))

    def disk(self, path: str) -> Version | None:
        return self.disks.get(path)

    def write(self, path: str, writer: str = ME) -> Version:
        """A new version of ``path`` on our disk, written by ``writer``."""
        old = self.disks.get(path)
        counters = {} if old is None else old.vector.to_dict()
        counters[writer] = counters.get(writer, 0) + 1
        vector = VersionVector.of(counters)
        version = Version((Entry(path, vector, bytes([len(counters) % 256]) * 32, 1, 0, 0o644,
                                 Kind.FILE, sum(counters.values()), writer),))
        self.disks[path] = version
        return version


class Rig:
    """A planner with one peer, and the calls a node would make."""

    def __init__(self, own_grace: float = 0.0) -> None:
        self.view = View()
        # Our pusher takes own writes at once here: these tests are about its mechanics.
        # The lsyncd-first policy (own_grace) has tests of its own below.
        self.plan = PushPlanner(ME, self.view, own_grace=own_grace)
        self.plan.add_peer(PEER)
        self.now = 100.0
        self.push: Push | None = None

    def write(self, path: str = "a", writer: str = ME) -> None:
        self.view.write(path, writer)
        self.plan.changed(path, self.now)

    def gate(self, paths: list[str], *, current: bool = True) -> list[str]:
        """lsyncd's question: what it may push now (and the grant, started)."""
        asked = self.plan.unclaimed(PEER, paths, self.now, current=current)
        allowed = self.plan.grantable(PEER, asked, self.now, asked=len(paths))
        if allowed:
            self.push = self.plan.start(PEER, allowed, self.now, own=False)
        return allowed

    def gate_all(self, paths: list[str]) -> list[str]:
        """lsyncd's question, answered but no push started."""
        asked = self.plan.unclaimed(PEER, paths, self.now)
        return self.plan.grantable(PEER, asked, self.now, asked=len(paths))

    def tick(self, up: bool = True) -> list[Push]:
        pushes = list(self.plan.tick(self.now, [PEER] if up else []).pushes)
        if pushes:
            self.push = pushes[0]
        return pushes

    def end(self, status: int = 0) -> None:
        assert self.push is not None
        self.plan.end(self.push, self.now, status)

    def announce(self, path: str = "a") -> None:
        """The peer announces that it holds our disk version."""
        vector = self.view.disks[path].vector
        self.view.seen[(PEER, path)] = vector
        self.plan.heard(PEER, self.view.disks[path].heads)

    @property
    def stage(self) -> Stage:
        return self.plan.stage(PEER, "a")

    def asked(self) -> list[str]:
        """From now on, each path the planner asks the gate's rule about (``may_push``),
        appended to the list returned, in order."""
        asked: list[str] = []
        real = self.view.may_push

        def counting(peer: str, path: str) -> bool:
            asked.append(path)
            return real(peer, path)

        self.view.may_push = counting  # type: ignore[method-assign]
        return asked


# --- every transition of the table -------------------------------------------------------


def _sending(r: Rig) -> None:
    r.view.write("a")
    r.push = r.plan.start(PEER, ["a"], r.now, own=False)


def _queued_sending(r: Rig) -> None:
    r.write()
    r.push = r.plan.start(PEER, ["a"], r.now, own=False)


def _awaiting(r: Rig) -> None:
    _sending(r)
    r.end()


def _queued_awaiting(r: Rig) -> None:
    """Awaiting, and queued again for the same version (a resync found it behind)."""
    _awaiting(r)
    r.plan.behind(PEER, ["a"], r.now)


REACH: dict[Stage, Callable[[Rig], None]] = {
    Stage.IDLE: lambda r: None,
    Stage.QUEUED: lambda r: r.write(),
    Stage.SENDING: _sending,
    Stage.QUEUED_SENDING: _queued_sending,
    Stage.AWAITING: _awaiting,
    Stage.QUEUED_AWAITING: _queued_awaiting,
}


def _unconfirmed(r: Rig) -> None:
    r.now += CONFIRM_S
    assert r.plan.unclaimed(PEER, ["a"], r.now) == ["a"]


def _overtaken(r: Rig) -> None:
    r.view.write("a")  # our disk moved on while the push ran
    r.end(0)


def _dropped(r: Rig) -> None:
    r.announce()
    assert r.tick() == []


FIRE: dict[Event, Callable[[Rig], object]] = {
    Event.CHANGED: lambda r: r.write(writer=OTHER),
    Event.TAKEN: lambda r: setattr(r, "push", r.plan.start(PEER, ["a"], r.now, own=False)),
    Event.DELIVERED: lambda r: r.end(0),
    Event.OVERTAKEN: _overtaken,
    Event.FAILED: lambda r: r.end(23),
    Event.RELEASED: lambda r: r.plan.abandon(r.push) if r.push else None,
    Event.DROPPED: _dropped,
    Event.CONFIRMING: lambda r: r.tick(),
    Event.UNCONFIRMED: _unconfirmed,
    Event.CONFIRMED: lambda r: r.announce(),
}


@pytest.mark.parametrize(("before", "event"), sorted(TRANSITIONS, key=str))
def test_every_transition_in_the_table(before: Stage, event: Event) -> None:
    r = Rig()
    if event is Event.TAKEN:
        r.view.write("a")
    REACH[before](r)
    assert r.stage is before
    FIRE[event](r)
    assert r.stage is TRANSITIONS[before, event]


def test_a_push_of_a_path_already_on_its_way_is_refused() -> None:
    for stage in (Stage.SENDING, Stage.QUEUED_SENDING, Stage.AWAITING, Stage.QUEUED_AWAITING):
        r = Rig()
        REACH[stage](r)
        with pytest.raises(LocalProtocolError):
            r.plan.start(PEER, ["a"], r.now, own=False)
        assert r.stage is stage
    r = Rig()
    with pytest.raises(LocalProtocolError):  # nothing on our disk to push
        r.plan.start(PEER, ["a"], r.now, own=False)


def test_a_push_ends_once() -> None:
    r = Rig()
    _sending(r)
    r.end()
    with pytest.raises(LocalProtocolError):
        r.end()
    assert r.push is not None
    with pytest.raises(LocalProtocolError):
        r.plan.abandon(r.push)


def test_every_stage_is_reachable_and_left() -> None:
    assert {before for before, _ in TRANSITIONS} == set(Stage)
    assert {after for after in TRANSITIONS.values()} == set(Stage)
    assert {before for before, _ in PEER_TRANSITIONS} == set(PeerStage)


# --- the peer's own stages: one push of ours at a time, backoff after a failure ----------


def test_one_push_of_ours_per_peer_then_the_next_batch() -> None:
    r = Rig()
    r.write("a")
    [first] = r.tick()
    assert r.plan.peer_stage(PEER) is PeerStage.PUSHING
    r.write("b")
    assert r.tick() == []  # "b" waits for the running push to end
    r.end(0)
    assert r.plan.peer_stage(PEER) is PeerStage.READY
    [second] = r.tick()
    assert (first.paths, second.paths) == (["a"], ["b"])
    assert r.plan.counters.sent == 1


def test_failures_back_off_from_the_push_start_doubling_up_to_the_most() -> None:
    r = Rig()
    r.write("a")
    waits = []
    for _ in range(7):
        [push] = r.tick()
        r.now += 0.5  # the push takes a while to fail
        r.end(12)
        assert r.plan.peer_stage(PEER) is PeerStage.BACKING_OFF
        assert r.stage is Stage.QUEUED  # never lost from the queue
        assert r.tick() == []
        tick = r.plan.tick(r.now, [PEER])
        assert tick.wake is not None
        waits.append(tick.wake - push.started)
        r.now = tick.wake
    assert waits == [1, 2, 4, 8, 16, 30, 30]
    [push] = r.tick()
    r.end(0)
    assert r.plan.peer_stage(PEER) is PeerStage.READY
    assert r.plan.counters.send_failures == 7 and r.plan.counters.sent == 1
    r.write("a")
    assert r.tick() != []  # a success resets the backoff


def test_an_abandoned_push_releases_its_paths_and_counts_nothing() -> None:
    r = Rig()
    r.write("a")
    [push] = r.tick()
    r.plan.abandon(push)
    assert (r.stage, r.plan.peer_stage(PEER)) == (Stage.QUEUED, PeerStage.READY)
    assert r.plan.counters.send_failures == 0
    assert [p.paths for p in r.tick()] == [["a"]]


# --- the policy -------------------------------------------------------------------------


def test_own_writes_go_at_once_forwarded_ones_after_the_grace() -> None:
    r = Rig()
    r.write("mine")
    r.write("theirs", writer=OTHER)
    tick = r.plan.tick(r.now, [PEER])
    assert [p.paths for p in tick.pushes] == [["mine"]]
    r.push = tick.pushes[0]
    r.end(0)
    tick = r.plan.tick(r.now, [PEER])
    assert tick.pushes == () and tick.wake == r.now + FORWARD_GRACE
    r.now += FORWARD_GRACE - 0.01
    assert r.tick() == []
    r.now += 0.01
    assert [p.paths for p in r.tick()] == [["theirs"]]


def test_a_version_whose_writer_our_links_reach_is_forwarded_only_late() -> None:
    """Issue 16: among ten nodes, a writer busy pushing to nine peers had not reached
    most of them within FORWARD_GRACE, and the others forwarded what it was about to
    push: each version moved 2.75 times as often as needed. While our link to the
    writer is up, it pushes its own writes; we forward after FORWARD_LINKED_GRACE (a
    writer cut off from that peer alone). Its link going down makes FORWARD_GRACE the
    rule again, counted from when the path was queued."""
    r = Rig()
    r.plan.linked([OTHER, PEER])
    r.write("theirs", writer=OTHER)
    tick = r.plan.tick(r.now, [PEER])
    assert tick.pushes == () and tick.wake == r.now + FORWARD_LINKED_GRACE
    r.now += FORWARD_GRACE
    assert r.tick() == []
    r.plan.linked([PEER])  # the writer's link went down
    assert [p.paths for p in r.tick()] == [["theirs"]]
    r.end(0)
    r.plan.linked([OTHER, PEER])
    r.write("later", writer=OTHER)
    r.now += FORWARD_LINKED_GRACE - 0.01
    assert r.tick() == []
    r.now += 0.01
    assert [p.paths for p in r.tick()] == [["later"]]


def test_a_forwarded_path_not_yet_due_is_not_looked_up_again_each_tick() -> None:
    """A burst forwarded is thousands of queued paths: each tick before their grace
    ends must not ask the view about each again. A new write of ours forgets that."""
    r = Rig()
    for i in range(50):
        r.write(f"theirs-{i}", writer=OTHER)
    asked = r.asked()
    assert r.tick() == [] and len(asked) == 50
    for _ in range(10):
        r.now += 0.1
        assert r.tick() == []
    assert len(asked) == 50
    r.write("theirs-7")  # now ours: it goes at once
    assert [p.paths for p in r.tick()] == [["theirs-7"]]
    r.end(0)
    r.now += FORWARD_GRACE
    assert len(r.tick()[0].paths) == 49


def test_looked_at_names_what_the_next_tick_asks_the_view_about() -> None:
    """The pusher reads the states of ``looked_at`` in bulk before each tick (issue 16:
    among ten nodes, each receiver re-read every forwarded path's state at every tick
    while its grace ran). It names what the tick asks about, and nothing held back by a
    grace, on its way, or to a peer backing off."""
    r = Rig()
    for i in range(5):
        r.write(f"theirs-{i}", writer=OTHER)
    asked = r.asked()

    def looked_then_asked() -> tuple[list[str], list[str]]:
        looked = r.plan.looked_at(PEER, r.now, PATHS_PER_PUSH)
        asked.clear()
        r.tick()
        return looked, list(asked)

    paths = [f"theirs-{i}" for i in range(5)]
    assert looked_then_asked() == (paths, paths)
    assert looked_then_asked() == ([], [])  # their grace runs
    r.write("mine")
    assert looked_then_asked() == (["mine"], ["mine"])  # taken at once
    assert r.plan.looked_at(PEER, r.now, PATHS_PER_PUSH) == []  # on its way
    r.end(23)
    assert r.plan.looked_at(PEER, r.now, PATHS_PER_PUSH) == []  # backing off
    r.now += FORWARD_GRACE
    looked, asked_now = looked_then_asked()
    assert looked == [*paths, "mine"] and asked_now == looked
    assert r.plan.looked_at(PEER, r.now, 2) == []  # all on their way


def test_nothing_goes_to_a_peer_that_is_not_up_or_current() -> None:
    r = Rig()
    r.write("a")
    assert r.tick(up=False) == []
    assert r.gate(["a"], current=False) == []
    assert r.plan.counters.denied == 1
    assert [p.paths for p in r.tick()] == [["a"]]


def test_batches_hold_at_most_paths_per_push() -> None:
    r = Rig()
    paths = [f"f{i:05}" for i in range(PATHS_PER_PUSH + 1)]
    for path in paths:
        r.write(path)
    [push] = r.tick()
    assert push.paths == paths[:PATHS_PER_PUSH]
    r.end(0)
    assert [p.paths for p in r.tick()] == [paths[PATHS_PER_PUSH:]]
    assert r.plan.pending(PEER) == 1


def test_the_gate_lets_only_our_own_unclaimed_writes_through() -> None:
    r = Rig()
    r.write("mine")
    r.write("theirs", writer=OTHER)
    r.write("carried")
    [push] = r.tick()  # our pusher carries all three's own ones now
    assert push.paths == ["mine", "carried"]
    r.write("later")
    assert r.gate(["mine", "theirs", "later", ""]) == ["later"]
    assert (r.plan.counters.allowed, r.plan.counters.denied) == (1, 3)


def test_a_delivered_push_is_awaited_then_rechecked_after_confirm_s() -> None:
    r = Rig()
    r.write()
    r.tick()
    r.end(0)
    assert r.stage is Stage.AWAITING
    assert r.gate(["a"]) == []  # lsyncd does not carry it again meanwhile
    r.push = None
    tick = r.plan.tick(r.now, [PEER])
    assert tick.pushes == () and tick.wake == r.now + CONFIRM_S
    r.now += CONFIRM_S
    assert [p.paths for p in r.tick()] == [["a"]]  # never announced: again


def test_an_announced_version_is_not_pushed_again() -> None:
    r = Rig()
    r.write()
    r.tick()
    r.end(0)
    r.announce()
    assert r.stage is Stage.IDLE
    r.now += CONFIRM_S
    r.plan.behind(PEER, ["a"], r.now)  # a resync: the gate says the peer has it
    assert r.tick() == [] and r.gate(["a"]) == [] and r.stage is Stage.IDLE


def test_an_older_announcement_confirms_nothing() -> None:
    r = Rig()
    r.write()
    old = r.view.disks["a"]
    r.write()
    r.tick()
    r.end(0)
    r.plan.heard(PEER, old.heads)
    assert r.stage is Stage.AWAITING


def test_a_queued_path_the_peer_announces_is_dropped_at_once_not_at_its_grace() -> None:
    """Issue 16: among ten nodes, each receiver queued every path it got for its eight
    other peers (to forward, after the grace), and held them there after those peers
    announced them: 16,000 "queued for peers" kept each node unhealthy for 30 s. An
    announcement the gate agrees with drops the path; an older one leaves it queued."""
    r = Rig()
    r.plan.linked([OTHER, PEER])
    r.write("a", writer=OTHER)
    old = r.view.disks["a"]
    r.write("a", writer=OTHER)
    assert r.tick() == [] and r.stage is Stage.QUEUED  # its grace has not run out
    r.view.seen[(PEER, "a")] = old.vector
    r.plan.heard(PEER, old.heads)
    assert r.stage is Stage.QUEUED  # the peer is still behind
    r.announce("a")
    assert r.plan.stage(PEER, "a") is Stage.IDLE and r.plan.pending(PEER) == 0


def test_a_newer_write_during_a_push_goes_after_it() -> None:
    r = Rig()
    r.write()
    [first] = r.tick()
    r.write()
    r.end(0)
    assert r.stage is Stage.QUEUED_AWAITING
    [second] = r.tick()
    assert second.versions[0][1] == r.view.disks["a"] != first.versions[0][1]


# --- bugs found moving the planner out of mesh/engine/pushes.py ---------------------------------


def test_the_gate_asking_about_an_unconfirmed_forwarded_path_queues_it_again() -> None:
    """Before, lsyncd's gate asking about a path whose push went unconfirmed past
    CONFIRM_S dropped the wait *without* queueing the path again (only the pusher's own
    recheck did that). A forwarded version is then denied by the gate, and the peer was
    left behind on it until the next change or resync. Now it goes round again."""
    r = Rig()
    r.write(writer=OTHER)
    r.now += FORWARD_GRACE
    r.tick()
    r.end(0)  # delivered as far as we know; the peer never announces it
    r.now += CONFIRM_S  # ... and the pusher's recheck has not run yet (its push was long)
    assert r.gate(["a"]) == []  # not ours to send through lsyncd
    assert r.stage is Stage.QUEUED
    r.now += FORWARD_GRACE
    assert [p.paths for p in r.tick()] == [["a"]]


def test_an_empty_push_is_refused() -> None:
    with pytest.raises(LocalProtocolError):
        Rig().plan.start(PEER, [], 0.0, own=False)


# --- lsyncd first (issue 12): our pusher takes only what lsyncd did not carry ------------


def test_an_own_write_waits_for_lsyncd_and_goes_by_our_pusher_only_if_lsyncd_never_asks(
) -> None:
    r = Rig(own_grace=OWN_GRACE)
    r.write("a")
    tick = r.plan.tick(r.now, [PEER])
    assert tick.pushes == () and tick.wake == r.now + OWN_GRACE
    assert r.gate(["a"]) == ["a"]  # lsyncd asks in time: it carries the write
    r.end(0)
    assert r.stage is Stage.AWAITING
    r.write("b")  # lsyncd stopped: nobody asks about "b"
    r.now += OWN_GRACE - 0.01
    assert r.tick() == []
    r.now += 0.01
    [push] = r.tick()
    assert push.paths == ["b"] and push.own
    r.end(0)
    counters = r.plan.peer_counters(PEER)
    assert (counters.carried, counters.carried_paths, counters.sent, counters.sent_paths) == (
        1, 1, 1, 1)
    assert r.plan.peer_counters(OTHER).carried == 0


def test_while_an_lsyncd_push_runs_its_next_batch_is_left_to_lsyncd() -> None:
    """A burst: lsyncd's first batch carries one file while the rest are written; they
    are lsyncd's next batch however long the first one runs, and our pusher's only if
    lsyncd does not ask for them within the grace after it ended."""
    r = Rig(own_grace=OWN_GRACE)
    r.write("a")
    assert r.gate(["a"]) == ["a"]
    r.now += 0.01
    for i in range(5):
        r.write(f"b{i}")
    r.now += (LSYNCD_WAIT_GRACES - 0.5) * OWN_GRACE  # a long push
    assert r.tick() == []
    r.end(0)
    assert r.tick() == []  # lsyncd's next batch is due now
    assert r.gate([f"b{i}" for i in range(5)]) == [f"b{i}" for i in range(5)]
    r.end(0)
    assert r.plan.counters.carried_paths == 6 and r.plan.counters.sent == 0


def test_an_own_write_lsyncd_does_not_carry_goes_by_our_pusher_even_while_lsyncd_pushes(
) -> None:
    """lsyncd asks once per event. A write whose event lsyncd saw before the agent
    recorded it is never asked about again: while lsyncd keeps pushing others, ours
    after LSYNCD_WAIT_GRACES graces, not never."""
    r = Rig(own_grace=OWN_GRACE)
    r.write("found-late")
    r.now += 0.01
    r.write("other")
    assert r.gate(["other"]) == ["other"]  # a push of lsyncd's runs from here on
    r.now += OWN_GRACE
    assert r.tick() == []  # lsyncd's next batch may carry it
    r.now += (LSYNCD_WAIT_GRACES - 1) * OWN_GRACE
    assert [p.paths for p in r.tick()] == [["found-late"]]


def test_an_own_write_lsyncd_may_drop_goes_by_our_pusher_after_one_grace() -> None:
    """A write at a path the agent noted as its own change moments before (a file a peer
    pushed in): lsyncd may drop its event (one per note), so ours after one grace while
    lsyncd keeps pushing others, not after LSYNCD_WAIT_GRACES. Another write waits."""
    r = Rig(own_grace=OWN_GRACE)
    r.write("other")
    assert r.gate(["other"]) == ["other"]  # a push of lsyncd's runs from here on
    r.write("landed-then-edited")
    r.plan.unasked("landed-then-edited", r.now)
    r.write("plain")
    r.now += OWN_GRACE
    assert [p.paths for p in r.tick()] == [["landed-then-edited"]]


def test_a_catch_up_is_ours_after_the_grace_even_while_lsyncd_pushes() -> None:
    """No event of lsyncd's names what a resync found a peer behind on."""
    r = Rig(own_grace=OWN_GRACE)
    r.view.write("old")
    r.write("other")
    assert r.gate(["other"]) == ["other"]
    r.plan.behind(PEER, ["old"], r.now)
    r.now += OWN_GRACE
    assert [p.paths for p in r.tick()] == [["old"]]


def test_a_failed_lsyncd_push_is_ours_to_retry_after_the_backoff() -> None:
    r = Rig(own_grace=OWN_GRACE)
    r.write("a")
    assert r.gate(["a"]) == ["a"]
    started = r.now
    r.now += 0.5
    r.end(12)  # the peer's disk is full, say
    assert r.stage is Stage.QUEUED
    assert r.plan.peer_stage(PEER) is PeerStage.BACKING_OFF
    assert r.plan.counters.carry_failures == 1
    r.now = started + RETRY_S[0] - 0.01
    assert r.tick() == []  # backing off: the first wait is RETRY_S[0] from the start
    r.now = started + 0.5 + OWN_GRACE  # lsyncd will not ask again: ours after the grace
    [push] = r.tick()
    assert push.paths == ["a"] and push.own


def test_a_batch_larger_than_a_push_is_granted_whole_and_narrowed_per_push() -> None:
    """lsyncd's batch of a burst is carried in pushes of PATHS_PER_PUSH (the agent's
    ``carry``); a path that stopped being ours to push meanwhile is narrowed out."""
    r = Rig(own_grace=OWN_GRACE)
    paths = [f"f{i:05}" for i in range(PATHS_PER_PUSH + 2)]
    for path in paths:
        r.write(path)
    allowed = r.gate_all(paths)
    assert allowed == paths and r.plan.counters.allowed == len(paths)
    first = r.plan.start(PEER, allowed[:PATHS_PER_PUSH], r.now, own=False)
    rest = allowed[PATHS_PER_PUSH:]
    r.view.write(rest[0], writer=OTHER)  # a peer's newer write arrived meanwhile
    r.plan.end(first, r.now, 0)
    assert r.plan.narrow(PEER, rest, r.now) == rest[1:]


def test_a_push_whose_files_vanished_is_a_success_and_the_vanished_path_goes_again() -> None:
    """rsync exits 24 when a file vanished before it read it (deleted meanwhile): the
    other paths went, and the vanished one's new version (the delete) goes next."""
    r = Rig()
    r.write("a")
    r.write("b")
    assert [p.paths for p in r.tick()] == [["a", "b"]]
    r.view.write("b")  # b changed (say, deleted) while the push ran
    r.plan.changed("b", r.now)
    r.end(24)
    assert r.plan.peer_stage(PEER) is PeerStage.READY
    assert r.plan.counters.sent == 1 and r.plan.counters.send_failures == 0
    assert (r.plan.stage(PEER, "a"), r.plan.stage(PEER, "b")) == (Stage.AWAITING,
                                                                 Stage.QUEUED_AWAITING)
    assert [p.paths for p in r.tick()] == [["b"]]
