"""What is under the root, listed: the walks of the tree (the watcher's folders, the
scanner's walk, the start-up reconcile's ``lstat`` of every path) and what is synced at
all: which names (``default_ignore``, UTF-8 names) and mode bits (``PERMISSIONS``).
Split from ``mesh.adapters.fs.scanner``, which hashes what these find. Light to import:
the start-up walk's own process imports it (``mesh.adapters.fs.walkproc``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from mesh.core.paths import MAX_NAME_BYTES, MAX_PATH_BYTES, child, reserved
from mesh.errors import InvalidPath

log = logging.getLogger(__name__)

PERMISSIONS = 0o777  # the mode bits synced: never setuid, setgid or sticky from a peer's
PREHASH_BYTES = 1 << 20  # files this large are hashed in a worker thread first (DataPlane.scan)


def default_ignore(rel: str) -> bool:
    """Paths that are never synced: the keep area, the state dir, rsync temp files
    (``mesh.core.paths.reserved``, which peers' paths are refused by too)."""
    return reserved(rel) is not None


def utf8_name(name: str) -> bool:
    """Whether a name from the OS (surrogate-escaped) can cross the wire (UTF-8)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def log_bad_name(name: str, where: str) -> None:
    log.warning("skipping %r in %r: name is not valid UTF-8", os.fsencode(name), where or ".")


def tree(root: Path, rel: str, ignore: Callable[[str], bool], folders_only: bool = False
         ) -> Iterator[tuple[str, bool]]:
    """``(path, is_dir)`` for everything under directory ``rel`` ("" is the root); with
    ``folders_only``, for its folders alone, no file's name looked at (what the watcher
    watches: a million files' names took 4.4 s of the event loop).

    Pre-order and lazy: a directory is yielded before it is listed, so a
    caller that watches it on receipt misses nothing created inside it later.
    Symlinks are not followed; ignored paths and names that are not UTF-8 are
    skipped, with their subtrees.
    """
    for _, path, is_dir in _listed(root / rel, rel, ignore, folders_only):
        yield path, is_dir
        if is_dir:
            yield from tree(root, path, ignore, folders_only)


def stat_tree(root: Path, rel: str, ignore: Callable[[str], bool]
              ) -> Iterator[tuple[str, os.stat_result | None]]:
    """``tree``'s paths under directory ``rel``, in its order, each with its ``lstat``
    (None: gone or unreadable since it was listed), taken relative to its folder's
    descriptor: the kernel looks up one name per path, not every folder from ``/``
    down (the start-up walk's ``lstat`` of a million paths by full name: 8 s). A folder
    that is a symlink when it is opened is not listed."""
    try:
        fd = os.open(root / rel, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return  # removed or replaced since it was listed: its events tell
    except OSError as err:
        log.warning("cannot list %r: %s", rel or ".", err)
        return
    try:
        listed = [(path, is_dir, _lstat_at(fd, name))
                  for name, path, is_dir in _listed(fd, rel, ignore)]
    finally:
        os.close(fd)
    for path, is_dir, st in listed:
        yield path, st
        if is_dir:
            yield from stat_tree(root, path, ignore)


def _listed(where: Path | int, rel: str, ignore: Callable[[str], bool],
            folders_only: bool = False) -> list[tuple[str, str, bool]]:
    """``(name, path, is_dir)`` of each synced entry of directory ``rel`` (``where``: its
    path, or a descriptor of it), by name; none when it cannot be listed."""
    try:
        with os.scandir(where) as it:
            entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it
                             if not folders_only or e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []  # removed or replaced since it was listed: its events tell
    except OSError as err:
        log.warning("cannot list %r: %s", rel or ".", err)
        return []
    listed = []
    prefix = f"{rel}/" if rel else ""
    room = MAX_PATH_BYTES - len(prefix.encode("utf-8"))  # rel is a synced path: UTF-8
    for name, is_dir in entries:
        # ``child``'s checks, once per name: a name read from a folder is never empty,
        # "." or "..", and holds no "/" or NUL (a restart's walk makes a path per entry)
        try:
            size = len(name.encode("utf-8"))
        except UnicodeEncodeError:
            log_bad_name(name, rel)
            continue
        path: str | None = prefix + name
        if size > MAX_NAME_BYTES or size > room:
            path = _child(rel, name)
        if path is not None and not ignore(path):
            listed.append((name, path, is_dir))
    return listed


def _lstat_at(fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return None


def _child(rel: str, name: str) -> str | None:
    """The path of entry ``name`` of directory ``rel``, or None (logged) when it is not
    a valid path."""
    try:
        return child(rel, name)
    except InvalidPath as err:
        log.warning("skipping %r in %r: %s", name, rel or ".", err)
        return None
