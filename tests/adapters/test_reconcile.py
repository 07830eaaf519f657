"""The start-up reconcile's walk (``mesh.adapters.fs.reconcile``) on a real tree: what
it hands the scan, in runs, and what it finds gone."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mesh.adapters.fs.reconcile import reconcile
from mesh.core.reconcile import Known


def tree(root: Path) -> list[str]:
    """Two folders of three files each, and a file at the top: the walk's order."""
    paths = []
    for folder in ("a", "b"):
        (root / folder).mkdir()
        paths.append(folder)
        for i in range(3):
            (root / folder / f"f{i}").write_bytes(b"x" * i)
            paths.append(f"{folder}/f{i}")
    (root / "top").write_bytes(b"top")
    return [*paths, "top"]


def nothing_known(paths: list[str]) -> Mapping[str, Known]:
    return {}


def test_a_first_start_hands_every_path_on_in_runs_in_walk_order(tmp_path: Path) -> None:
    """Issue 16: a million paths held as strings, and a set of them, were most of a
    first start's 432 MiB. They go on in runs of ``chunk`` joined into one string each,
    and with nothing indexed no set of the paths found is kept: nothing can be gone."""
    walked = tree(tmp_path)
    out = reconcile(tmp_path, lambda _: False, nothing_known, lambda: iter(()), chunk=3)
    assert (out.on_disk, out.changed, out.unchanged, out.gone) == (9, 9, 0, [])
    assert [len(run) for run in out.to_scan()] == [3, 3, 3]
    assert [p for run in out.to_scan() for p in run] == walked
    assert all(isinstance(run, str) for run in out.runs)


def test_a_held_path_the_walk_did_not_find_is_gone(tmp_path: Path) -> None:
    walked = tree(tmp_path)
    held = ["a/f1", "gone/file", "top"]
    out = reconcile(tmp_path, lambda _: False, nothing_known, lambda: iter(held), chunk=4)
    assert out.gone == ["gone/file"]
    assert [p for run in out.to_scan() for p in run] == walked
    assert [len(run) for run in out.to_scan()] == [4, 4, 1]
