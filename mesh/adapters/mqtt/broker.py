"""The MQTT broker one node runs: amqtt 0.12.1 behind mutual TLS, an ACL keyed on the
certificate's identity, and hard limits.

Where amqtt 0.12.1 falls short and what this module does instead (DESIGN.md, "amqtt 0.12"):

- TLS. amqtt's listener sets ``CERT_OPTIONAL``, and a failed handshake is logged
  nowhere. We accept sockets ourselves, run the handshake with
  ``mesh.pki.server_ssl_context`` (``CERT_REQUIRED``), log every refusal with the peer's
  address, and hand the stream to an amqtt ``external`` listener
  (``Broker.external_connected``). Nothing is read in plain text.
- CONNECT. amqtt deletes the session of a clean-session client id *before* it asks the
  auth plugins, so a client claiming another node's id would wipe that node's session
  and then be refused. We read and check the CONNECT first; amqtt only sees clients we
  accepted. Our auth plugin then checks again from the session amqtt built (its
  ``ssl_object``) and binds the certificate's identity to the session.
- Client ids. A node's main client uses its node id; any other client of the same node
  (the CLI, tests) uses ``<node>/<name>``, so it never takes over the main session.
- ACL. amqtt's ACL is keyed on the username a client sends; ours on the certificate.
- Limits. amqtt 0.12.1 has no packet-size limit, no keep-alive enforcement, refuses no
  connection over ``max_connections`` (it blocks on a semaphore) and queues without
  bound. See ``BrokerLimits`` for what is enforced here and how.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from amqtt.adapters import BufferReader, ReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, BrokerConfig, ListenerConfig, ListenerType
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError, PluginError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.connect import ConnectPacket
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from mesh.adapters.mqtt.frames import FrameMeter
from mesh.adapters.tls_server import accept_forever, bind, open_tls
from mesh.core.topics import TopicPolicy
from mesh.errors import ConfigError, LocalProtocolError, PkiError
from mesh.pki import NodeCredentials, NodeIdentity, identity_from_der, server_ssl_context

LOG = logging.getLogger(__name__)

_LISTENER = "default"
_IDENTITY = "meshsync.identity"  # key in amqtt's Session.attributes
_CONNECT = 0x01  # MQTT 3.1.1 packet type of CONNECT
_MIB = 1024 * 1024


# --- configuration -------------------------------------------------------------------------


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


@dataclass(frozen=True)
class BrokerSettings:
    """What one node's broker needs: its own credentials (the owner is their node) and
    where to listen."""

    credentials: NodeCredentials
    host: str = "0.0.0.0"  # noqa: S104 - the broker serves the cluster's overlay network
    port: int = 8883
    limits: BrokerLimits = field(default_factory=BrokerLimits)
    amqtt_log_level: int = logging.WARNING  # for the "amqtt" and "transitions" loggers

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("broker listen host is empty")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"broker listen port {self.port} is not in 0..65535")


# --- one connection --------------------------------------------------------------------------


class _Connection:
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
        self.last_rx = asyncio.get_running_loop().time()

    def bind(self, session: Session, max_keepalive: int) -> None:
        self.session = session
        keepalive = session.keep_alive if 0 < session.keep_alive <= max_keepalive else max_keepalive
        # MQTT-3.1.2-24: the server disconnects a client silent for 1.5 keep-alive periods;
        # amqtt 0.12.1 times the read out and then carries on waiting.
        self._idle_limit = 1.5 * keepalive

    def idle_deadline(self) -> float:
        return self.last_rx + self._idle_limit

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


class _GuardedReader(ReaderAdapter):  # type: ignore[misc]
    """What amqtt reads from one client: the CONNECT we already checked, then the stream,
    under the packet-size cap, the idle deadline and the inbound-queue bound.

    A broken limit cuts the connection and reads as end of stream, which amqtt handles
    as a lost connection (no exception of ours crosses its reader loop).
    """

    def __init__(
        self, conn: _Connection, reader: asyncio.StreamReader, connect: bytes, limits: BrokerLimits
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
        try:
            async with asyncio.timeout_at(self._conn.idle_deadline()):
                data = await (
                    self._reader.readexactly(n)
                    if n >= 0
                    # amqtt never reads to EOF; if it did, not without bound
                    else self._reader.read(self._limits.max_packet_bytes)
                )
        except TimeoutError:
            self._conn.cut(f"silent for {self._conn.idle_limit():g} s (MQTT-3.1.2-24)")
            return b""
        self._conn.last_rx = asyncio.get_running_loop().time()
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


# --- the guard the plugins and the listener share ------------------------------------------


class _Guard:
    """The policy, the limits and the live connections, as the amqtt plugins see them."""

    def __init__(self, policy: TopicPolicy, limits: BrokerLimits) -> None:
        self.policy = policy
        self.limits = limits
        self.connections: dict[tuple[str, int], _Connection] = {}

    def authenticate(self, session: Session) -> bool:
        peer = _peer_of(session)
        der = session.ssl_object.getpeercert(binary_form=True) if session.ssl_object else None
        if not der:
            return _refuse(peer, None, "no client certificate")
        try:
            identity = identity_from_der(der, self.policy.cluster)
        except PkiError as err:
            return _refuse(peer, None, str(err))
        conn = self.connections.get((session.remote_address, session.remote_port))
        if conn is None or conn.identity != identity:
            return _refuse(peer, identity, "the session does not match its TLS connection")
        will = session.will_topic if session.will_flag else None
        why = self.policy.connect_refusal(
            identity.node, session.client_id, bool(session.clean_session), will
        )
        if why is not None:
            return _refuse(peer, identity, why)
        session.attributes[_IDENTITY] = identity
        conn.bind(session, self.limits.max_keepalive)
        return True

    def allow(
        self, session: Session | None, topic: str | None, action: Action, filters: int
    ) -> bool:
        if session is None or topic is None:
            return _refuse("?", None, f"{action} {topic!r}: no session")
        identity = session.attributes.get(_IDENTITY)
        if not isinstance(identity, NodeIdentity):
            return _refuse(_peer_of(session), None, f"{action} {topic!r}: not authenticated")
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
            return _refuse(_peer_of(session), identity, f"{action} {topic!r}: {why}")
        return True

    def allow_retain(self, session: Session, topic: str, retained: dict[str, Any]) -> bool:
        identity = session.attributes.get(_IDENTITY)
        peer = _peer_of(session)
        if not isinstance(identity, NodeIdentity) or identity.node != self.policy.owner:
            return _refuse(peer, identity, f"retain {topic!r}: only {self.policy.owner} retains")
        if topic not in retained and len(retained) >= self.limits.max_retained:
            return _refuse(peer, identity, f"retain {topic!r}: {len(retained)} retained, the limit")
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


def _peer_of(session: Session) -> str:
    return f"{session.remote_address}:{session.remote_port}"


def _refuse(peer: str, identity: NodeIdentity | None, reason: str) -> bool:
    """The one log line of every refusal: who, as whom, and why. Returns False."""
    LOG.warning("refused %s [%s]: %s", peer, identity.node if identity else "no identity", reason)
    return False


# --- amqtt plugins -------------------------------------------------------------------------


class MeshAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """Identity from the verified client certificate; the client id must belong to it."""

    @dataclass
    class Config:
        guard: _Guard

    async def authenticate(self, *, session: Session) -> bool:
        return bool(self.config.guard.authenticate(session))


class MeshTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """The topic ACL, keyed on the identity the auth plugin bound to the session."""

    @dataclass
    class Config:
        guard: _Guard

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        guard: _Guard = self.config.guard
        filters = 0
        if action == Action.SUBSCRIBE and session is not None:
            filters = sum(
                any(s.client_id == session.client_id for s, _ in subscribers)
                for subscribers in self.context.subscriptions.values()
            )
        return guard.allow(session, topic, action or Action.RECEIVE, filters)


class _Subscribers(list[tuple[Session, int]]):
    """One filter's subscribers; iterating walks a copy (see ``_Subscriptions``)."""

    def __iter__(self) -> Iterator[tuple[Session, int]]:
        return iter(list.copy(self))


class _Subscriptions(dict[str, list[tuple[Session, int]]]):
    """amqtt's ``Broker._subscriptions`` (filter -> subscribers), iterated over copies.

    ``Broker._run_broadcast`` 0.12.1 iterates this dict and each list of subscribers
    across an ``await`` (the topic ACL): a client subscribing or leaving meanwhile raised
    ``RuntimeError: dictionary changed size during iteration`` (issue 13, under a flood
    of forged entries), and the broadcast was lost for the subscribers not yet reached.
    Walking copies is what the loop needs: a subscriber that left is skipped by its
    "connected" check, one that joined gets the next message. amqtt is wrapped, not
    forked: it keeps reading and writing this object as the plain dict it made."""

    def __init__(self, items: dict[str, list[tuple[Session, int]]]) -> None:
        super().__init__({k: _Subscribers(v) for k, v in items.items()})

    def __setitem__(self, key: str, value: list[tuple[Session, int]]) -> None:
        super().__setitem__(key, value if isinstance(value, _Subscribers) else _Subscribers(value))

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().keys()))

    def items(self) -> list[tuple[str, list[tuple[Session, int]]]]:  # type: ignore[override]
        return list(super().items())

    def values(self) -> list[list[tuple[Session, int]]]:  # type: ignore[override]
        return list(super().values())


class _MeshBroker(Broker):  # type: ignore[misc]
    """amqtt's broker with retained messages restricted to the owner and bounded, and
    its subscriptions iterated safely (``_Subscriptions``)."""

    def __init__(self, config: BrokerConfig, guard: _Guard) -> None:
        super().__init__(config)
        self._guard = guard
        self._subscriptions = _Subscriptions(self.subscriptions)

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        # Also reached by a client's will, which bypasses the PUBLISH ACL in amqtt.
        if (
            source_session is not None
            and topic_name is not None
            and not self._guard.allow_retain(source_session, topic_name, self.retained_messages)
        ):
            return
        await super().retain_message(source_session, topic_name, data, qos)


# --- the broker ------------------------------------------------------------------------------


class EmbeddedBroker:
    """One node's broker. ``start()`` binds and serves, ``stop()`` closes everything.

    Raises ``ConfigError`` (address in use, bad settings) or ``PkiError`` (credentials)
    from ``start()``, each with one line for the operator.
    """

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        identity = settings.credentials.identity
        self.policy = TopicPolicy(identity.cluster, identity.node)
        self._guard = _Guard(self.policy, settings.limits)
        self._broker: _MeshBroker | None = None
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        """The address actually bound (port 0 in the settings picks a free port)."""
        if self._socket is None:
            raise LocalProtocolError("the broker is not running")
        host, port = self._socket.getsockname()[:2]
        return str(host), int(port)

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._socket is not None:
            raise LocalProtocolError("the broker is already running")
        _quiet_amqtt(self.settings.amqtt_log_level)
        tls = server_ssl_context(self.settings.credentials)
        sock = bind(self.settings.host, self.settings.port)
        try:
            self._broker = _MeshBroker(self._amqtt_config(), self._guard)
            await self._broker.start()
        except (BrokerError, PluginError, AMQTTError) as err:
            sock.close()
            raise ConfigError(f"start the MQTT broker: {err}") from err
        self._socket = sock
        self._accepting = asyncio.create_task(accept_forever(
            sock, f"broker of {self.policy.owner}", functools.partial(self._accepted, tls=tls)))
        LOG.info("broker of %s listening on %s:%d", self.policy.owner, *self.address)

    async def stop(self) -> None:
        if self._socket is None:
            return
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        self._socket.close()
        self._socket = None
        if self._broker is not None:
            # amqtt closes each session with a drain, which waits forever on a client that
            # does not read: past the timeout, abort the connections to release it.
            shutdown = asyncio.create_task(self._broker.shutdown())
            done, _ = await asyncio.wait({shutdown}, timeout=self.settings.limits.shutdown_timeout)
            if not done:
                LOG.warning("broker sessions did not close in time; aborting the connections")
                self._abort_all()
            await shutdown
            self._broker = None
        self._abort_all()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _abort_all(self) -> None:
        for conn in list(self._guard.connections.values()):
            conn.writer.transport.abort()

    def _amqtt_config(self) -> BrokerConfig:
        host, port = self.settings.host, self.settings.port
        plugin = {"guard": self._guard}
        return BrokerConfig(
            # "external": amqtt opens no socket; _serve hands it each checked connection.
            listeners={
                _LISTENER: ListenerConfig(type=ListenerType.EXTERNAL, bind=f"{host}:{port}")
            },
            plugins={
                f"{__name__}.{MeshAuthPlugin.__name__}": plugin,
                f"{__name__}.{MeshTopicPlugin.__name__}": plugin,
            },
            timeout_disconnect_delay=0,
        )

    def _accepted(self, client: socket.socket, addr: tuple[str, int], tls: ssl.SSLContext
                  ) -> None:
        if len(self._tasks) >= self.settings.limits.max_connections:
            client.close()
            _refuse(f"{addr[0]}:{addr[1]}", None,
                    f"{len(self._tasks)} connections open, the limit")
            return
        # Our listening socket is not from getaddrinfo (proto 0), so asyncio's transport
        # leaves Nagle on (uvloop does not): each manifest to a subscriber then waited
        # for the ACK of the previous one, up to the 40 ms delayed-ACK timer (bench:
        # amqtt p99 47 ms on asyncio, 19 ms on uvloop).
        with contextlib.suppress(OSError):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.create_task(self._serve(client, addr, tls))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(
        self, client: socket.socket, addr: tuple[str, int], tls: ssl.SSLContext
    ) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        opened = await open_tls(client, tls, self.settings.limits.handshake_timeout)
        if isinstance(opened, str):
            _refuse(peer, None, opened)
            return
        reader, writer = opened
        try:
            identity = self._identity(peer, writer)
            if identity is None:
                return
            conn = _Connection(peer, writer, identity, self.settings.limits)
            connect = await self._checked_connect(conn, reader)
            if connect is None or self._broker is None:
                return
            self._guard.connections[addr] = conn
            await self._broker.external_connected(
                _GuardedReader(conn, reader, connect, self.settings.limits),
                StreamWriterAdapter(writer),
                _LISTENER,
            )
        except (OSError, AMQTTError, BrokerError, MQTTError, NoDataError) as err:
            # amqtt lets a connection's I/O and protocol errors out of external_connected.
            LOG.debug("connection %s ended: %r", peer, err)
        finally:
            self._guard.connections.pop(addr, None)
            writer.transport.abort()

    def _identity(self, peer: str, writer: asyncio.StreamWriter) -> NodeIdentity | None:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        try:
            if not der:
                raise PkiError("no client certificate")
            return identity_from_der(der, self.policy.cluster)
        except PkiError as err:
            _refuse(peer, None, str(err))
            return None

    async def _checked_connect(
        self, conn: _Connection, reader: asyncio.StreamReader
    ) -> bytes | None:
        """Read the first packet and judge it before amqtt touches any session."""
        limits = self.settings.limits
        raw, why = None, None
        try:
            async with asyncio.timeout(limits.connect_timeout):
                raw = await _read_packet(reader, limits.max_packet_bytes)
            conn.last_rx = asyncio.get_running_loop().time()
        except TimeoutError:
            why = f"no CONNECT within {limits.connect_timeout:g} s"
        except _TooLarge as err:
            why = str(err)
        if raw is None:
            if why is not None:
                _refuse(conn.peer, conn.identity, why)
            return None
        why = await self._connect_refusal(conn.identity, raw)
        if why is None:
            return raw
        _refuse(conn.peer, conn.identity, why)
        conn.writer.write(ConnackPacket.build(0, NOT_AUTHORIZED).to_bytes())
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(conn.writer.drain(), limits.connect_timeout)
        return None

    async def _connect_refusal(self, identity: NodeIdentity, raw: bytes) -> str | None:
        if raw[0] >> 4 != _CONNECT:
            return "the first packet is not a CONNECT"
        try:
            connect = await ConnectPacket.from_stream(BufferReader(raw))
            will = connect.will_topic if connect.will_flag else None
            client_id, clean = connect.client_id, connect.clean_session_flag
        except Exception as err:  # amqtt's decoder raises many kinds
            return f"malformed CONNECT: {err!r}"
        return self.policy.connect_refusal(identity.node, client_id, clean, will)


class _TooLarge(Exception):
    pass


async def _read_packet(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    """One whole MQTT packet, or None at end of stream."""
    meter, raw = FrameMeter(), bytearray()
    try:
        length = None
        while length is None:
            byte = await reader.readexactly(1)
            raw += byte
            length = meter.feed(byte)
        if length > limit:
            raise _TooLarge(f"packet of {length} bytes is over the {limit}-byte limit")
        raw += await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return bytes(raw)


def _quiet_amqtt(level: int) -> None:
    """amqtt logs every connection at INFO and refusals we already log at WARNING or
    below; a logger the operator configured keeps its level."""
    for name in ("amqtt", "transitions"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)
