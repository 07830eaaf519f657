"""The delivery layer: in order, exactly once, gaps filled by replay or resync."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.core import manifest
from mesh.core.delivery import Inbox, Need, Outbox
from mesh.core.manifest import Entry, Kind, Manifest
from mesh.core.vclock import VersionVector


def entry(i: int) -> Entry:
    return Entry(f"f{i}", VersionVector.of({"o": i + 1}), bytes(32), 1, 0, 0o644, Kind.FILE,
                 i, "o")


def test_in_order_duplicates_and_a_gap() -> None:
    out, inbox = Outbox("o", epoch=1), Inbox("o")
    m = [manifest.decode(out.next((entry(i),))) for i in range(5)]
    ready, need = inbox.offer(m[0], 0)
    assert [x.seq for x in ready] == [1] and need is Need.RESYNC  # first contact
    inbox.resynced(1, 1)
    assert inbox.offer(m[0], 0) == ([], Need.NOTHING) and inbox.duplicates == 1
    ready, need = inbox.offer(m[2], 0)
    assert ready == [] and need is Need.REPLAY and inbox.applied == 1
    assert inbox.offer(m[3], 0.1) == ([], Need.NOTHING)  # replay already asked
    replayed = [manifest.decode(p) for p in out.replay(1, inbox.applied + 1) or []]
    got = [x.seq for r in replayed for x in inbox.offer(r, 0.2)[0]]
    assert got == [2, 3, 4, 5] and inbox.applied == 5 and not inbox.pending


def test_replay_log_is_bounded_and_says_when_gone() -> None:
    out = Outbox("o", epoch=3, max_log=10)
    for i in range(25):
        out.next((entry(i),))
    assert out.replay(3, 16) is not None and out.replay(3, 15) is None
    assert out.replay(2, 20) is None and out.replay(3, 26) == []


def test_new_epoch_means_resync() -> None:
    inbox = Inbox("o")
    inbox.offer(Manifest("o", 1, 1), 0)
    inbox.resynced(1, 1)
    ready, need = inbox.offer(Manifest("o", 2, 7), 10)
    assert [m.seq for m in ready] == [7] and need is Need.RESYNC
    assert inbox.offer(Manifest("o", 1, 2), 10) == ([], Need.NOTHING)  # older incarnation


def test_head_reveals_a_lost_tail() -> None:
    inbox = Inbox("o")
    inbox.offer(Manifest("o", 1, 1), 0)
    inbox.resynced(1, 1)
    assert inbox.head(1, 1, 1) is Need.NOTHING
    assert inbox.head(1, 3, 2) is Need.REPLAY


def test_buffer_overflow_falls_back_to_resync() -> None:
    inbox = Inbox("o", max_pending=4)
    inbox.offer(Manifest("o", 1, 1), 0)
    inbox.resynced(1, 1)
    needs = [inbox.offer(Manifest("o", 1, s), 5)[1] for s in range(3, 9)]
    assert Need.RESYNC in needs and len(inbox.pending) <= inbox.max_pending


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 120),
    seed=st.integers(0, 2**32),
    loss=st.floats(0, 0.4),
    dup=st.floats(0, 0.3),
    log=st.integers(4, 200),
)
def test_every_manifest_is_applied_once_in_order_or_covered_by_a_resync(
    n: int, seed: int, loss: float, dup: float, log: int
) -> None:
    rng = random.Random(seed)
    out, inbox = Outbox("o", epoch=1, max_log=log), Inbox("o", max_pending=32)
    sent = [out.next((entry(i),)) for i in range(n)]
    wire = [p for p in sent if rng.random() >= loss]
    wire += [p for p in sent if rng.random() < dup]
    rng.shuffle(wire)
    applied: list[int] = []
    covered = 0  # highest seq a resync brought us to
    now = 0.0
    queue = list(wire)
    for _ in range(20 * n + 100):  # bounded: every round either delivers or repairs
        now += 3.0  # past the retry interval, so repairs are asked again
        if queue:
            ready, need = inbox.offer(manifest.decode(queue.pop(0)), now)
        else:
            ready, need = [], inbox.head(1, out.seq, now)
        applied += [m.seq for m in ready]
        if need is Need.REPLAY:
            again = out.replay(1, inbox.applied + 1)
            if again is None:
                need = inbox.replay_gone(now)
            else:
                queue = [p for p in again if rng.random() >= loss / 2] + queue
        if need is Need.RESYNC:
            covered = out.seq
            applied += [m.seq for m in inbox.resynced(1, out.seq)]
        if inbox.applied == out.seq and not queue:
            break
    assert inbox.applied == out.seq
    assert applied == sorted(set(applied)), "applied twice or out of order"
    assert set(range(covered + 1, n + 1)) <= set(applied)


def test_a_failed_resync_is_asked_again_on_a_later_head() -> None:
    inbox = Inbox("o", retry_s=2.0)
    assert inbox.head(1, 5, now=0) is Need.RESYNC
    assert inbox.head(1, 5, now=1) is Need.NOTHING  # still in flight
    assert inbox.head(1, 5, now=3) is Need.RESYNC  # it never completed
    inbox.resynced(1, 5)
    assert inbox.head(1, 5, now=10) is Need.NOTHING
