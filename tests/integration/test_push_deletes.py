"""What rsync removes on the receiver: nothing. Real rsync through the real tunnel and
fixed daemon on 127.0.0.1, as in ``test_tunnel`` (``mesh.adapters.rsync.rsyncd``, "What a push
stages", lists the facts these check).

The sender deleted (or replaced) ``p``; the receiver's ``p`` holds entries the push names
and entries it does not, a file created there concurrently say. rsync stages what the
sender has of the named paths and nothing for a named path the sender lacks; the live
tree, named entries and unnamed ones alike, is left as it was: deletes are the receiving
agent's, from the push's announcement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mesh.adapters.rsync import rsyncd
from mesh.adapters.rsync.push import push
from tests.integration.conftest import Pki, RecordingSink, until
from tests.integration.test_tunnel import (
    KEEP,
    SENDER,
    describe,
    make_dirs,
    order,
    raw_rsync,
    receiver,
    refused_in_log,
    snapshot,
    staged,
)

pytestmark = pytest.mark.integration

DIR = None  # in a tree: a directory
LINK = b"->"  # in a tree: a symlink to "elsewhere"

Tree = dict[str, bytes | None]


def build(root: Path, tree: Tree) -> None:
    for rel, content in sorted(tree.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is DIR:
            path.mkdir(exist_ok=True)
        elif content == LINK:
            path.symlink_to("elsewhere")
        else:
            path.write_bytes(content)


def shape(root: Path, skip: str = KEEP) -> Tree:
    """``root`` as a ``Tree`` (modes left out)."""
    out: Tree = {}
    for rel, (kind, _, content) in describe(root, skip).items():
        out[rel] = DIR if kind == "dir" else LINK if kind == "link" else content.encode() \
            if isinstance(content, str) else content
    return out


@dataclass(frozen=True)
class Case:
    sender: Tree
    receiver: Tree
    named: list[str]
    staged: Tree  # the push's staging dir afterwards
    why: str = field(default="", compare=False)


CASES = {
    "empty dir deleted": Case({}, {"p": DIR}, ["p"], {}),
    "dir deleted with the child it named": Case({}, {"p/c": b"c"}, ["p", "p/c"], {}),
    "unnamed child of a deleted dir": Case({}, {"p/c": b"new"}, ["p"], {}),
    "named child deleted, unnamed one there": Case(
        {"p": DIR}, {"p/known": b"k", "p/new": b"n"}, ["p", "p/known"], {"p": DIR}),
    "every level named": Case({}, {"p/sub/x": b"x"}, ["p", "p/sub", "p/sub/x"], {}),
    "deleted link": Case({}, {"l": LINK}, ["l"], {}),
    "dir replaced by a file, its children named": Case(
        {"p": b"F"}, {"p/c": b"c"}, ["p", "p/c"], {"p": b"F"}),
    "dir replaced by a file, an unnamed child": Case(
        {"p": b"F"}, {"p/c": b"new"}, ["p"], {"p": b"F"}),
    "file replaced by a dir": Case(
        {"p/c": b"c"}, {"p": b"old"}, ["p", "p/c"], {"p": DIR, "p/c": b"c"}),
    "parent the sender lacks": Case({}, {"p/c": b"c", "p/d": b"d"}, ["p/c"], {}),
    "a child named, its parent not": Case(
        {"p/c": b"new c", "p/d": b"not named"}, {"p/c": b"old c"}, ["p/c"],
        {"p": DIR, "p/c": b"new c"}),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
async def test_rsync_stages_what_the_sender_has_and_removes_nothing(
    cluster_pki: Pki, tmp_path: Path, case: Case
) -> None:
    source, target = make_dirs(tmp_path)
    build(source, case.sender)
    build(target, {**case.receiver, "other": b"not in this push"})
    sink = RecordingSink(target)
    async with receiver(cluster_pki, target, sink) as server:
        before = snapshot(target)
        returncode = await push(order(server, "p1", case.named), source,
                                cluster_pki.creds(SENDER))
        await until(lambda: len(sink.finished()) == 1, "the push to end")
        assert snapshot(target) == before  # names, inodes, modes, sizes, mtimes
    assert (returncode, sink.pushes[0].returncode) == (0, 0)
    assert shape(staged(target, "p1"), skip="") == case.staged


def test_include_patterns_name_only_what_exists_never_a_subtree(tmp_path: Path) -> None:
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "file").write_bytes(b"")
    (tmp_path / "d" / "e" / "w*ld").write_bytes(b"")
    (tmp_path / "link").symlink_to("d")
    got = rsyncd.include_patterns(
        ["d", "file", "gone", "gone/sub/x", "d/e/w*ld", "d/gone", "link"], tmp_path)
    assert got == ["/", "/d/", "/file", "/d/e/", "/d/e/w\\*ld", "/link"]
    assert not any(p.endswith("***") for p in got)


@pytest.mark.parametrize("option", ["--delete", "--force", "--backup"])
async def test_the_daemon_refuses_what_deletes_or_backs_up(
    cluster_pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture, option: str
) -> None:
    """Nothing that deletes or moves receiver files is sent any more, so none of it is
    accepted: the agent's check of the arguments (serverargs) and the daemon's own allow-list
    both refuse it."""
    assert not any(flag.startswith(option) for flag in rsyncd.SEND_FLAGS)
    source, target = make_dirs(tmp_path)
    build(source, {"f": b"new"})
    build(target, {"f": b"old", "g": b"the sender lacks it"})
    sink = RecordingSink(target)
    async with receiver(cluster_pki, target, sink) as server:
        returncode, _ = await raw_rsync(cluster_pki, server, source, "forced", option,
                                        "--copy-dest=../../../")
        await until(lambda: refused_in_log(caplog, "forced"), "the daemon's refusal")
    assert returncode != 0
    assert shape(target) == {"f": b"old", "g": b"the sender lacks it"}
    assert list(staged(target, "forced").iterdir()) == []
