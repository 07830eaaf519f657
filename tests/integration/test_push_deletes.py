"""What a push may remove on the receiver: only what it names. Real rsync through the real
tunnel and fixed daemon on 127.0.0.1, as in ``test_tunnel`` (``mesh.adapters.rsyncd``,
"What a push may remove", lists the facts these check).

The sender deleted (or replaced) ``p``; the receiver's ``p`` holds entries the push names
and entries it does not, a file created there concurrently say. The named ones go into the
push's backup dir; the others, and every directory on the way to them, stay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mesh.adapters import rsyncd
from mesh.gate import push
from tests.integration.conftest import Pki, RecordingSink, until
from tests.integration.test_tunnel import (
    KEEP,
    SENDER,
    describe,
    grant,
    make_dirs,
    raw_rsync,
    receiver,
    refused_in_log,
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
    left: Tree  # the receiver afterwards
    kept: Tree  # the push's backup dir afterwards
    daemon: int = 0  # the receiving daemon's exit status
    why: str = field(default="", compare=False)


CASES = {
    "empty dir deleted": Case({}, {"p": DIR}, ["p"], {}, {}),
    "dir deleted with the child it named": Case(
        {}, {"p/c": b"c"}, ["p", "p/c"], {}, {"p": DIR, "p/c": b"c"}),
    "unnamed child survives a dir delete": Case(
        {}, {"p/c": b"new"}, ["p"], {"p": DIR, "p/c": b"new"}, {}),
    "named child goes, unnamed stays": Case(
        {}, {"p/known": b"k", "p/new": b"n"}, ["p", "p/known"],
        {"p": DIR, "p/new": b"n"}, {"p": DIR, "p/known": b"k"}),
    "unnamed child deeper down survives": Case(
        {}, {"p/sub/x": b"x"}, ["p", "p/sub"], {"p": DIR, "p/sub": DIR, "p/sub/x": b"x"}, {}),
    "every level named": Case(
        {}, {"p/sub/x": b"x"}, ["p", "p/sub", "p/sub/x"], {},
        {"p": DIR, "p/sub": DIR, "p/sub/x": b"x"}),
    "deleted link": Case({}, {"l": LINK}, ["l"], {}, {"l": LINK}),
    "dir replaced by a file, its children named": Case(
        {"p": b"F"}, {"p/c": b"c"}, ["p", "p/c"], {"p": b"F"}, {"p": DIR, "p/c": b"c"}),
    "dir replaced by a file, an unnamed child": Case(
        {"p": b"F"}, {"p/c": b"new"}, ["p"], {"p": DIR, "p/c": b"new"}, {}, daemon=23),
    "file replaced by a dir": Case(
        {"p/c": b"c"}, {"p": b"old"}, ["p", "p/c"], {"p": DIR, "p/c": b"c"}, {"p": b"old"}),
    "parent the sender lacks, emptied": Case(
        {}, {"p/c": b"c"}, ["p/c"], {}, {"p": DIR, "p/c": b"c"}),
    "parent the sender lacks, not emptied": Case(
        {}, {"p/c": b"c", "p/d": b"d"}, ["p/c"], {"p": DIR, "p/d": b"d"},
        {"p": DIR, "p/c": b"c"}),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
async def test_a_push_removes_only_what_it_names(
    cluster_pki: Pki, tmp_path: Path, case: Case
) -> None:
    source, target = make_dirs(tmp_path)
    build(source, case.sender)
    build(target, {**case.receiver, "other": b"not in this push"})
    sink = RecordingSink(target)
    async with receiver(cluster_pki, target, sink) as server:
        returncode = await push(grant(server, "p1", case.named), source,
                                cluster_pki.creds(SENDER))
        await until(lambda: len(sink.finished()) == 1, "the push to end")
    # The sender's status is its remote shell's, which does not carry the daemon's.
    assert returncode == 0
    assert sink.pushes[0].returncode == case.daemon
    assert shape(target) == {**case.left, "other": b"not in this push"}
    assert shape(target / KEEP / "p1", skip="") == case.kept


@pytest.mark.parametrize("inline", [False, True], ids=["rsh", "inline"])
async def test_unnamed_entries_block_a_file_replacing_their_dir(
    cluster_pki: Pki, tmp_path: Path, inline: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The one case that fails: the file cannot land where a directory must stay. The
    receiver's daemon says why and exits 23; the sender, either way it pushes, exits 0."""
    source, target = make_dirs(tmp_path)
    build(source, {"p": b"a file now"})
    build(target, {"p/c": b"created here, never seen by the sender"})
    sink = RecordingSink(target)
    async with receiver(cluster_pki, target, sink) as server:
        returncode = await push(grant(server, "p1", ["p"]), source, cluster_pki.creds(SENDER),
                                inline=inline)
        await until(lambda: len(sink.finished()) == 1, "the push to end")
    assert (returncode, sink.pushes[0].returncode) == (0, 23)
    assert (target / "p" / "c").read_bytes() == b"created here, never seen by the sender"
    lines = [r.getMessage() for r in caplog.records if r.name == "mesh.adapters.tunnel"]
    assert any("could not make way for new regular file: p" in line for line in lines), lines


def test_include_patterns_never_name_a_subtree(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "file").write_bytes(b"")
    got = rsyncd.include_patterns(["d", "file", "gone", "gone/sub/x", "w*ld"], tmp_path)
    assert got == ["/", "/d/", "/file", "/gone", "/gone/", "/gone/sub/", "/gone/sub/x",
                   "/w\\*ld"]
    assert not any(p.endswith("***") for p in got)


async def test_the_daemon_refuses_force(
    cluster_pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``--force`` is no longer sent (a no-op with ``--delete``), so it is not accepted:
    the hook and the daemon's own allow-list both refuse it."""
    assert "--force" not in rsyncd.SEND_FLAGS
    source, target = make_dirs(tmp_path)
    build(source, {"f": b"new"})
    build(target, {"f": b"old"})
    sink = RecordingSink(target)
    async with receiver(cluster_pki, target, sink) as server:
        returncode, _ = await raw_rsync(cluster_pki, server, source, "forced", "--delete",
                                        "--force", "--backup-dir", f"/{KEEP}/forced")
        await until(lambda: refused_in_log(caplog, "forced"), "the daemon's refusal")
    assert returncode != 0
    assert (target / "f").read_bytes() == b"old"
