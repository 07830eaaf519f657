"""Requests this node makes of its peers (catch-up, ``mesh verify``) and their replies.

A request goes to our request topic at the peer's broker (``send``); its replies come on
the peer's response topic to us and count only as the answer of the peer that was asked
(issue 13: a certified node answered for another one, matched by a sequential id alone):
request ids are random and unused, and a reply from another peer is refused."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from mesh.core import tree, wire
from mesh.core.manifest import Entry
from mesh.errors import MeshError, RemoteProtocolError

LOG = logging.getLogger("mesh.engine.exchange")

REQUEST_TIMEOUT = 10.0

Send = Callable[[str, bytes], Awaitable[None]]


class RequestFailed(MeshError):
    """A peer did not answer a catch-up request in time."""


@dataclass(frozen=True, slots=True)
class Waiter:
    """An open request: the peer asked, and where its replies go."""

    peer: str
    queue: asyncio.Queue[wire.Message]


class Requests:
    """The open requests of this node, by id."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self._waiters: dict[int, Waiter] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def close(self, rid: int) -> None:
        """Forget request ``rid``: later replies to it are dropped."""
        self._waiters.pop(rid, None)

    def on_reply(self, peer: str, message: wire.Message) -> None:
        """A reply counts only as the answer of the peer that was asked (issue 13: a
        certified node answered for another one, matched by a sequential id alone)."""
        rid = getattr(message, "rid", None)
        waiter = self._waiters.get(rid) if isinstance(rid, int) else None
        if waiter is None:
            return  # late (its request timed out), or a guess: not logged, it may be a flood
        if waiter.peer != peer:
            LOG.warning("refused %s from %s: it answers a request made of %s",
                        type(message).__name__, peer, waiter.peer)
        else:
            waiter.queue.put_nowait(message)

    def open(self, peer: str) -> tuple[int, asyncio.Queue[wire.Message]]:
        """A new request id, unguessable and unused, and the queue of its replies."""
        rid = secrets.randbits(63)
        while rid in self._waiters:
            rid = secrets.randbits(63)
        waiter = Waiter(peer, asyncio.Queue())
        self._waiters[rid] = waiter
        return rid, waiter.queue

    async def ask_one(self, peer: str, build: Callable[[int], wire.Message]) -> wire.Message:
        async for reply in self.ask_chunks(peer, build, chunked=False):
            return reply
        raise RequestFailed(f"no answer from {peer}")

    async def ask_chunks(self, peer: str, build: Callable[[int], wire.Message], *,
                          chunked: bool = True) -> AsyncIterator[wire.Message]:
        rid, queue = self.open(peer)
        try:
            request = build(rid)
            await self.send(peer, wire.encode(request))
            while True:
                try:
                    reply = await asyncio.wait_for(queue.get(), REQUEST_TIMEOUT)
                except TimeoutError:
                    raise RequestFailed(
                        f"{type(request).__name__} to {peer}: no answer in "
                        f"{REQUEST_TIMEOUT:.0f} s") from None
                yield reply
                if not chunked or getattr(reply, "done", True):
                    return
        finally:
            self.close(rid)

    def expect_gone(self, peer: str, rid: int, queue: asyncio.Queue[wire.Message],
                    gone: Callable[[], Awaitable[None]]) -> None:
        """Wait in the background for a "gone" answer to replay request ``rid``: ``gone()``
        then. Nothing else comes as an answer to it (the replay comes as manifests)."""
        async def wait() -> None:
            try:
                reply = await asyncio.wait_for(queue.get(), REQUEST_TIMEOUT)
                if isinstance(reply, wire.ReplayGone):
                    await gone()
            except TimeoutError:
                pass  # the replay came (as manifests), or the head will ask again
            finally:
                self.close(rid)

        task = asyncio.create_task(wait())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def ask_tree(self, peer: str) -> tree.FolderSums:
        sums: tree.FolderSums = {}
        async for chunk in self.ask_chunks(peer, wire.TreeRequest):
            if not isinstance(chunk, wire.TreeReply):
                raise RemoteProtocolError("tree? answered with something else", peer=peer)
            sums.update((f, (acc, n)) for f, acc, n in chunk.folders)
        return sums

    async def ask_listing(self, peer: str, folders: list[str]) -> list[Entry]:
        entries: list[Entry] = []
        for i in range(0, len(folders), wire.MAX_FOLDERS):
            part = tuple(folders[i:i + wire.MAX_FOLDERS])
            async for chunk in self.ask_chunks(peer, partial(wire.ListingRequest, under=part)):
                if not isinstance(chunk, wire.EntriesReply):
                    raise RemoteProtocolError("ls? answered with something else", peer=peer)
                entries.extend(chunk.entries)
        return entries
