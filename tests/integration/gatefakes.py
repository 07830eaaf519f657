"""A fake of the agent's side of lsyncd's gate for the gate's and lsyncd's tests: it
records each batch and pushes what it chooses through the real executor."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable
from pathlib import Path

from mesh.adapters.rsync_push import PushOrder, push
from mesh.tls import NodeCredentials


class PushingCarrier:
    """A ``Carrier`` (``mesh.adapters.lsyncd.gate``) that pushes ``choose(peer, paths)``
    of each batch from ``source`` to the tunnel of each peer in ``tunnels``; with
    ``hold`` set, a batch waits for it first."""

    def __init__(
        self,
        source: Path,
        creds: NodeCredentials,
        tunnels: dict[str, tuple[str, int]],
        choose: Callable[[str, list[str]], list[str]] = lambda peer, paths: paths,
    ) -> None:
        self.source = source
        self.creds = creds
        self.tunnels = tunnels
        self.choose = choose
        self.hold: asyncio.Event | None = None
        self.calls: list[tuple[str, list[str]]] = []
        self.codes: list[int] = []
        self._ids = itertools.count(1)

    async def carry(self, peer: str, paths: list[str]) -> None:
        self.calls.append((peer, paths))
        if self.hold is not None:
            await self.hold.wait()
        chosen = self.choose(peer, paths)
        if not chosen:
            return
        host, port = self.tunnels.get(peer, ("127.0.0.1", 9))
        n = next(self._ids)
        order = PushOrder(peer, host, port, f"p{n}-{uuid.uuid4().hex[:8]}", tuple(chosen),
                          f"push {n} of {chosen}".encode())
        self.codes.append(await push(order, self.source, self.creds))
