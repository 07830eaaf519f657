"""The one path normalization for everything that crosses a boundary.

A synced path is relative to the data root, ``/``-separated, with no empty,
``.`` or ``..`` parts, no NUL, and at most ``MAX_PATH_BYTES`` bytes of UTF-8.
Unicode is kept exactly as given (no NFC/NFD folding): two names that differ
only in normalization are two files on Linux, and we mirror the filesystem.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from mesh.errors import InvalidPath

MAX_PATH_BYTES = 4096  # PATH_MAX on Linux
MAX_NAME_BYTES = 255  # NAME_MAX on Linux

# --- names the agent keeps for itself (issue 13) -------------------------------------
#
# Never synced, never scanned, and refused in anything a peer sends: a peer naming
# one could otherwise write into the keep area (objects under another object's hash,
# the area's own mode), the state dir, or a temp file the agent is about to rename.
KEEP_NAME = ".mesh-keep"  # the keep area, <data>/.mesh-keep (mesh.engine.keep)
STATE_NAME = ".mesh-state"  # a state dir kept inside the data dir
RESERVED_TOP = frozenset((KEEP_NAME, STATE_NAME))
# rsync writes into ".<name>.<6 random chars>" next to the target and renames it into
# place (receiver.c, get_tmpname: mkstemp's "XXXXXX"); the agent's own temp files take
# the same shape (Beneath.temp_name). Not matched: --temp-dir and --partial-dir.
# False positives: a user's hidden file whose last dot is followed by exactly six
# letters or digits (".config.backup", ".notes.2024ab") is never synced. We accept
# that rather than sync half-written temp files. fullmatch, not "$" (which also
# matches before a trailing newline), and DOTALL: names may hold newlines.
TEMP_CHARS = 6  # mkstemp's "XXXXXX"
RSYNC_TEMP = re.compile(rf"\.(.+)\.[A-Za-z0-9]{{{TEMP_CHARS}}}", re.DOTALL)
RSYNC_TEMP_GLOB = ".*." + "?" * TEMP_CHARS  # the same, as an rsync/lsyncd exclude


def temp_name(name: str, token: str) -> str:
    """The temp name for ``name`` in the shape of rsync's, with ``token`` (``TEMP_CHARS``
    letters or digits) as its random part."""
    if len(token) != TEMP_CHARS or not token.isascii() or not token.isalnum():
        raise InvalidPath(f"temp token {token!r} is not {TEMP_CHARS} letters or digits")
    return f".{name}.{token}"


def normalize(path: str) -> str:
    """Return the canonical form of ``path`` or raise ``InvalidPath``.

    Accepted leniently: a single leading ``./`` or repeated/trailing slashes
    are folded away. Refused: anything absolute or escaping the root.
    """
    if not isinstance(path, str):
        raise InvalidPath(f"path must be text, not {type(path).__name__}")
    if "\x00" in path:
        raise InvalidPath("path contains NUL")
    if path.startswith("/"):
        raise InvalidPath(f"absolute path {path[:80]!r}")
    try:
        encoded_len = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        # Lone surrogates: not representable on the wire or the disk.
        raise InvalidPath("path is not valid Unicode") from None
    if encoded_len > MAX_PATH_BYTES:
        raise InvalidPath(f"path longer than {MAX_PATH_BYTES} bytes")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        raise InvalidPath("empty path")
    for part in parts:
        if part == "..":
            raise InvalidPath(f"path escapes the root: {path[:80]!r}")
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise InvalidPath(f"name longer than {MAX_NAME_BYTES} bytes")
    return "/".join(parts)


def child(folder: str, name: str) -> str:
    """``normalize(folder + "/" + name)`` for a normalized ``folder`` ("" for the root):
    the same path, or the same refusal. A walk makes a path per entry, and a name read
    from a folder needs only its own checks (a million through ``normalize`` took 1.9 s
    of a restart's walk)."""
    path = f"{folder}/{name}" if folder else name
    if not name or name in (".", "..") or "/" in name or "\x00" in name:
        return normalize(path)
    try:
        too_long = (len(path.encode("utf-8")) > MAX_PATH_BYTES
                    or len(name.encode("utf-8")) > MAX_NAME_BYTES)
    except UnicodeEncodeError:
        too_long = True
    return normalize(path) if too_long else path


def is_normalized(path: str) -> bool:
    try:
        return normalize(path) == path
    except InvalidPath:
        return False


def parent(path: str) -> str | None:
    """The parent directory of a normalized path, or None at the top level."""
    head, sep, _ = path.rpartition("/")
    return head if sep else None


def deepest_first(paths: Iterable[str]) -> list[str]:
    """``paths`` with what is in a folder before the folder (then by name): a folder
    delete is applied after the deletes of what it held, and finds it gone."""
    return sorted(paths, key=lambda p: (-p.count("/"), p))



def reserved(path: str) -> str | None:
    """Why the normalized ``path`` is the agent's own and never synced, or None."""
    top, _, _ = path.partition("/")
    if top in RESERVED_TOP:
        return f"{top} is the agent's own"
    name = path.rpartition("/")[2]
    if name[:1] == "." and RSYNC_TEMP.fullmatch(name) is not None:  # a walk: every name
        return "an rsync temp name (.NAME.XXXXXX)"
    return None
