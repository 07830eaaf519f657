"""The receiving daemon's ``pre-xfer exec`` hook: the check that lets a push write only into
its own staging dir, ``<keep>/in/<push id>/``, with the live tree as its delta basis (see
``mesh.adapters.rsync.rsyncd`` for why and how).

rsync starts it once per push, as ``python -I -S <this file>``: standard library only, and
only ``os``, ``re`` and ``sys`` (each import is milliseconds on every push).
"""

from __future__ import annotations

import os
import re
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

MODULE = "data"
STAGING = "in"  # <keep>/in/<push id>/: where a push lands, for the agent to check and place
# --copy-dest is relative to the destination dir, <keep>/in/<push id>/: three levels up is
# the module root, the live tree (rsync 3.5.0 accepts it with and without the chroot).
COPY_DEST = "../../../"
PUSH_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
KEEP_NAME_RE = re.compile(r"\.[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_ALLOWED_SHORT = frozenset("rlptgoI")  # what SEND_FLAGS put in the bundle
_ALLOWED_LONG = frozenset({"--numeric-ids"})


def valid_push_id(push_id: object) -> bool:
    return isinstance(push_id, str) and PUSH_ID_RE.fullmatch(push_id) is not None


def valid_keep_name(name: object) -> bool:
    return isinstance(name, str) and KEEP_NAME_RE.fullmatch(name) is not None


def staging_dest(keep_name: str, push_id: str) -> str:
    """The destination of one push as the daemon's server sees it: ``/<keep>/in/<push id>/``
    (the client names it ``host::data/<keep>/in/<push id>/``)."""
    return f"/{keep_name}/{STAGING}/{push_id}/"


def check_server_args(args: Sequence[str], keep_name: str, push_id: str) -> str | None:
    """Why the daemon must refuse a transfer with these ``RSYNC_ARG0..n``, or None.

    Accepted: ``rsyncd --server -<bundle> [--numeric-ids] --copy-dest ../../../ .
    /<keep>/in/<push id>/`` (also without the first ``/``, and ``--copy-dest=../../../``),
    in any option order, where the bundle holds letters of ``rlptgoI`` and rsync's
    ``e.<capabilities>`` suffix.
    """
    if list(args[:2]) != ["rsyncd", "--server"]:
        return "not an rsync server request"
    if "." not in args:
        return "no end of options"
    end = args.index(".")
    expected = staging_dest(keep_name, push_id)
    # With "use chroot = yes" rsync hands the hook the destination from the module root
    # ("/<keep>/in/<push id>/"), without a chroot relative to it ("<keep>/in/<push id>/");
    # in either mode both name the same dir (checked with rsync 3.5.0).
    if list(args[end + 1 :]) not in ([expected], [expected[1:]]):
        return f"destination must be {expected}, not {list(args[end + 1 :])!r}"
    bundles: list[str] = []
    copy_dests: list[str] = []
    options = list(args[2:end])
    while options:
        arg = options.pop(0)
        if arg == "--copy-dest" and options:
            copy_dests.append(options.pop(0))
        elif arg.startswith("--copy-dest="):
            copy_dests.append(arg.partition("=")[2])
        elif arg in _ALLOWED_LONG:
            continue
        elif arg.startswith("-") and not arg.startswith("--"):
            bundles.append(arg[1:])
        else:
            return f"option {arg[:60]!r} is not allowed"
    if copy_dests != [COPY_DEST]:
        return f"exactly one --copy-dest={COPY_DEST} is required"
    return _bundle_refusal(bundles)


def _bundle_refusal(bundles: list[str]) -> str | None:
    if len(bundles) != 1:
        return "expected exactly one short-option bundle"
    letters, _, capabilities = bundles[0].partition("e")
    unknown = set(letters) - _ALLOWED_SHORT
    if unknown:
        return f"short option(s) {''.join(sorted(unknown))!r} not allowed"
    if re.fullmatch(r"[.A-Za-z0-9]*", capabilities) is None:
        return "malformed capability flags"
    return None


def _hook_args(environ: Mapping[str, str]) -> list[str]:
    args: list[str] = []
    while f"RSYNC_ARG{len(args)}" in environ:
        args.append(environ[f"RSYNC_ARG{len(args)}"])
    return args


def hook_main(environ: Mapping[str, str]) -> int:
    """The ``pre-xfer exec`` hook: 0 lets the transfer start; anything else aborts it, and
    rsync shows our stdout to the client."""
    push_id = environ.get("MESH_PUSH_ID", "")
    keep_name = environ.get("MESH_KEEP_NAME", "")
    if not valid_push_id(push_id) or not valid_keep_name(keep_name):
        why: str | None = "the tunnel did not name this push"
    elif environ.get("RSYNC_MODULE_NAME") != MODULE:
        why = f"unknown module {environ.get('RSYNC_MODULE_NAME')!r}"
    else:
        why = check_server_args(_hook_args(environ), keep_name, push_id)
    if why is None:
        return 0
    print(f"meshsync refused push {push_id}: {why}")
    return 1


if __name__ == "__main__":
    sys.exit(hook_main(os.environ))
