"""What the harness expects from a history of writes (loadtest.history): no timing, no I/O."""

from __future__ import annotations

from loadtest.history import History, conflicts

A, B, C = "a" * 64, "b" * 64, "c" * 64


def write(h: History, node: int, path: str, content: str | None, held: list[str | None]
          ) -> int:
    return h.add(wid=len(h.records), node=node, path=path, hash=content, t0=0.0, t=0.0,
                 changed=1, held=held, kind="write" if content else "delete").rid


def test_writes_that_saw_each_other_expect_no_conflict_and_lose_nothing() -> None:
    h = History()
    write(h, 0, "p", A, [None])
    write(h, 1, "p", B, [A])  # node 1 held A when it wrote B
    write(h, 2, "p", None, [B])
    assert h.need("p") == [None]
    assert conflicts(h, {})["conflicts_expected"] == 0
    assert h.lost([{}]) == []  # A and B were seen by later writes
    assert h.final_state({"p": B}) == (["p"], [])  # the delete undone


def test_k_writes_that_saw_none_of_each_other_expect_k_minus_1_losers() -> None:
    h = History()
    rids = [write(h, n, "p", c, [None]) for n, c in enumerate((A, B, C))]
    assert sorted(h.need("p")) == sorted([A, B, C])
    logged = {0: [("p", 1, A, "x"), ("p", 2, C, "y")]}  # B won: A and C lost
    out = conflicts(h, {n: logged[0] for n in range(3)})
    assert out["conflicts_expected"] == 2 and out["conflicts_missing"] == 0
    assert out["conflicts_unexpected"] == 0 and out["conflicts_not_on_every_node"] == 0
    assert conflicts(h, {0: [("p", 1, A, "x")]})["conflicts_missing"] == 1
    # the losers' contents kept as conflict copies: nothing lost; one gone: lost
    copy1, copy2 = "p.conflict-20260101T000000-n1-1", "p.conflict-20260101T000000-n3-1"
    assert h.lost([{"p": B, copy1: A, copy2: C}]) == []
    assert [r.rid for r in h.lost([{"p": B, copy1: A}])] == [rids[2]]
    # at another path: lost all the same
    assert [r.rid for r in h.lost([{"p": B, copy1: A, "q": C}])] == [rids[2]]
    trees = [{"p": B, copy1: A, copy2: C}, {"p": B, copy1: A}]
    assert h.lost(trees) == []  # on one node: not lost, but not everywhere
    assert [r.rid for r in h.lost(trees, anywhere=True)] == [rids[2]]


def test_a_conflict_logged_between_writes_that_saw_each_other_is_unexpected() -> None:
    h = History()
    write(h, 0, "p", A, [None])
    write(h, 1, "p", B, [A])
    out = conflicts(h, {0: [("p", 0, A, "x")]})
    assert out["conflicts_expected"] == 0 and out["conflicts_unexpected"] == 1
    assert out["conflicts_unexpected_paths"] == ["p"]


def test_a_chain_that_is_not_pairwise_concurrent_expects_at_least_one_loser() -> None:
    h = History()
    write(h, 0, "p", A, [None])
    write(h, 1, "p", B, [None])  # B || A
    write(h, 2, "p", C, [A])  # C saw A, not B
    out = conflicts(h, {})
    assert out["conflicts_indeterminate_groups"] == 1
    assert out["conflicts_expected"] == 1 and out["conflicts_missing"] == 1


def test_a_delete_or_overwrite_after_the_node_held_a_content_saw_it() -> None:
    h = History()
    write(h, 0, "p", A, [None])
    write(h, 1, "p", B, [None])  # B || A: a conflict, A kept as a copy
    # node 2 held B at the path and A in the copy when it deleted: it saw both
    write(h, 2, "p", None, [None, B, A])
    assert h.lost([{}]) == []
    assert h.final_state({}) == ([], [])


def test_content_no_write_made_at_its_path_is_invented() -> None:
    h = History()
    write(h, 0, "p", A, [None])
    write(h, 1, "q", B, [None])
    copy = "p.conflict-20260101T000000-n2-1"
    assert h.invented({"p": A, "q": B, "ready/n1": C}) == []
    assert h.invented({"p": B, copy: C, "q": B}) == [("p", B), (copy, C)]


def test_a_logged_delete_is_matched_to_the_delete_that_was_concurrent() -> None:
    """Faults seed 7: n3 deleted p while n2 wrote it (both had seen A), the write won;
    n3 later deleted p again, having seen n2's write. The loser logged is the first
    delete: an expected conflict, not a spurious one."""
    h = History()
    write(h, 0, "p", A, [None])
    first = write(h, 2, "p", None, [A])
    write(h, 1, "p", B, [A])  # concurrent with the delete: edit beats delete
    write(h, 2, "p", None, [B])  # saw B: no conflict
    assert h.loser_of("p", 2, None) == first
    out = conflicts(h, {n: [("p", 2, None, "x")] for n in range(3)})
    assert out["conflicts_expected"] == 1 and out["conflicts_missing"] == 0
    assert out["conflicts_unexpected"] == 0
