"""MQTT topics of wire protocol version 1, and who may use which (DESIGN.md).

Every node's broker carries only that node's topics::

    mesh/v1/<cluster>/<node>/manifest       QoS 1, the node's announcements
    mesh/v1/<cluster>/<node>/hello          retained: node info and index digest
    mesh/v1/<cluster>/<node>/head           QoS 0, every second: liveness and last seq
    mesh/v1/<cluster>/<node>/req/<peer>     a peer's requests (replay, digest, entries)
    mesh/v1/<cluster>/<node>/resp/<peer>    the node's answers to that peer

A node publishes only under its own prefix on its own broker; a peer reads the
origin topics and its own responses, and writes only its own request topic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TOPIC_ROOT = "mesh/v1"
_CLIENT_SUFFIX = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class Topics:
    """The topic names of one node's broker."""

    cluster: str
    node: str

    @property
    def prefix(self) -> str:
        return f"{TOPIC_ROOT}/{self.cluster}/{self.node}/"

    @property
    def manifest(self) -> str:
        return self.prefix + "manifest"

    @property
    def hello(self) -> str:
        return self.prefix + "hello"

    @property
    def head(self) -> str:
        return self.prefix + "head"

    def req(self, peer: str) -> str:
        return f"{self.prefix}req/{peer}"

    def resp(self, peer: str) -> str:
        return f"{self.prefix}resp/{peer}"

    @property
    def all_requests(self) -> str:
        return self.prefix + "req/+"

    def for_peer(self, peer: str) -> list[str]:
        """What ``peer``'s link subscribes to on this node's broker (explicitly:
        a filter like ``.../#`` is refused, see ``TopicPolicy.read_refusal``)."""
        return [self.manifest, self.hello, self.head, self.resp(peer)]



@dataclass(frozen=True)
class TopicPolicy:
    """Who may do what on the broker run by ``owner``, from certificate identities.

    Every method returns ``None`` when allowed, else the reason for the log line.
    """

    cluster: str
    owner: str

    @property
    def prefix(self) -> str:
        return f"{TOPIC_ROOT}/{self.cluster}/{self.owner}/"

    def connect_refusal(
        self, node: str, client_id: str | None, clean: bool, will_topic: str | None
    ) -> str | None:
        if client_id != node and not (
            client_id is not None
            and client_id.startswith(f"{node}/")
            and _CLIENT_SUFFIX.fullmatch(client_id[len(node) + 1 :])
        ):
            return f"client id {client_id!r} is neither {node!r} nor {node + '/<name>'!r}"
        if not clean:
            # A persistent session queues messages for an absent client without bound;
            # the index, not the broker, is the source of truth (DESIGN.md).
            return "a persistent session was asked; only clean sessions are served"
        if will_topic is not None and (why := self.publish_refusal(node, will_topic)):
            # amqtt publishes a will without the PUBLISH ACL: check it here.
            return f"will on {will_topic!r}: {why}"
        return None

    def publish_refusal(self, node: str, topic: str) -> str | None:
        own = f"{self.prefix}req/{node}"
        if node == self.owner:
            return None if self._under_prefix(topic) else f"{self.owner} writes only {self.prefix}#"
        if topic == own or topic.startswith(f"{own}/"):
            return None
        return f"{node} writes only {own}/# on this broker"

    def read_refusal(self, node: str, topic: str) -> str | None:
        """For a topic filter a client subscribes to, or a topic it would receive.

        A filter is judged whole, not only each message it matches: amqtt sends the
        retained messages to a new subscription without asking the ACL (Action.RECEIVE).
        """
        if not self._under_prefix(topic):
            return f"only {self.prefix}... can be read here"
        if node == self.owner:
            return None
        head, _, rest = topic[len(self.prefix) :].partition("/")
        if head in ("#", "+", "req"):
            return "requests are read by the owner only"
        if head == "resp" and rest.partition("/")[0] != node:
            return f"{node} reads only the responses under resp/{node}"
        return None

    def _under_prefix(self, topic: str) -> bool:
        return topic.startswith(self.prefix) and len(topic) > len(self.prefix)


