"""rsync at both ends of a push: the receiving daemon's config and argument check, and the
sending command line with its include patterns.

How the receiver is made unable to destroy content (checked with rsync 3.5.0 on Debian 12;
``man rsyncd.conf``, and the behaviour observed, not assumed):

- The receiver is rsync's *daemon* protocol spoken over our TLS tunnel: the tunnel starts a
  fixed ``rsync --server --daemon --config=C .`` whatever the client asked for, and the
  config has one write-only module, ``data``, whose ``path`` is the data folder.
- Why not the simpler fixed remote-shell server, ``rsync --server <our flags> . DATA/``,
  where ``--backup`` would be ours by construction: it has no chroot and no filter the
  client cannot override, so a client could plant a symlink in the keep area and have
  later backups (renames, done as root) land where it points; rsync 3.5.0's resolver
  follows links owned by root, i.e. every link a root receiver created. The daemon gives
  ``use chroot = yes`` (the module path becomes ``/``), a daemon filter and
  ``refuse options``; what it lacks, a way to force an option, the hook below supplies.
- The daemon has no setting that *forces* an option, so ``--backup`` is enforced by a
  ``pre-xfer exec`` hook (:func:`check_server_args`, run as ``python -I -S
  mesh/adapters/rsyncd_hook.py``). rsync hands the hook the client's exact server arguments as
  ``RSYNC_ARG0..n``, also when the client used ``--secluded-args`` (verified), and aborts
  the transfer when it exits non-zero. The hook accepts one shape only: ``-b`` in the
  single short-option bundle, exactly one ``--backup-dir`` equal to
  ``/<keep>/<this push id>`` (the tunnel passes the push id in the environment), the
  destination ``/``, and nothing it does not know. A client that omits the backup, names
  another backup dir or adds an option is refused before any file is touched.
- ``refuse options = * !recursive ...`` is the second lock, an allow-list that rsync itself
  applies with its own option parser, so no alias or abbreviation of ``--inplace``,
  ``--append``, ``--temp-dir``, ``--partial(-dir)``, ``--delay-updates``, ``--suffix``,
  ``--link-dest`` and its kin, ``-K``, ``-D``, ``-H``/``-A``/``-X``, ``--max-delete``,
  ``--remove-source-files``, ``--usermap``/``--chown``, ``--timeout``... gets through even
  if the hook misread one. (Checked: each of those is refused, exit code 4.)
- With ``--backup-dir``, rsync *renames* every file it replaces or deletes into that dir,
  keeping its relative path, also the entries of a directory that a push removes, and
  symlinks (checked). The keep area is a hidden dir inside the module, so the rename stays
  on the same filesystem. The tunnel creates ``<keep>/<push id>`` exclusively before the
  transfer: a reused push id would let a second backup overwrite the first.
- The daemon filter ``+ /K/ - /K + /K/*/ - /K/**`` keeps clients out of the keep area:
  nothing but empty per-push directories may be sent or deleted there, and a symlink named
  ``K`` or ``K/x`` is refused. A plain ``- /K/***`` cannot be used: rsync 3.5.0 rejects a
  ``--backup-dir`` inside a daemon-excluded path ("Your options have been rejected").
- Symlinks are stored as sent (``munge symlinks = no``). That is safe only because nothing
  follows them inside the daemon: the chroot makes an absolute or ``..`` target resolve
  inside the data folder at worst, the module is ``write only`` (the daemon never reads a
  file through a link to serve it), and ``-K``/``-L``/``-k`` are refused. rsync's own
  hardening (3.5.0: no symlinked parent is followed out of the tree) is a third layer.
  What runs *outside* the chroot (the agent: hashing, restoring from the keep area) must
  never follow a link either: ``lstat``/``O_NOFOLLOW`` only.
- As root, a daemon switches to ``nobody`` unless the module sets ``uid``/``gid``; we set
  ``uid = 0``/``gid = 0`` so owners and groups (sent as numbers: ``numeric ids``, which a
  chroot also implies) are kept. Without root there is no chroot: the module then runs
  with ``use chroot = no`` and rsync *sanitizes* incoming symlink values (checked: ``/a``
  is stored as ``a``, ``../../x`` as ``x``): a development mode, logged as such.
- rsync writes each file into ``.<name>.XXXXXX`` in the target's own directory and renames
  it into place (its default; ``--temp-dir``, ``--partial-dir`` and ``--delay-updates``
  are refused), so the watcher can ignore one name pattern, :data:`RSYNC_TEMP_GLOB`.

Sending side: :func:`client_argv` is the only rsync command line we run: ``-rlptgo``
(``archive`` without ``-D``: the module refuses devices and specials), ``--numeric-ids``,
``--delete``, ``--backup-dir``, the include list on stdin (``--from0 --include-from=-
--exclude=*``) and ``--rsh`` naming our tunnel. No ``--ignore-errors``: an I/O error on the
sender must not turn into deletions on the receiver.

What a push may remove: only what it names (:func:`include_patterns`). Checked with rsync
3.5.0 through this daemon config and hook, the sender lacking ``p`` (deleted there) and
naming it as ``/p``, ``--exclude=*`` after the list:

- The receiver's ``p`` is an empty directory, a file or a link: removed; a file or link
  is renamed into the backup dir, an empty directory is not kept. Exit 0.
- ``p`` holds entries the push also names (``/p/c``; ``/p/sub`` and ``/p/sub/x``...):
  each goes into the backup dir under its path (``<push>/p/c``), then ``p`` is removed.
  Exit 0.
- ``p`` holds an entry the push does not name, at any depth (``p/c``, or ``p/sub/x``
  with ``/p/sub`` named): ``--exclude=*`` protects it, so it stays, and so do ``p`` and
  every directory on the way to it (their named entries are still removed and kept).
  "cannot delete non-empty directory: p" is an info line, not an error: the daemon logs
  it, the client prints it on its stdout. Exit 0.
- The sender has a *file* (or link) ``p`` and the receiver a directory ``p``: as above,
  the named entries go and the directory is removed if nothing is left, and the file
  takes its place. If an unnamed entry is left, the file does not land: the daemon
  logs "could not make way for new regular file: p" and exits 23 (a partial transfer;
  the agent's push end then takes the push as not complete). The *sender's* rsync exits
  0 all the same: its remote shell (``mesh.rsh``, or the inline relay's ``cat``) exits
  0, and a client whose server is a daemon behind a remote shell takes that status for
  the server's.
- The sender has a directory ``p`` with named children (``/p/``, ``/p/c``) and the
  receiver a file ``p``: the file is renamed into the backup dir, the directory and
  children land. Exit 0.
- A named path whose parent directory the sender lacks (only ``/p/c`` named, with the
  parent pattern ``/p/``): rsync can reach ``p/c`` only by deleting ``p``, so it removes
  ``p/c`` and then ``p`` too if nothing unnamed is left in it (a directory the push did
  not name, but one that holds nothing else); with an unnamed entry left, ``p`` stays.
- ``--force`` changes none of these (each case run with and without it): with
  ``--delete`` rsync already removes directories recursively; ``--force`` only matters
  without ``--delete``. So it is not sent, and both the hook and ``refuse options``
  refuse it (checked: the hook first, "option '--force' is not allowed"; with no hook,
  the daemon itself, "The server is configured to refuse --force"; exit 4 either way,
  nothing touched). A sender of an earlier release, which sent ``--force`` and
  ``/p/***``, is so refused by an upgraded receiver: during a rolling upgrade its pushes
  fail and are retried until it is upgraded too, rather than delete what it never saw.
- The old list also sent ``/p/***`` for each such ``p``. It matches the receiver's whole
  subtree, so ``--delete`` removed every entry under ``p``, named or not (kept in the
  backup dir, exit 0): a file created there concurrently, which the sender never saw,
  was deleted on the receiver, and its scan took the absence for a delete of its own.
"""

from __future__ import annotations

import os
import shlex
import stat
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mesh.adapters import rsyncd_hook

# The hook's half (mesh.adapters.rsyncd_hook), here too for the sending side and tests.
KEEP_NAME_RE = rsyncd_hook.KEEP_NAME_RE
COPY_DEST = rsyncd_hook.COPY_DEST
MODULE = rsyncd_hook.MODULE
PUSH_ID_RE = rsyncd_hook.PUSH_ID_RE
STAGING = rsyncd_hook.STAGING
check_server_args = rsyncd_hook.check_server_args
hook_main = rsyncd_hook.hook_main
staging_dest = rsyncd_hook.staging_dest
valid_keep_name = rsyncd_hook.valid_keep_name
valid_push_id = rsyncd_hook.valid_push_id

DEFAULT_KEEP_NAME = ".mesh-keep"
RSYNC = "/usr/bin/rsync"
RSYNC_TEMP_GLOB = ".*.??????"  # rsync's mkstemp name: "." + name + "." + 6 characters


# -I (--ignore-times): every path in a push is one the gate decided the peer lacks, so
# never skip it because size and mtime match: two versions of one size written in the
# same second would never move (found by the operator tests' conflicts).
SEND_FLAGS = ("-rlptgoI", "--numeric-ids", f"--copy-dest={COPY_DEST}")
_REFUSE = "* !recursive !links !perms !times !group !owner !ignore-times !numeric-ids !copy-dest"
_WILDCARDS = frozenset("*?[")


# --- receiving side ----------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonConfig:
    """What the fixed receiving daemon serves and how."""

    data_dir: Path
    keep_name: str = DEFAULT_KEEP_NAME
    python: str = sys.executable
    chroot: bool = True
    io_timeout: int = 300  # seconds without progress before the daemon gives up

    def __post_init__(self) -> None:
        text = str(self.data_dir)
        if not self.data_dir.is_absolute() or any(c in text for c in "\n\r\0"):
            raise ValueError(f"data dir must be an absolute path on one line: {text!r}")
        if not valid_keep_name(self.keep_name):
            raise ValueError(f"invalid keep dir name {self.keep_name!r}")


def daemon_filter(keep: str) -> str:
    """The module's filter: the push may write only inside its own staging dir (the
    daemon expands ``%MESH_PUSH_ID%``, set by the tunnel, per connection), never into a
    keep area inside it (which would also make the keep area a delta basis)."""
    staging = f"/{keep}/{STAGING}/%MESH_PUSH_ID%"
    return f"- {staging}/{keep}/*** + {staging} + {staging}/** - /**"


def render_daemon_config(config: DaemonConfig) -> str:
    """The rsyncd.conf of the receiving daemon (see the module docstring for each line)."""
    keep = config.keep_name
    # rsyncd.conf expands %VAR% in values ("%%" is a literal %); a trailing "/" keeps a
    # trailing space of the path.
    path = str(config.data_dir).replace("%", "%%").rstrip("/") + "/"
    # -I -S and a path, not -m: no site packages to set up, ~10 ms instead of ~27 per push.
    hook = f"{shlex.quote(config.python)} -I -S {shlex.quote(rsyncd_hook.__file__)}"
    lines = [
        "# written by mesh.adapters.rsyncd for one TunnelServer; do not edit",
        "log file = /dev/stderr",
        "transfer logging = no",
        "reverse lookup = no",
        "forward lookup = no",
        f"[{MODULE}]",
        f"path = {path}",
        "read only = no",
        "write only = yes",
        "list = no",
        "numeric ids = yes",
        "munge symlinks = no",
        f"timeout = {config.io_timeout}",
        f"filter = {daemon_filter(keep)}",
        f"refuse options = {_REFUSE}",
        f"pre-xfer exec = {hook}",
    ]
    if config.chroot:
        lines += ["use chroot = yes", "uid = 0", "gid = 0"]
    else:
        lines += ["use chroot = no"]
    return "\n".join(lines) + "\n"


# --- sending side ------------------------------------------------------------------------


def rsh_command(words: Sequence[str]) -> str:
    """One ``--rsh`` value. rsync splits it at spaces and honours single quotes, where a
    doubled quote stands for one (rsync(1), ``--rsh``)."""
    return " ".join("'" + word.replace("'", "''") + "'" for word in words)


def daemon_target(host: str, path: str = "/") -> str:
    """``host::data/<path>`` (``path`` from the module root, starting with ``/``),
    bracketing an IPv6 address as rsync wants."""
    return f"[{host}]::{MODULE}{path}" if ":" in host else f"{host}::{MODULE}{path}"


def client_argv(
    source: Path, host: str, rsh: str, keep_name: str, push_id: str, *, rsync: str = RSYNC
) -> list[str]:
    """The sender's whole command line; the include patterns go to its stdin."""
    return [
        rsync,
        *SEND_FLAGS,
        "--from0",
        "--include-from=-",
        "--exclude=*",
        f"--rsh={rsh}",
        f"{str(source).rstrip('/')}/",
        daemon_target(host, staging_dest(keep_name, push_id)),
    ]


def _literal(path: str) -> str:
    """``path`` as an rsync pattern matching only itself. rsync reads backslash as an escape
    only in a pattern that holds a wildcard (rsync(1), "PATTERN MATCHING RULES"), so escape
    only when one is there."""
    if not _WILDCARDS.isdisjoint(path):
        return "".join("\\" + c if c in "\\*?[" else c for c in path)
    return path


def include_patterns(paths: Iterable[str], source: Path) -> list[str]:
    """The ``--include-from`` list that sends exactly those of ``paths`` (normalized,
    relative to ``source``) that exist here now, as they are now:

    - a directory: ``/p/``, the directory itself but none of its entries;
    - anything else (a file, a symlink): ``/p``;
    - nothing (deleted here): no pattern. The push deletes nothing on the receiver (no
      ``--delete``); its agent applies deletes from the push's announcement;

    plus every parent directory of a path that is sent, ``/a/``, and ``/``, which rsync
    must enter to reach them (they are created in the staging dir with their modes here).
    Never ``/p/***``: that named the whole subtree, including what the grant never saw.
    """
    patterns: dict[str, None] = {"/": None}
    for path in paths:
        try:
            is_dir = stat.S_ISDIR(os.lstat(source / path).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            continue
        parts = path.split("/")
        for depth in range(1, len(parts)):
            patterns["/" + _literal("/".join(parts[:depth])) + "/"] = None
        patterns["/" + _literal(path) + ("/" if is_dir else "")] = None
    return list(patterns)
