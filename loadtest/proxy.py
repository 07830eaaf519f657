"""Per-link TCP proxies the harness owns, in a process of their own.

Node i reaches node j only through the proxy of the link (i, j), as in
tests/cluster.py, so the harness can cut links (a partition) and count the
bytes every link carried, for meshsync and the baseline alike. A process of
its own keeps the forwarding off the harness's interpreter.

Requests are JSON lines on stdin, answered on stdout with the same ``id``:
``add`` (key, listen [host, port], target [host, port]), ``mode`` (key, "open"
or "refuse": refuse resets the link's connections and refuses new ones),
``stats`` (bytes forwarded per key, both directions, since the last ``reset``),
``reset``, ``until`` (key, more, within: answers once the link has forwarded
``more`` bytes beyond its count when asked, or after ``within`` s, with
``reached`` and ``bytes``; how the harness times a kill while a push is under
way). Requests are handled concurrently: a waiting ``until`` holds up nothing.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import uvloop

CHUNK = 1 << 16


class Link:
    """All proxies of one ordered pair of nodes (one per port)."""

    def __init__(self) -> None:
        self.refusing = False
        self.bytes = 0
        self.servers: list[asyncio.Server] = []
        self.conns: set[asyncio.StreamWriter] = set()
        self.waiters: list[tuple[int, asyncio.Future[None]]] = []

    async def until(self, more: int, within: float) -> tuple[bool, int]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self.bytes + more, fut)
        self.waiters.append(entry)
        try:
            await asyncio.wait_for(fut, within)
            return True, self.bytes
        except TimeoutError:
            return False, self.bytes
        finally:
            if entry in self.waiters:
                self.waiters.remove(entry)

    def _count(self, n: int) -> None:
        self.bytes += n
        for goal, fut in self.waiters:
            if self.bytes >= goal and not fut.done():
                fut.set_result(None)

    def refuse(self, on: bool) -> None:
        self.refusing = on
        if on:
            for w in list(self.conns):
                w.transport.abort()
            self.conns.clear()

    async def serve(self, target: tuple[str, int], reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection(*target)
        except OSError:
            writer.transport.abort()
            return
        self.conns |= {writer, up_w}
        await asyncio.gather(self._pipe(reader, up_w, writer), self._pipe(up_r, writer, up_w),
                             return_exceptions=True)
        for w in (writer, up_w):
            self.conns.discard(w)
            w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    source: asyncio.StreamWriter) -> None:
        """One direction. Its end goes on as the kernel would pass it on without a
        proxy: an end of stream (FIN) as an end of stream — a process that exits or
        is killed closes its sockets, and its peer must see it, or a push to a
        killed node waits forever — and a reset as a reset of both ends."""
        try:
            while data := await reader.read(CHUNK):
                if self.refusing:
                    return
                self._count(len(data))
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            for w in (writer, source):
                w.transport.abort()
            return
        if not self.refusing and writer.can_write_eof() and not writer.is_closing():
            try:
                writer.write_eof()
            except (ConnectionError, OSError, RuntimeError):
                source.transport.abort()


class Proxies:
    def __init__(self) -> None:
        self.links: dict[str, Link] = {}

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        if op == "add":
            link = self.links.setdefault(req["key"], Link())
            target = (req["target"][0], int(req["target"][1]))
            server = await asyncio.start_server(
                lambda r, w: link.serve(target, r, w), req["listen"][0], int(req["listen"][1]),
                reuse_address=True)
            link.servers.append(server)
            return {"ok": True}
        if op == "mode":
            self.links[req["key"]].refuse(req["mode"] == "refuse")
            return {"ok": True}
        if op == "stats":
            return {"bytes": {k: link.bytes for k, link in self.links.items()}}
        if op == "until":
            reached, count = await self.links[req["key"]].until(int(req["more"]),
                                                                float(req["within"]))
            return {"ok": True, "reached": reached, "bytes": count}
        if op == "reset":
            for link in self.links.values():
                link.bytes = 0
            return {"ok": True}
        raise ValueError(f"unknown op {op!r}")


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    proxies = Proxies()
    tasks: set[asyncio.Task[None]] = set()

    async def answer(req: dict[str, Any]) -> None:
        try:
            out = await proxies.handle(req)
        except (OSError, KeyError, ValueError) as err:
            out = {"ok": False, "error": f"{req.get('op')} {req.get('key')}: {err}"}
        sys.stdout.write(json.dumps({"id": req["id"], **out}) + "\n")
        sys.stdout.flush()

    while line := await reader.readline():
        task = asyncio.create_task(answer(json.loads(line)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


if __name__ == "__main__":
    uvloop.run(main())
