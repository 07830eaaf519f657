"""The two kinds of MQTT session the agent runs (``mesh.adapters.mqtt.session``): ``PeerLink``
reads a peer's origin topics from the peer's broker, ``OwnClient`` publishes this
node's topics on its own broker and serves the peers' requests."""

from __future__ import annotations

import random
from collections.abc import Callable

from mesh.adapters.mqtt.connection import LinkDown, LinkSettings
from mesh.adapters.mqtt.session import LinkState, MqttSession, OnMessage
from mesh.core.topics import Topics
from mesh.pki import NodeCredentials


def _peer_subscriptions(cluster: str, me: str, peer: str) -> list[tuple[str, int]]:
    topics = Topics(cluster, peer)
    # hello is retained and head is sent every second: a lost one is replaced by the next.
    qos = {topics.manifest: 1, topics.resp(me): 1, topics.hello: 0, topics.head: 0}
    return [(topic, qos[topic]) for topic in topics.for_peer(me)]


# A peer publishes its head every second (``Exchange.head_interval``): a link that hands
# on nothing for this long is reconnected (``MqttSession._hold``).
DEAF_AFTER = 30.0


class PeerLink(MqttSession):
    """The link to one peer's broker: client id = our node id; reads the peer's manifest
    and our responses (QoS 1), its hello and head (QoS 0); writes our requests."""

    def __init__(
        self,
        *,
        creds: NodeCredentials,
        host: str,
        port: int,
        on_message: OnMessage,
        settings: LinkSettings | None = None,
        rng: random.Random | None = None,
        expect_peer: str | None = None,
        on_state: Callable[[LinkState], None] | None = None,
        deaf_after: float = DEAF_AFTER,
    ) -> None:
        identity = creds.identity
        super().__init__(
            creds=creds,
            client_id=identity.node,
            host=host,
            port=port,
            subscriptions=lambda peer: _peer_subscriptions(identity.cluster, identity.node, peer),
            on_message=on_message,
            settings=settings,
            rng=rng,
            expect_peer=expect_peer,
            on_state=on_state,
            deaf_after=deaf_after,
        )

    async def request(self, payload: bytes) -> None:
        """Publish a request (QoS 1) to the peer, on its broker's req/<me> topic."""
        peer = self._peer_id
        if peer is None:
            raise LinkDown(f"link {self.label}: the peer is not known yet")
        await self.publish(Topics(self.creds.identity.cluster, peer).req(self.me), payload)


class OwnClient(MqttSession):
    """The agent's client on its own broker (client id ``<me>/agent``): publishes this
    node's origin topics and receives the peers' requests."""

    def __init__(
        self,
        *,
        creds: NodeCredentials,
        host: str,
        port: int,
        on_request: OnMessage,
        settings: LinkSettings | None = None,
        rng: random.Random | None = None,
    ) -> None:
        identity = creds.identity
        self.topics = Topics(identity.cluster, identity.node)
        super().__init__(
            creds=creds,
            client_id=f"{identity.node}/agent",
            host=host,
            port=port,
            subscriptions=lambda _: [(self.topics.all_requests, 1)],
            on_message=on_request,
            settings=settings,
            rng=rng,
            expect_peer=identity.node,  # our own broker: being "self" is the point
        )

    @property
    def label(self) -> str:
        return "own broker"  # its peer id is our own: say which of our links this is

    async def respond(self, peer: str, payload: bytes) -> None:
        await self.publish(self.topics.resp(peer), payload, qos=1)
