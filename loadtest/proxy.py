"""Per-link TCP proxies the harness owns, in a process of their own.

Node i reaches node j only through the proxy of the link (i, j), as in
tests/cluster.py, so the harness can cut links (a partition) and count the
bytes every link carried, for meshsync and the baseline alike. A process of
its own keeps the forwarding off the harness's interpreter.

Requests are JSON lines on stdin, answered on stdout with the same ``id``:
``add`` (key, listen [host, port], target [host, port]), ``mode`` (key, "open"
or "refuse": refuse resets the link's connections and refuses new ones),
``stats`` (bytes forwarded per key, both directions, since the last ``reset``),
``reset``.
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
        await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer),
                             return_exceptions=True)
        for w in (writer, up_w):
            self.conns.discard(w)
            w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(CHUNK):
            if self.refusing:
                return
            self.bytes += len(data)
            writer.write(data)
            await writer.drain()


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
    while line := await reader.readline():
        req = json.loads(line)
        try:
            answer = await proxies.handle(req)
        except (OSError, KeyError, ValueError) as err:
            answer = {"ok": False, "error": f"{req.get('op')} {req.get('key')}: {err}"}
        sys.stdout.write(json.dumps({"id": req["id"], **answer}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    uvloop.run(main())
