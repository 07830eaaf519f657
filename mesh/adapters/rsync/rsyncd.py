"""rsync at both ends of a push: the receiving daemon's config (its arguments are checked
on their way in, by ``serverargs``), and the sending command line with its include
patterns.

A push lands in two phases (issue 11): rsync writes it into the push's own *staging dir*,
``<data>/<keep>/in/<push id>/``, and nothing else; after the daemon exits, the receiving
agent checks each staged entry against the version the push announced and places it in the
live tree itself. So rsync never creates, changes or removes anything in the live tree,
and bytes the sender changed during the push are told apart from an edit made here.

How the receiver is made unable to write outside the staging dir (checked with rsync
3.5.0, protocol 32, on Debian 12; ``man rsyncd.conf``, and the behaviour observed, not
assumed):

- The receiver is rsync's *daemon* protocol spoken over our TLS tunnel: the tunnel starts a
  fixed ``rsync --server --daemon --config=C .`` whatever the client asked for, and the
  config has one write-only module, ``data``, whose ``path`` is the data folder. The
  tunnel creates the staging dir exclusively (mode 0700, ``<keep>/in`` too, no link
  followed) before the daemon starts, so a reused push id is refused.
- Why not the simpler fixed remote-shell server, ``rsync --server <our flags> . DEST``: it
  has no chroot and no filter the client cannot override. The daemon gives ``use chroot =
  yes`` (the module path becomes ``/``), a daemon filter and ``refuse options``; what it
  lacks, a way to force an option or a destination, the agent's check supplies.
- The arguments are checked before the daemon reads them (``serverargs``): the tunnel
  reads the client's greeting, module and server arguments from the stream it relays to
  the daemon, which come in the clear before any file data. Our client's arguments are
  ``--server -logtprIe.<caps> --numeric-ids --copy-dest ../../../ .
  data/<keep>/in/<push id>/``; the check accepts that shape only: the destination exactly
  this push's staging dir, exactly one ``--copy-dest`` equal to ``../../../``, letters of
  ``rlptgoI`` in one bundle, and nothing it does not know (``--delete``, ``--backup``,
  ``-b``, ``--inplace``, another ``*-dest``, ``-s``... are refused before the daemon has
  read an argument). It used to be the daemon's ``pre-xfer exec`` hook, a Perl script: a
  shell and a Perl start per push.
- ``refuse options`` is the second lock, an allow-list that rsync applies with its own
  option parser: checked with the agent's check out of the way (``test_tunnel.py``,
  ``test_the_daemon_alone_refuses_what_the_agent_checks``, for five of them), each of
  ``--delete``, ``--force``, ``--backup``, ``--backup-dir``, ``--suffix``, ``--inplace``,
  ``--append``, ``--partial(-dir)``, ``--delay-updates``, ``--temp-dir``, ``--link-dest``,
  ``--compare-dest``, ``-K``, ``-D``, ``-H``, ``-A``, ``-X``, ``-c``, ``-R``,
  ``--max-delete``, ``--remove-source-files``, ``--chown``, ``--timeout``,
  ``--copy-unsafe-links`` is refused ("The server is configured to refuse
  ...", exit 4, nothing touched). (``-L``, ``-k`` are the sender's own business.)
- The daemon filter, :func:`daemon_filter`, ``- /K/in/%MESH_PUSH_ID%/K/*** + /K/in/%ID%
  + /K/in/%ID%/** - /**``, is the third lock. Daemon filter paths are from the module
  root, not from the destination (checked: ``- /big`` does not stop ``K/in/P/big``), and
  rsync expands ``%MESH_PUSH_ID%`` per connection from the tunnel's environment (checked:
  a daemon started for push ``Q`` refuses the destination ``K/in/P/``: "daemon has
  excluded destination"). rsync checks the destination both as a file and as a directory,
  hence ``+ /K/in/%ID%`` besides ``/**``. So the daemon alone refuses any other
  destination, and inside the staging dir it refuses a ``K`` subtree ("daemon refused to
  receive directory"; it leaves that directory behind, empty, mode 0700), which would
  otherwise make the live keep area a delta basis. ``--copy-dest=../../`` (the keep area)
  is rejected by the daemon itself ("Your options have been rejected by the server").
- The delta basis: ``--copy-dest=../../../`` is relative to the destination dir, three
  levels up is the module root, and rsync looks each file up there by its own path: the
  live file is the basis, read only (the daemon filter does not apply to basis reads:
  checked). Checked with and without the chroot (as root and as ``nobody``): a 64 MiB
  file with 1 MiB of it changed sent 1,081,367 bytes client to server (57,483 back)
  with the basis, 67,125,500 without; the staged file was byte-identical to the
  sender's, the live one untouched (same inode, bytes, mtime).
- What is staged: every entry of the include list as the sender has it now, files,
  symlinks and folders, each folder on the way with the sender's mode, owner and mtime
  (also the staging dir itself: rsync applies the sender's data root to it, ``.``), and
  file modes and mtimes (checked to the nanosecond). A folder's mtime is kept unless it
  falls in the same second as the staged folder's creation: rsync (3.1.3+) then takes the
  two for equal and leaves the creation time. A path that is a folder (or a file) in the
  live tree and a file (or a folder) at the sender is staged as the sender has it, without
  any error: rsync does not look at the live tree except for basis files.
- Temp files: rsync writes each file as ``.<name>.XXXXXX`` (mode 0600) in the *staged*
  file's directory, inside the staging dir, and renames it there (``--temp-dir``,
  ``--partial-dir`` and ``--delay-updates`` are refused). A daemon killed with SIGKILL
  leaves that temp file there (checked), and nothing in the live tree.
- Symlinks are staged as sent (``munge symlinks = no``; checked: ``/etc/passwd`` and
  ``../../../../..`` staged unchanged). That is safe only because nothing follows them
  inside the daemon: the chroot makes an absolute or ``..`` target resolve inside the data
  folder at worst, the module is ``write only``, ``-K``/``-L``/``-k`` make no difference
  to the receiver (refused or sender-side), and rsync's own hardening (3.5.0: no symlinked
  parent is followed) is another layer. What runs *outside* the chroot (the agent:
  hashing staged files, placing them, restoring from the keep area) must never follow a
  link: ``lstat``/``O_NOFOLLOW`` only.
- As root, a daemon switches to ``nobody`` unless the module sets ``uid``/``gid``; we set
  ``uid = 0``/``gid = 0`` so owners and groups (sent as numbers: ``numeric ids``, which a
  chroot also implies) are kept. Without root there is no chroot: the module then runs
  with ``use chroot = no`` and rsync *sanitizes* incoming symlink values (checked:
  ``/etc/passwd`` is staged as ``etc/passwd``, ``../../../../..`` as ``.``): a
  development mode, logged as such.
- The basis is a side channel the old shape had too: the receiver sends the block
  checksums of the live file at the pushed path to the client. The filter keeps the keep
  area out of it.

Sending side: :func:`client_argv` is the only rsync command line we run: ``-rlptgoI``
(``archive`` without ``-D``: the module refuses devices and specials; ``-I``: see
:data:`SEND_FLAGS`), ``--numeric-ids``, ``--copy-dest=../../../``, the include list on
stdin (``--from0 --include-from=- --exclude=*``), and the destination
``rsync://127.0.0.1:<port>/data/<keep>/in/<push id>/``: the agent's loopback listener for
this push, which relays to the peer's tunnel (``loopback``). Nothing that deletes or moves
a receiver file: no ``--delete``, ``--force``, ``--backup(-dir)``. No ``--ignore-errors``.

What a push stages (:func:`include_patterns`; checked through this daemon config and check,
``tests/integration/test_push_deletes.py``): exactly the named paths the sender has now,
and the folders on the way to them (a folder not named but on the way is staged empty of
anything else). A named path the sender lacks (deleted there) is not in the list and
nothing is staged for it; the receiving agent applies the delete from the announcement.
Whatever the live tree holds (a folder with unnamed entries where the sender now has a
file, a file where it has a folder, entries created concurrently) is left as it was:
rsync deletes nothing. The sender's rsync exits with the daemon's status as the protocol
reports it; the receiving agent's push end sees the daemon's own.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mesh.adapters.rsync import loopback
from mesh.core import paths
from mesh.core.paths import KEEP_NAME
from mesh.errors import ConfigError

MODULE = "data"
STAGING = "in"  # <keep>/in/<push id>/: where a push lands, for the agent to check and place
# --copy-dest is relative to the destination dir, <keep>/in/<push id>/: three levels up is
# the module root, the live tree (rsync 3.5.0 accepts it with and without the chroot).
COPY_DEST = "../../../"
PUSH_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
KEEP_NAME_RE = re.compile(r"\.[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


def valid_push_id(push_id: object) -> bool:
    return isinstance(push_id, str) and PUSH_ID_RE.fullmatch(push_id) is not None


def valid_keep_name(name: object) -> bool:
    return isinstance(name, str) and KEEP_NAME_RE.fullmatch(name) is not None


def staging_dest(keep_name: str, push_id: str) -> str:
    """The destination of one push as the daemon's server sees it: ``/<keep>/in/<push id>/``
    (the client names it ``rsync://127.0.0.1:<port>/data/<keep>/in/<push id>/``)."""
    return f"/{keep_name}/{STAGING}/{push_id}/"


DEFAULT_KEEP_NAME = KEEP_NAME
RSYNC = "/usr/bin/rsync"
RSYNC_TEMP_GLOB = paths.RSYNC_TEMP_GLOB  # for lsyncd's excludes (mesh.adapters.lsyncd)


# -I (--ignore-times): every path in a push is one the gate decided the peer lacks, so
# never skip it because size and mtime match: two versions of one size written in the
# same second would never move (found by the operator tests' conflicts), and with
# --copy-dest such a file would be staged as a copy of the receiver's live file.
SEND_FLAGS = ("-rlptgoI", "--numeric-ids", f"--copy-dest={COPY_DEST}")
_REFUSE = "* !recursive !links !perms !times !group !owner !ignore-times !numeric-ids !copy-dest"
_WILDCARDS = frozenset("*?[")


# --- receiving side ----------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonConfig:
    """What the fixed receiving daemon serves and how."""

    data_dir: Path
    keep_name: str = DEFAULT_KEEP_NAME
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
    lines = [
        "# written by mesh.adapters.rsync.rsyncd for one TunnelServer; do not edit",
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
        # A peer's setuid, setgid and sticky bits never reach our disk, not even staged:
        # synced modes are permission bits only (mesh.adapters.fs.beneath.PERMISSIONS).
        "incoming chmod = ug-s,a-t",
        f"timeout = {config.io_timeout}",
        f"filter = {daemon_filter(keep)}",
        f"refuse options = {_REFUSE}",
    ]
    if config.chroot:
        lines += ["use chroot = yes", "uid = 0", "gid = 0"]
    else:
        lines += ["use chroot = no"]
    return "\n".join(lines) + "\n"


# --- sending side ------------------------------------------------------------------------


def daemon_url(port: int, path: str = "/") -> str:
    """``rsync://127.0.0.1:port/data<path>`` (``path`` from the module root, starting
    with ``/``): the sending rsync connects to the agent's loopback listener on ``port``,
    which relays it to the peer's tunnel (``loopback``)."""
    return f"rsync://{loopback.HOST}:{port}/{MODULE}{path}"


def client_argv(
    source: Path, port: int, keep_name: str, push_id: str, *, rsync: str = RSYNC
) -> list[str]:
    """The sender's whole command line; the include patterns go to its stdin."""
    return [
        rsync,
        *SEND_FLAGS,
        "--from0",
        "--include-from=-",
        "--exclude=*",
        # Small writes at once: the daemon protocol has a dozen round trips before the
        # data, and Nagle's wait for an ACK the agent delays cost ~40 ms on each.
        "--sockopts=TCP_NODELAY",
        f"{str(source).rstrip('/')}/",
        daemon_url(port, staging_dest(keep_name, push_id)),
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


# --- the staging area: the tunnel makes it, the daemon writes only into it -------------


def check_dirs(data_dir: Path, keep_dir: Path) -> tuple[Path, str]:
    """The resolved data dir and the keep dir's name; creates the keep dir and its staging
    area, ``<keep>/in`` (mode 0700)."""
    if not data_dir.is_dir():
        raise ConfigError(f"tunnel: data dir {data_dir} is not a directory")
    if keep_dir.parent.resolve() != data_dir.resolve():
        raise ConfigError(f"tunnel: keep dir {keep_dir} must be directly inside {data_dir}")
    if not valid_keep_name(keep_dir.name):
        raise ConfigError(f"tunnel: keep dir name {keep_dir.name!r} must match .NAME")
    with contextlib.suppress(FileExistsError):
        keep_dir.mkdir(mode=0o700)
    if not keep_dir.is_dir() or keep_dir.is_symlink():
        raise ConfigError(f"tunnel: keep dir {keep_dir} is not a directory")
    try:
        os.close(_staging_area(keep_dir))
    except OSError as err:
        raise ConfigError(f"tunnel: staging area {keep_dir / STAGING}: {err}") from err
    return data_dir.resolve(), keep_dir.name


def _staging_area(keep_dir: Path) -> int:
    """An fd of ``<keep_dir>/in``, made (mode 0700) if missing; no link is followed."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    keep_fd = os.open(keep_dir, flags)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(STAGING, 0o700, dir_fd=keep_fd)
        return os.open(STAGING, flags, dir_fd=keep_fd)
    finally:
        os.close(keep_fd)


def make_staging_dir(keep_dir: Path, push_id: str) -> None:
    """Create ``<keep_dir>/in/<push_id>`` (mode 0700), failing if it exists, without
    following a link."""
    fd = _staging_area(keep_dir)
    try:
        os.mkdir(push_id, 0o700, dir_fd=fd)
    finally:
        os.close(fd)
