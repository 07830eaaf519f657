"""The harness's hands and eyes on one node: a process beside the node's folder.

It writes what the harness asks (content made from the seed and the write id,
so nothing large crosses the pipe), reports every file that appears, changes or
goes in the folder (inotify, with the time it was read), and answers snapshots
of the whole tree. Standard library only: the same source runs here under
``python -c`` and inside a swarm task through ``docker exec`` (``mesh`` is in
the image; the harness is not).

Protocol: JSON lines. Requests on stdin carry an ``id``; the answer on stdout
carries the same ``id``. Events carry ``ev``: ``put`` (path, sha256, time) and
``del`` (path, time). A write names the contents the node must hold first
(``need``: the path's current heads as the harness knows them, at the path or
in a conflict copy of it); without them it is refused (``ok`` false) unless
``force`` is set, and the answer says what the node held (``held``): that is
what the write *saw* (issue 7, lost writes).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import random
import re
import select
import stat
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

IN_MODIFY = 0x2
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
MASK = IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
EVENT = struct.Struct("iIII")
CHUNK = 1 << 20
RMDIR_ROUNDS = 5
TMP_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"

# mesh.core.resolver.conflict_copy_path: dir/<stem>.conflict-<UTC>-<node>-<n><ext>
COPY_NAME = re.compile(
    r"(?P<stem>.*)\.conflict-\d{8}T\d{6}-(?P<node>.+?)-(?P<n>\d+)(?P<ext>\.[^.]*)?", re.DOTALL)


def content(key: str, wid: int, size: int) -> bytes:
    """The bytes of write ``wid``: a header naming it (so every write is unique),
    then pseudo-random bytes from the run's key; ``size`` at least the header."""
    header = f"loadtest {key} w{wid}\n".encode()
    body = random.Random(f"{key}/{wid}").randbytes(max(0, size - len(header)))
    return header + body


def original_of(rel: str) -> str | None:
    """The path a conflict copy ``rel`` was made for, or None."""
    folder, _, name = rel.rpartition("/")
    m = COPY_NAME.fullmatch(name)
    if m is None:
        return None
    base = m["stem"] + (m["ext"] or "")
    return f"{folder}/{base}" if folder else base


def hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def sha_file(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    return h.hexdigest()


class Inotify:
    """A recursive inotify watch of ``root`` through libc (no dependency)."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.dirs: dict[int, str] = {}

    def watch(self, path: Path, rel: str) -> bool:
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(path), MASK)
        if wd < 0:
            return False
        self.dirs[wd] = rel
        return True

    def read(self) -> Iterator[tuple[str | None, int, str]]:
        """(directory rel or None, mask, name) of each pending event."""
        try:
            buf = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return
        pos = 0
        while pos < len(buf):
            wd, mask, _cookie, length = EVENT.unpack_from(buf, pos)
            name = buf[pos + EVENT.size:pos + EVENT.size + length].rstrip(b"\0")
            pos += EVENT.size + length
            if mask & IN_IGNORED:
                self.dirs.pop(wd, None)
                continue
            yield self.dirs.get(wd), mask, os.fsdecode(name)


class Probe:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, str] = {}  # rel -> sha256, as last seen
        self.copies: dict[str, set[str]] = {}  # original rel -> its conflict copies
        self.cache: dict[str, tuple[tuple[int, int, int, int], str]] = {}
        self.notify = Inotify()
        self.out: list[str] = []
        self._add_tree(root, "", time.time(), emit=False)

    # --- output --------------------------------------------------------------------------

    def emit(self, doc: dict[str, Any]) -> None:
        self.out.append(json.dumps(doc, separators=(",", ":")))

    def flush(self) -> None:
        if self.out:
            sys.stdout.write("\n".join(self.out) + "\n")
            sys.stdout.flush()
            self.out.clear()

    # --- what is on disk -----------------------------------------------------------------

    def hash(self, rel: str) -> str | None:
        path = self.root / rel
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        sig = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = self.cache.get(rel)
        if cached is not None and cached[0] == sig:
            return cached[1]
        digest = sha_file(path)
        if digest is not None:
            self.cache[rel] = (sig, digest)
        return digest

    def _seen(self, rel: str, t: float) -> None:
        digest = self.hash(rel)
        if digest is None or self.files.get(rel) == digest:
            return
        self.files[rel] = digest
        orig = original_of(rel)
        if orig is not None:
            self.copies.setdefault(orig, set()).add(rel)
        self.emit({"ev": "put", "p": rel, "h": digest, "t": t})

    def _gone(self, rel: str, t: float) -> None:
        below = [p for p in self.files if p == rel or p.startswith(rel + "/")]
        for p in below:
            del self.files[p]
            self.cache.pop(p, None)
            orig = original_of(p)
            if orig is not None:
                self.copies.get(orig, set()).discard(p)
            self.emit({"ev": "del", "p": p, "t": t})

    def _add_tree(self, path: Path, rel: str, t: float, emit: bool = True) -> None:
        if not self.notify.watch(path, rel):
            return
        try:
            entries = list(os.scandir(path))
        except (FileNotFoundError, NotADirectoryError):
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            sub = f"{rel}/{e.name}" if rel else e.name
            if e.is_dir(follow_symlinks=False):
                self._add_tree(Path(e.path), sub, t, emit)
            elif e.is_file(follow_symlinks=False):
                if emit:
                    self._seen(sub, t)
                else:
                    digest = self.hash(sub)
                    if digest is not None:
                        self.files[sub] = digest

    def on_events(self) -> None:
        t = time.time()
        for folder, mask, name in self.notify.read():
            if mask & IN_Q_OVERFLOW:
                self.rescan(t)
                continue
            if folder is None or name.startswith(".") or hidden(folder):
                continue
            rel = f"{folder}/{name}" if folder else name
            if mask & (IN_DELETE | IN_MOVED_FROM):
                self._gone(rel, t)
            elif mask & IN_ISDIR:
                self._add_tree(self.root / rel, rel, t)
            else:
                self._seen(rel, t)

    def rescan(self, t: float) -> None:
        """After an inotify overflow: report what changed since the map was right."""
        now = self.tree()
        for rel in [p for p in self.files if p not in now]:
            self._gone(rel, t)
        for rel in now:
            self._seen(rel, t)

    def tree(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in filenames:
                if name.startswith("."):
                    continue
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                digest = self.hash(rel)
                if digest is not None:
                    out[rel] = digest
        return out

    def held(self, rel: str) -> tuple[str | None, list[str]]:
        """The content at ``rel`` now (None: absent), and the contents of its
        conflict copies: as the folder holds them now, not as the watch last saw them
        (a copy made a moment ago was seen by the user as much as the file was)."""
        folder, _, _ = rel.rpartition("/")
        try:
            with os.scandir(self.root / folder) as entries:
                names = [e.name for e in entries]
        except OSError:
            names = []
        copies: set[str] = set()
        for name in names:
            sub = f"{folder}/{name}" if folder else name
            if not name.startswith(".") and original_of(sub) == rel:
                digest = self.hash(sub)
                if digest is not None:
                    copies.add(digest)
        return self.hash(rel), sorted(copies)

    # --- requests --------------------------------------------------------------------------

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        if op == "snapshot":
            return {"files": self.tree()}
        if op == "holds":
            at, copies = self.held(req["path"])
            return {"ok": not self.missing(req, at, [at, *copies]), "held": [at, *copies]}
        if op in ("write", "patch", "append", "delete", "rename"):
            return self.change(op, req)
        if op == "mkdir":
            t0 = time.time()
            (self.root / req["path"]).mkdir(parents=True, exist_ok=True)
            return {"ok": True, "t0": t0, "t": time.time()}
        if op == "rmdir":
            return self.rmdir(req["path"])
        raise ValueError(f"unknown op {op!r}")

    @staticmethod
    def missing(req: dict[str, Any], at: str | None, held: list[str | None]) -> bool:
        """Whether a content the request needs is not here (None: a delete, held
        when the path is absent)."""
        need: list[str | None] = req.get("need", [])
        return any(h not in held and not (h is None and at is None) for h in need)

    def change(self, op: str, req: dict[str, Any]) -> dict[str, Any]:
        rel: str = req["path"]
        at, copies = self.held(rel)
        held = [at, *copies]
        if self.missing(req, at, held) and not req.get("force"):
            return {"ok": False, "held": held}
        if op != "write" and at is None:
            return {"ok": False, "held": held, "absent": True}
        t0 = time.time()
        if op == "write":
            data = content(req["key"], req["wid"], req["size"])
            self._write(rel, data, req.get("style", "replace"))
            digest, size = hashlib.sha256(data).hexdigest(), len(data)
        elif op == "patch":
            digest, size = self._patch(rel, req)
        elif op == "append":
            digest, size = self._append(rel, req)
        elif op == "delete":
            with contextlib.suppress(FileNotFoundError):
                (self.root / rel).unlink()
            digest, size = None, 0
        else:
            dst = self.root / req["dst"]
            if dst.exists():
                return {"ok": False, "held": held, "exists": True}
            dst.parent.mkdir(parents=True, exist_ok=True)
            (self.root / rel).rename(dst)
            digest, size = at, 0
        return {"ok": True, "held": held, "hash": digest, "size": size,
                "t0": t0, "t": time.time()}

    def _write(self, rel: str, data: bytes, style: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if style == "truncate":
            path.write_bytes(data)
            return
        # rsync's temp-name shape (".<name>.XXXXXX"): meshsync ignores it, as it
        # ignores rsync's own, so only the rename is a change.
        tag = "".join(random.choices(TMP_ALNUM, k=6))
        tmp = path.with_name(f".{path.name}.{tag}")
        tmp.write_bytes(data)
        tmp.rename(path)

    def _patch(self, rel: str, req: dict[str, Any]) -> tuple[str, int]:
        """Change ``length`` bytes at ``offset`` in place: same inode, new bytes."""
        with (self.root / rel).open("r+b") as f:
            data = bytearray(f.read())
            offset = min(req["offset"], max(0, len(data) - 1))
            patch = content(req["key"], req["wid"], req["length"])
            data[offset:offset + len(patch)] = patch
            f.seek(offset)
            f.write(patch)
            f.flush()
            st = os.fstat(f.fileno())
        digest = hashlib.sha256(data).hexdigest()
        # Our inode as we left it: if a push replaces the file, the inode differs.
        self.cache[rel] = ((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns), digest)
        return digest, len(patch)


    def _append(self, rel: str, req: dict[str, Any]) -> tuple[str, int]:
        """``length`` bytes at the end, in place."""
        extra = content(req["key"], req["wid"], req["length"])
        with (self.root / rel).open("r+b") as f:
            data = f.read() + extra
            f.write(extra)
            f.flush()
            st = os.fstat(f.fileno())
        digest = hashlib.sha256(data).hexdigest()
        self.cache[rel] = ((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns), digest)
        return digest, len(extra)

    def rmdir(self, rel: str) -> dict[str, Any]:
        """``rm -rf`` of a folder, as a user does it: each file is hashed (with its
        conflict copies) before it is unlinked — what the removal saw — then the
        folders go, deepest first. A file that arrives meanwhile keeps a folder
        from going: it is taken in the next round (at most ``RMDIR_ROUNDS``).
        ``removed``: (path, what the node held there) for each file that was not a
        conflict copy or a hidden name, and for each original whose copies alone were
        there."""
        top = self.root / rel
        if not top.is_dir():
            return {"ok": False, "held": [], "absent": True}
        t0 = time.time()
        removed: dict[str, list[str | None]] = {}
        gone = False
        for _ in range(RMDIR_ROUNDS):
            for dirpath, _dirs, names in os.walk(top, topdown=False):
                folder = os.path.relpath(dirpath, self.root)
                subs = [f"{folder}/{n}" for n in sorted(names)]
                for sub in subs:  # every file's copies are still there when it is hashed
                    if hidden(sub):
                        continue
                    orig = original_of(sub) or sub
                    if orig not in removed:
                        at, copies = self.held(orig)
                        if at is not None or copies:
                            removed[orig] = [at, *copies]
                for sub in subs:
                    with contextlib.suppress(FileNotFoundError):
                        (self.root / sub).unlink()
                if dirpath != str(top):
                    with contextlib.suppress(OSError):
                        Path(dirpath).rmdir()
            try:
                top.rmdir()
            except FileNotFoundError:
                gone = True
            except OSError:
                continue  # something arrived: another round
            else:
                gone = True
            if gone:
                break
        return {"ok": True, "removed": [[p, h] for p, h in removed.items()], "gone": gone,
                "t0": t0, "t": time.time()}


def serve(root: Path) -> None:
    probe = Probe(root)
    probe.emit({"ev": "ready", "t": time.time(), "files": len(probe.files)})
    probe.flush()
    stdin = sys.stdin.buffer
    pending = b""
    while True:
        ready, _, _ = select.select([stdin.fileno(), probe.notify.fd], [], [], 1.0)
        if probe.notify.fd in ready:
            probe.on_events()
        if stdin.fileno() in ready:
            chunk = os.read(stdin.fileno(), 1 << 16)
            if not chunk:
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    req = json.loads(line)
                    try:
                        answer = probe.request(req)
                    except OSError as err:
                        answer = {"ok": False, "error": f"{req['op']} {req.get('path')}: {err}"}
                    probe.emit({"id": req["id"], **answer})
            # what our own writes caused, before the next request
            probe.on_events()
        probe.flush()


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
