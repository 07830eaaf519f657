"""The links from one node to its peers' brokers: one ``PeerLink`` per address the peer
watcher finds (``mesh.adapters.mqtt.peers``), and what the node asks of them: which
peers are up, where, since when, and a request to one of them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator

from mesh.adapters.mqtt.connection import LinkDown
from mesh.adapters.mqtt.links import PeerLink
from mesh.adapters.mqtt.peers import PeerWatcher
from mesh.adapters.mqtt.session import LinkState, LinkStatus
from mesh.config.values import PeerSpec
from mesh.engine.ops.control import LinkInfo
from mesh.pki import NodeCredentials

LOG = logging.getLogger("mesh.engine.node")

Endpoint = tuple[str, int]
OnPeerMessage = Callable[[str, str, bytes], Awaitable[None]]


class PeerLinks:
    """``on_message(peer, topic, payload)`` gets what a link reads, once its topic is
    checked to be of the peer the link reached; ``on_change()`` is called whenever a
    link comes, goes or changes state."""

    def __init__(self, creds: NodeCredentials, on_message: OnPeerMessage,
                 on_change: Callable[[], None]) -> None:
        self.creds = creds
        self._on_message = on_message
        self._on_change = on_change
        self.links: dict[Endpoint, tuple[PeerLink, asyncio.Task[None]]] = {}
        self._group: asyncio.TaskGroup | None = None

    async def run(self, peers: tuple[PeerSpec, ...], exclude: set[Endpoint],
                  interval: float) -> None:
        """Keep a link to every address of ``peers`` (re-resolved every ``interval``)."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            watcher = PeerWatcher(peers, exclude=exclude, interval=interval,
                                  on_change=self._changed)
            await watcher.run()
            await asyncio.Event().wait()  # static peers: keep the links running

    def up(self) -> Iterator[tuple[Endpoint, LinkStatus]]:
        """The links that are up, with their status (the peer they reached)."""
        for endpoint, (link, _) in self.links.items():
            status = link.status
            if status.peer_id is not None and status.state is LinkState.UP:
                yield endpoint, status

    def live_peers(self) -> list[str]:
        """The peers whose links are up now."""
        return [status.peer_id for _, status in self.up() if status.peer_id is not None]

    def is_peer(self, node: str) -> bool:
        """Whether ``node`` is a current peer: one of our links reached its broker."""
        return any(link.status.peer_id == node for link, _ in self.links.values())

    def infos(self) -> list[LinkInfo]:
        return [LinkInfo(f"{host}:{port}", link.status.peer_id,
                         link.status.state is LinkState.UP)
                for (host, port), (link, _) in self.links.items()]

    async def request(self, peer: str, payload: bytes) -> None:
        for (host, port), status in self.up():
            if status.peer_id == peer:
                await self.links[(host, port)][0].request(payload)
                return
        raise LinkDown(f"no link up to {peer}")

    async def _from_link(self, link: PeerLink, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        peer = link.status.peer_id
        if len(parts) < 5 or peer is None or parts[3] != peer:
            LOG.warning("refused message on %s from link %s", topic, link.label)
            return
        await self._on_message(peer, topic, payload)

    async def _changed(self, added: frozenset[Endpoint], removed: frozenset[Endpoint]) -> None:
        for endpoint in removed:
            _, task = self.links.pop(endpoint)
            task.cancel()
            LOG.info("peer %s:%d left", *endpoint)
        self._on_change()
        assert self._group is not None
        for host, port in sorted(added):
            holder: list[PeerLink] = []  # the handler needs the link it belongs to

            async def on_message(topic: str, payload: bytes, holder: list[PeerLink] = holder,
                                 ) -> None:
                await self._from_link(holder[0], topic, payload)

            link = PeerLink(creds=self.creds, host=host, port=port, on_message=on_message,
                            on_state=lambda _state: self._on_change())
            holder.append(link)
            task = self._group.create_task(link.run(), name=f"link-{host}:{port}")
            self.links[(host, port)] = (link, task)
            LOG.info("peer %s:%d joined", host, port)
