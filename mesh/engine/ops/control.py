"""The agent's control socket: what ``mesh conflicts`` and ``mesh verify`` ask the
running agent (issue 5).

``<state dir>/ctl.sock``, mode 0600: only this node's own operator may ask.
One request frame and one reply frame (``mesh.adapters.rsync.tunnel`` framing: 4-byte
big-endian length, msgpack)::

    request  {"v": 1, "op": "conflicts" | "conflict" | "restore" | "verify", "args": {...}}
    reply    {"v": 1, "ok": <result>}  or  {"v": 1, "error": <one line>}

Results are plain maps (the ``--json`` output of the commands). Even the read-only
commands go through the agent: restore and verify need it anyway (only the agent may
write the data folder, only it has the links to the peers), and this way the CLI
never opens, creates or migrates the agent's SQLite file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mesh.adapters.fs.scanner import ScanError
from mesh.adapters.streams import (
    Connections,
    close_stream,
    read_frame,
    start_unix_server,
    stop_unix_server,
)
from mesh.clock import now_ms
from mesh.core import tree
from mesh.core.manifest import Entry, Kind
from mesh.core.vclock import Ordering, hlc_wall_ms
from mesh.engine.dataplane import DataPlane
from mesh.engine.exchange import Exchange
from mesh.errors import MeshError, RemoteProtocolError
from mesh.frames import encode_frame
from mesh.store.index import ConflictRow, Index

LOG = logging.getLogger("mesh.engine.ops.control")

VERSION = 1
SOCKET_NAME = "ctl.sock"  # no longer than gate.sock: unix socket paths are short
MAX_FRAME = 64 << 20
REQUEST_TIMEOUT = 10.0  # for a connected client to send its request
VERIFY_PEER_TIMEOUT = 8.0  # a peer that does not answer within this is "unreachable"


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


class ControlError(MeshError):
    """The agent answered the request with an error (unknown id, nothing to restore...)."""


class AgentUnavailable(MeshError):
    """The agent's control socket could not be reached, or it did not answer."""


@dataclass(frozen=True, slots=True)
class LinkInfo:
    address: str
    peer: str | None  # None until the link has connected once
    up: bool


# --- what the commands show ---------------------------------------------------------------


def when(ms: int | None) -> str | None:
    """UTC ISO 8601 with milliseconds, or None."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def entry_doc(e: Entry) -> dict[str, Any]:
    return {
        "node": e.writer, "written": when(hlc_wall_ms(e.hlc)), "hlc": e.hlc,
        "vector": e.vector.to_dict(), "kind": e.kind.name.lower(), "deleted": e.deleted,
        "hash": None if e.hash is None else e.hash.hex(), "size": e.size,
        "mode": f"{e.mode:04o}",
    }


def conflict_doc(row: ConflictRow) -> dict[str, Any]:
    c = row.conflict
    return {
        "id": c.id, "path": c.path, "rule": c.rule.value,
        "winner": entry_doc(c.winner), "loser": entry_doc(c.loser),
        "loser_kept_at": c.copy_path, "resolved_vector": c.resolved.vector.to_dict(),
        "logged_ms": row.logged_ms, "logged": when(row.logged_ms),
        "restored_ms": row.restored_ms, "restored": when(row.restored_ms),
    }


# --- the agent's side ---------------------------------------------------------------------


class Operations:
    """What the control socket can ask of the running agent."""

    def __init__(self, *, me: str, index: Index, exchange: Exchange, data: DataPlane,
                 links: Callable[[], list[LinkInfo]]) -> None:
        self.me = me
        self.index = index
        self.exchange = exchange
        self.data = data
        self.links = links
        self.handlers: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "conflicts": self.conflicts, "conflict": self.conflict,
            "restore": self.restore, "verify": self.verify,
        }

    async def conflicts(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        since, limit = _arg(args, "since_ms", int), _arg(args, "limit", int)
        pattern, node = _arg(args, "path", str), _arg(args, "node", str)
        out = []
        for row in self.index.conflicts(since_ms=since):
            c = row.conflict
            if pattern is not None and not fnmatch.fnmatchcase(c.path, pattern):
                continue
            if node is not None and node not in (c.winner.writer, c.loser.writer):
                continue
            out.append(conflict_doc(row))
            if limit is not None and len(out) >= limit:
                break
        return out

    async def conflict(self, args: dict[str, Any]) -> dict[str, Any]:
        return conflict_doc(self._find(args))

    def _find(self, args: dict[str, Any]) -> ConflictRow:
        """A conflict by id, or by a prefix of the id that only one conflict has."""
        ref = _arg(args, "id", str) or ""
        row = self.index.conflict(ref)
        if row is None and len(ref) >= 4:
            matches = [i for i in self.index.conflict_ids() if i.startswith(ref)]
            if len(matches) > 1:
                raise ControlError(f"conflict id {ref!r} is ambiguous: {len(matches)} match")
            row = self.index.conflict(matches[0]) if matches else None
        if row is None:
            raise ControlError(f"no conflict {ref!r} in {self.me}'s conflict log")
        return row

    async def restore(self, args: dict[str, Any]) -> dict[str, Any]:
        """Bring the loser's content back at its path as a new local edit, which then
        wins (its vector dominates both) and syncs like any other write."""
        row = self._find(args)
        c = row.conflict
        loser = c.loser
        if loser.kind is Kind.DIR:
            raise ControlError(f"the losing version of {c.path} is a directory: nothing to "
                               "restore (the files in it have versions of their own)")
        # The restore must be an edit made on top of the resolution, so that it beats
        # both versions everywhere instead of starting a new conflict.
        disk = self.index.state(c.path).disk
        if disk is None or disk.vector.compare(c.resolved.vector) not in (Ordering.EQUAL,
                                                                           Ordering.AFTER):
            raise ControlError(
                f"{self.me} has not caught up on {c.path} yet (it holds vector "
                f"{None if disk is None else disk.vector.to_dict()}, the resolution is "
                f"{c.resolved.vector.to_dict()}); restore once `mesh verify` passes")
        try:
            found = self.data.scanner.observe(c.path)
            current = None if found is None else found.content
            if current == loser.content:
                return {"id": c.id, "path": c.path, "changed": False, "source": None}
            if loser.content is None:
                assert current is not None
                self.data.keep.file_away(c.path, current)  # the delete wins; keep what it removes
                if self.data.fs.lexists(c.path):
                    raise ControlError(f"restore the delete of {c.path}: it is a directory "
                                       "that is not empty")
                source = "a delete"
            else:
                source = self._bring_back(c.path, c.copy_path, loser)
        except (OSError, MeshError) as err:
            raise ControlError(f"restore {c.path}: {err}") from err
        await self.data.scan([c.path])
        with self.index.batch():
            self.index.mark_restored(c.id, now_ms())
        LOG.info("operator restored the losing version of %s (conflict %s) from %s",
                 c.path, c.id, source)
        now_disk = self.index.state(c.path).disk
        return {"id": c.id, "path": c.path, "changed": True, "source": source,
                "vector": None if now_disk is None else now_disk.vector.to_dict()}

    def _bring_back(self, path: str, copy_path: str | None, loser: Entry) -> str:
        content = loser.content
        assert content is not None
        at_copy = False
        if copy_path is not None:
            with contextlib.suppress(ScanError):
                copy = self.data.scanner.observe(copy_path)
                at_copy = copy is not None and copy.content == content
        if not at_copy and not self.data.keep.has(content):
            raise ControlError(
                f"the losing content of {path} is not on {self.me}: no unchanged conflict "
                f"copy at {copy_path} and nothing in the keep area; restore it on a node "
                "that has it")
        source = copy_path if at_copy and copy_path is not None else path
        self.data.write_back(source, loser.kind, content, loser.mode, path)
        return f"the conflict copy {copy_path}" if at_copy else "the keep area"

    async def verify(self, args: dict[str, Any]) -> dict[str, Any]:
        """Compare this node's tree with every reachable peer's (``mesh.core.tree``)."""
        unreachable: dict[str, str] = {}
        asked: list[str] = []
        for link in self.links():
            if link.up and link.peer is not None:
                asked.append(link.peer)
            else:
                unreachable[link.peer or link.address] = (
                    "link down" if link.peer else f"never connected to {link.address}")
        own = self.exchange.tree_entries()
        sums: dict[str, tree.FolderSums] = {self.me: tree.folder_sums(own)}
        for peer, got in zip(asked, await self._each(asked, self.exchange.requests.ask_tree),
                             strict=True):
            if isinstance(got, BaseException):
                unreachable[peer] = _why(got)
            else:
                sums[peer] = got
        folders = tree.differing_folders(sums)
        wanted = set(folders)
        listings: dict[str, list[Entry]] = {
            self.me: [e for e in own if tree.folder_of(e.path) in wanted]}
        if folders:
            peers = [p for p in sums if p != self.me]
            requests = self.exchange.requests
            got_all = await self._each(peers, lambda p: requests.ask_listing(p, folders))
            for peer, got in zip(peers, got_all, strict=True):
                if isinstance(got, BaseException):
                    unreachable[peer] = _why(got)
                else:
                    listings[peer] = got
        return {
            "node": self.me,
            "answered": sorted(p for p in sums if p != self.me and p not in unreachable),
            "unreachable": unreachable,
            "paths": {n: sum(count for _, count in s.values()) for n, s in sums.items()},
            "differing_folders": folders,
            "differences": [{"path": d.path, "held": {n: None if e is None else entry_doc(e)
                                                      for n, e in d.held.items()}}
                            for d in tree.differences(listings)],
        }

    @staticmethod
    async def _each(peers: list[str], ask: Callable[[str], Awaitable[Any]]) -> list[Any]:
        return await asyncio.gather(
            *(asyncio.wait_for(ask(p), VERIFY_PEER_TIMEOUT) for p in peers),
            return_exceptions=True)


def _arg(args: dict[str, Any], name: str, kind: type) -> Any:
    value = args.get(name)
    if value is not None and (type(value) is not kind):
        raise RemoteProtocolError(f"{name} must be {kind.__name__}")
    return value


def _why(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return f"no answer within {VERIFY_PEER_TIMEOUT:g} s"
    return str(err) or type(err).__name__


class ControlServer:
    """The unix-socket server in the agent that answers the operator's commands."""

    def __init__(self, path: Path, ops: Operations) -> None:
        self.path = path
        self.ops = ops
        self._server: asyncio.AbstractServer | None = None
        self._connections = Connections("control", 16)

    async def start(self) -> None:
        self._server = await start_unix_server(
            self.path, "control",
            lambda r, w: self._connections.serve(w, lambda: self._serve(r, w)))

    async def stop(self) -> None:
        if self._server is None:
            return
        await stop_unix_server(self._server, self._connections, self.path)
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                message = await read_frame(reader, MAX_FRAME)
            reply = await self._answer(message)
            writer.write(encode_frame({"v": VERSION, **reply}))
            await writer.drain()
        except (OSError, TimeoutError, RemoteProtocolError) as err:
            LOG.info("control: request ended early: %s", err or type(err).__name__)
        finally:
            await close_stream(writer)

    async def _answer(self, message: Any) -> dict[str, Any]:
        try:
            if not isinstance(message, dict) or message.get("v") != VERSION:
                raise RemoteProtocolError(f"not a version {VERSION} control request")
            op, args = message.get("op"), message.get("args")
            handler = self.ops.handlers.get(op) if isinstance(op, str) else None
            if handler is None or not isinstance(args, dict):
                raise RemoteProtocolError(f"unknown op {str(op)[:40]!r}")
            return {"ok": await handler(args)}
        except RemoteProtocolError as err:
            why = f"bad request: {err.reason}"
        except MeshError as err:
            why = str(err)
        except Exception as err:  # a bug in an operation: say so, keep serving
            LOG.exception("control: the operation failed")
            why = f"internal error ({type(err).__name__}: {err})"
        return {"error": why}


# --- the command's side -------------------------------------------------------------------


async def ask(state_dir: Path, op: str, args: dict[str, Any], *, within: float) -> Any:
    """Ask the agent of ``state_dir``; its result, or ``ControlError``/``AgentUnavailable``."""
    path = socket_path(state_dir)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 5)
    except (OSError, TimeoutError) as err:
        why = (err.strerror if isinstance(err, OSError) else None) or "timed out"
        raise AgentUnavailable(f"cannot reach the agent at {path}: {why}") from None
    try:
        writer.write(encode_frame({"v": VERSION, "op": op, "args": args}))
        async with asyncio.timeout(within):
            await writer.drain()
            reply = await read_frame(reader, MAX_FRAME)
    except TimeoutError:
        raise AgentUnavailable(f"the agent at {path} did not answer within {within:g} s"
                               ) from None
    except (OSError, RemoteProtocolError) as err:
        raise AgentUnavailable(f"the agent at {path}: {err}") from None
    finally:
        writer.transport.abort()
    if isinstance(reply, dict) and reply.get("v") == VERSION and "ok" in reply:
        return reply["ok"]
    if isinstance(reply, dict) and isinstance(reply.get("error"), str):
        raise ControlError(reply["error"])
    raise AgentUnavailable(f"the agent at {path} sent a malformed reply")
