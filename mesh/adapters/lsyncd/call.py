"""What lsyncd hands the gate: its rsync command line and include patterns (the shapes
are documented in ``mesh.adapters.lsyncd.supervisor``). The gate passes both to the
agent as they are; ``mesh.adapters.lsyncd.gate`` reads them with these."""

from __future__ import annotations

import logging
import os
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mesh.adapters.rsync.rsyncd import MODULE
from mesh.core.paths import normalize
from mesh.core.vclock import NODE_ID_RE
from mesh.errors import InvalidPath, MeshError

LOG = logging.getLogger("mesh.adapters.lsyncd")

_FLAGS = re.compile(r"-(?!.*(.).*\1)[rlptgoDs]+")  # lsyncd's short flags, each at most once
_TAIL = ("--force", "--from0", "--include-from=-", "--exclude=*")
_TARGET = re.compile(rf"({NODE_ID_RE.pattern})::{MODULE}/")
_UNESCAPE = re.compile(r"\\([?*\[])")


class CallError(MeshError):
    """lsyncd called the gate with a command line of an unknown shape."""


@dataclass(frozen=True)
class RsyncCall:
    source: Path
    peer: str


def target_of(peer: str) -> str:
    """The lsyncd target of one peer."""
    if NODE_ID_RE.fullmatch(peer) is None:
        raise ValueError(f"invalid peer node id {peer!r}")
    return f"{peer}::{MODULE}/"


def parse_rsync_call(argv: Iterable[str]) -> RsyncCall:
    """Accept exactly the command line of lsyncd's ``default.rsync`` action (module
    docstring); anything else raises ``CallError``: no push starts from a command
    line the agent did not understand."""
    args = list(argv)
    rest = args[1:]
    if rest[:1] == ["-r"] and rest[1:3] == ["--delete", "--ignore-errors"]:
        rest = ["-r", *rest[3:]]
    shape_ok = (
        len(args) >= 1
        and _FLAGS.fullmatch(args[0]) is not None
        and len(rest) == 7
        and rest[0] == "-r"
        and tuple(rest[1:5]) == _TAIL
    )
    if not shape_ok:
        raise CallError(f"unexpected rsync command line: {shlex.join(args)[:300]}")
    source, target = rest[5], rest[6]
    if not source.startswith("/") or not source.endswith("/"):
        raise CallError(f"source {source!r} is not an absolute directory with a trailing /")
    match = _TARGET.fullmatch(target)
    if match is None:
        raise CallError(f"target {target!r} is not <peer>::{MODULE}/")
    return RsyncCall(Path(source), match[1])


def paths_from_patterns(data: bytes) -> list[str]:
    """The normalized paths named by lsyncd's NUL-separated include patterns, parents
    included (the agent decides about directories too), sorted, without ``/`` itself.
    A name that cannot be a synced path (not UTF-8, too long) is skipped with a warning."""
    paths: dict[str, None] = {}
    for raw in data.split(b"\0"):
        if not raw or raw == b"/":
            continue
        pattern = os.fsdecode(raw)
        if not pattern.startswith("/"):
            LOG.warning("skipping include pattern without a leading /: %r", pattern[:200])
            continue
        body = pattern[1:]
        # "***" is lsyncd's own suffix for a deleted directory: a "*" of the name is escaped.
        body = body.removesuffix("/***") if body.endswith("/***") else body.rstrip("/")
        try:
            paths[normalize(_UNESCAPE.sub(r"\1", body))] = None
        except InvalidPath as err:
            LOG.warning("skipping %r: %s", pattern[:200], err)
    return sorted(paths)
