"""The broker's guard (``mesh.adapters.mqtt.broker``): its limits, and who may connect,
publish, subscribe and retain, by the identity in each client's certificate.

``BrokerLimits`` says what is enforced and how: amqtt 0.12.1 has no packet-size limit, no
keep-alive enforcement, refuses no connection over ``max_connections`` and queues without
bound. The auth and topic plugins are amqtt's hooks into ``Guard``."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from amqtt.adapters import ReaderAdapter
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from mesh.adapters.mqtt import listening
from mesh.adapters.mqtt.frames import FrameMeter
from mesh.core.topics import TopicPolicy
from mesh.errors import ConfigError, PkiError
from mesh.pki import NodeIdentity, identity_from_der

# The broker's logger: every refusal is the broker's, wherever it is decided.
LOG = logging.getLogger("mesh.adapters.mqtt.broker")

_IDENTITY = "meshsync.identity"  # key in amqtt's Session.attributes
_MIB = 1024 * 1024


@dataclass(frozen=True)
class BrokerLimits:
    """Bounds amqtt 0.12.1 lacks; each is enforced by this module.

    A client that breaks one is disconnected with one log line (a slow peer is cut
    off and later caught up by replay, DESIGN.md), and the broker keeps running.
    """

    max_packet_bytes: int = _MIB  # MQTT remaining length, checked before the body is read
    max_connections: int = 64  # refused at accept, before the TLS handshake
    max_inflight: int = 256  # QoS 1/2 messages a subscriber has not acknowledged yet
    max_send_buffer_bytes: int = 8 * _MIB  # bytes queued to a subscriber that does not read
    max_inbound_queue: int = 1024  # messages read from a client and not yet routed
    max_subscriptions: int = 32  # topic filters per client
    max_retained: int = 1024  # retained topics, across the broker
    max_keepalive: int = 300  # seconds; a client asking 0 (none) or more gets this
    handshake_timeout: float = 10.0  # seconds for the TLS handshake
    connect_timeout: float = 10.0  # seconds from handshake to a complete CONNECT
    shutdown_timeout: float = 5.0  # seconds for amqtt to close its sessions on stop

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ConfigError(f"broker limit {name} must be positive, not {value}")


class ClientConnection:
    """One accepted client, from its TLS handshake to its close."""

    def __init__(
        self, peer: str, writer: asyncio.StreamWriter, identity: NodeIdentity, limits: BrokerLimits
    ) -> None:
        self.peer = peer
        self.identity = identity
        self.writer = writer
        self.session: Session | None = None
        self.closed = False
        self._idle_limit = limits.connect_timeout
        self.clock = listening.of()  # silence counts only while we could listen
        self.last_rx = self.clock.free()

    def bind(self, session: Session, max_keepalive: int) -> None:
        self.session = session
        keepalive = session.keep_alive if 0 < session.keep_alive <= max_keepalive else max_keepalive
        # MQTT-3.1.2-24: the server disconnects a client silent for 1.5 keep-alive periods;
        # amqtt 0.12.1 times the read out and then carries on waiting.
        self._idle_limit = 1.5 * keepalive

    def heard(self) -> None:
        self.last_rx = self.clock.free()

    def idle_left(self) -> float:
        """Seconds of listening left before the client has been silent too long."""
        return self.last_rx + self._idle_limit - self.clock.free()

    def idle_limit(self) -> float:
        return self._idle_limit

    def send_backlog(self) -> int:
        return int(self.writer.transport.get_write_buffer_size())

    def cut(self, reason: str) -> None:
        """Drop the connection now: abort, so no drain waits on a peer that does not read."""
        if not self.closed:
            self.closed = True
            LOG.warning("cut %s [%s]: %s", self.peer, self.identity.node, reason)
            self.writer.transport.abort()


class GuardedReader(ReaderAdapter):  # type: ignore[misc]
    """What amqtt reads from one client: the CONNECT we already checked, then the stream,
    under the packet-size cap, the idle deadline and the inbound-queue bound.

    A broken limit cuts the connection and reads as end of stream, which amqtt handles
    as a lost connection (no exception of ours crosses its reader loop).
    """

    def __init__(
        self, conn: ClientConnection, reader: asyncio.StreamReader, connect: bytes,
        limits: BrokerLimits,
    ) -> None:
        self._conn = conn
        self._reader = reader
        self._buffer = connect
        self._limits = limits
        self._meter = FrameMeter()

    async def read(self, n: int = -1) -> bytes:
        if self._buffer:
            cut = len(self._buffer) if n < 0 else n
            data, self._buffer = self._buffer[:cut], self._buffer[cut:]
            return data
        if self._conn.closed or self._inbound_full():
            return b""
        # Until the client has been silent too long in our listening time: a timeout that
        # a stall of ours made come early only starts another wait. What was read stays
        # in the stream's buffer when a wait ends (readexactly takes nothing until all
        # of it is there).
        while (left := self._conn.idle_left()) > 0:
            try:
                async with asyncio.timeout(left):
                    data = await (
                        self._reader.readexactly(n)
                        if n >= 0
                        # amqtt never reads to EOF; if it did, not without bound
                        else self._reader.read(self._limits.max_packet_bytes)
                    )
                break
            except TimeoutError:
                continue
        else:
            self._conn.cut(f"silent for {self._conn.idle_limit():g} s (MQTT-3.1.2-24)")
            return b""
        self._conn.heard()
        length = self._meter.feed(data)
        if self._meter.reserved is not None:
            self._conn.cut(f"reserved packet type {self._meter.reserved} (MQTT-2.2.1)")
            return b""
        if length is not None and length > self._limits.max_packet_bytes:
            limit = self._limits.max_packet_bytes
            self._conn.cut(f"packet of {length} bytes is over the {limit}-byte limit")
            return b""
        return data

    def feed_eof(self) -> None:
        self._reader.feed_eof()

    def _inbound_full(self) -> bool:
        session = self._conn.session
        if not self._meter.at_packet_start or session is None:
            return False
        queued = session.delivered_message_queue.qsize()
        if queued < self._limits.max_inbound_queue:
            return False
        self._conn.cut(f"{queued} messages read and not yet routed")
        return True


class Guard:
    """The policy, the limits and the live connections, as the amqtt plugins see them."""

    def __init__(self, policy: TopicPolicy, limits: BrokerLimits) -> None:
        self.policy = policy
        self.limits = limits
        self.connections: dict[tuple[str, int], ClientConnection] = {}

    def authenticate(self, session: Session) -> bool:
        peer = peer_of(session)
        der = session.ssl_object.getpeercert(binary_form=True) if session.ssl_object else None
        if not der:
            return refuse(peer, None, "no client certificate")
        try:
            identity = identity_from_der(der, self.policy.cluster)
        except PkiError as err:
            return refuse(peer, None, str(err))
        conn = self.connections.get((session.remote_address, session.remote_port))
        if conn is None or conn.identity != identity:
            return refuse(peer, identity, "the session does not match its TLS connection")
        will = session.will_topic if session.will_flag else None
        why = self.policy.connect_refusal(
            identity.node, session.client_id, bool(session.clean_session), will
        )
        if why is not None:
            return refuse(peer, identity, why)
        session.attributes[_IDENTITY] = identity
        conn.bind(session, self.limits.max_keepalive)
        return True

    def allow(
        self, session: Session | None, topic: str | None, action: Action, filters: int
    ) -> bool:
        if session is None or topic is None:
            return refuse("?", None, f"{action} {topic!r}: no session")
        identity = session.attributes.get(_IDENTITY)
        if not isinstance(identity, NodeIdentity):
            return refuse(peer_of(session), None, f"{action} {topic!r}: not authenticated")
        node = identity.node
        if action == Action.PUBLISH:
            why = self.policy.publish_refusal(node, topic)
        else:
            why = self.policy.read_refusal(node, topic)
            if why is None and action == Action.RECEIVE:
                return self._keeps_up(session)
            if why is None and filters >= self.limits.max_subscriptions:
                why = f"already {filters} subscriptions, the limit"
        if why is not None:
            return refuse(peer_of(session), identity, f"{action} {topic!r}: {why}")
        return True

    def allow_retain(self, session: Session, topic: str, retained: dict[str, Any]) -> bool:
        identity = session.attributes.get(_IDENTITY)
        peer = peer_of(session)
        if not isinstance(identity, NodeIdentity) or identity.node != self.policy.owner:
            return refuse(peer, identity, f"retain {topic!r}: only {self.policy.owner} retains")
        if topic not in retained and len(retained) >= self.limits.max_retained:
            return refuse(peer, identity, f"retain {topic!r}: {len(retained)} retained, the limit")
        return True

    def _keeps_up(self, session: Session) -> bool:
        """A subscriber that does not read or acknowledge is cut off before amqtt queues it a
        task per message (DESIGN.md: a stalled subscriber grew the broker to 500 MB)."""
        conn = self.connections.get((session.remote_address, session.remote_port))
        if conn is None or conn.closed:
            return False
        unacked, backlog = len(session.inflight_out), conn.send_backlog()
        if unacked >= self.limits.max_inflight:
            conn.cut(f"stalled subscriber: {unacked} messages unacknowledged")
        elif backlog >= self.limits.max_send_buffer_bytes:
            conn.cut(f"stalled subscriber: {backlog} bytes unsent")
        return not conn.closed


def peer_of(session: Session) -> str:
    return f"{session.remote_address}:{session.remote_port}"


def refuse(peer: str, identity: NodeIdentity | None, reason: str) -> bool:
    """The one log line of every refusal: who, as whom, and why. Returns False."""
    LOG.warning("refused %s [%s]: %s", peer, identity.node if identity else "no identity", reason)
    return False


class MeshAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """Identity from the verified client certificate; the client id must belong to it."""

    @dataclass
    class Config:
        guard: Guard

    async def authenticate(self, *, session: Session) -> bool:
        return bool(self.config.guard.authenticate(session))


class MeshTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """The topic ACL, keyed on the identity the auth plugin bound to the session."""

    @dataclass
    class Config:
        guard: Guard

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        guard: Guard = self.config.guard
        filters = 0
        if action == Action.SUBSCRIBE and session is not None:
            filters = sum(
                any(s.client_id == session.client_id for s, _ in subscribers)
                for subscribers in self.context.subscriptions.values()
            )
        return guard.allow(session, topic, action or Action.RECEIVE, filters)
