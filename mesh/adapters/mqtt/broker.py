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
  bound. See ``BrokerLimits`` (``mesh.adapters.mqtt.guard``) for what is enforced and how.
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

from amqtt.adapters import BufferReader, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import BrokerConfig, ListenerConfig, ListenerType
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError, PluginError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.connect import ConnectPacket
from amqtt.session import Session

from mesh.adapters.mqtt.frames import FrameMeter
from mesh.adapters.mqtt.guard import (
    BrokerLimits,
    ClientConnection,
    Guard,
    GuardedReader,
    MeshAuthPlugin,
    MeshTopicPlugin,
    refuse,
)
from mesh.adapters.tls_server import Listener, accept_forever, bind, open_tls
from mesh.core.topics import TopicPolicy
from mesh.errors import ConfigError, LocalProtocolError, PkiError
from mesh.pki import NodeCredentials, NodeIdentity, identity_from_der, server_ssl_context

LOG = logging.getLogger(__name__)

_LISTENER = "default"
_CONNECT = 0x01  # MQTT 3.1.1 packet type of CONNECT
SUBSCRIBE_REFUSED = 0x80  # a SUBACK's failure code (MQTT 3.1.1 section 3.9.3)


# --- configuration -------------------------------------------------------------------------


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
    """amqtt's broker with retained messages restricted to the owner and bounded, its
    subscriptions iterated safely (``_Subscriptions``), and held by a client id's current
    session only (``add_subscription``)."""

    def __init__(self, config: BrokerConfig, guard: Guard) -> None:
        super().__init__(config)
        self._guard = guard
        self._subscriptions = _Subscriptions(self.subscriptions)

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """amqtt 0.12.1 adds a subscription only when no session of the same client id
        holds one on that filter. A client that gave up on a connection (its SUBACK
        late) and made another left the old session's late subscriptions behind, and the
        new session's were skipped there though acknowledged: among ten nodes, a peer's
        replies to us never came, and we never caught up with it (issue 16). Here the
        client id's current session holds its subscription, and no other of its
        sessions holds one; a session taken over subscribes to nothing."""
        granted = int(await super().add_subscription(subscription, session))
        subscribers = self.subscriptions.get(subscription[0])
        if granted == SUBSCRIBE_REFUSED or subscribers is None:
            return granted
        current = self.sessions.get(session.client_id)
        now = None if current is None else current[0]
        kept = [(s, qos) for s, qos in subscribers
                if s.client_id != session.client_id or s is now]
        if session is now and all(s is not session for s, _ in kept):
            kept.append((session, granted))
        subscribers[:] = kept  # no await since amqtt's own check: nothing came between
        return granted if session is now else SUBSCRIBE_REFUSED

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


class EmbeddedBroker(Listener):
    """One node's broker. ``start()`` binds and serves, ``stop()`` closes everything.

    Raises ``ConfigError`` (address in use, bad settings) or ``PkiError`` (credentials)
    from ``start()``, each with one line for the operator.
    """

    what = "broker"

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        identity = settings.credentials.identity
        self.policy = TopicPolicy(identity.cluster, identity.node)
        self._guard = Guard(self.policy, settings.limits)
        self._broker: _MeshBroker | None = None
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

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
        if not await self.close_listener():
            return
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
            refuse(f"{addr[0]}:{addr[1]}", None,
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
            refuse(peer, None, opened)
            return
        reader, writer = opened
        try:
            identity = self._identity(peer, writer)
            if identity is None:
                return
            conn = ClientConnection(peer, writer, identity, self.settings.limits)
            connect = await self._checked_connect(conn, reader)
            if connect is None or self._broker is None:
                return
            self._guard.connections[addr] = conn
            await self._broker.external_connected(
                GuardedReader(conn, reader, connect, self.settings.limits),
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
            refuse(peer, None, str(err))
            return None

    async def _checked_connect(
        self, conn: ClientConnection, reader: asyncio.StreamReader
    ) -> bytes | None:
        """Read the first packet and judge it before amqtt touches any session."""
        limits = self.settings.limits
        raw, why = None, None
        try:
            async with asyncio.timeout(limits.connect_timeout):
                raw = await _read_packet(reader, limits.max_packet_bytes)
            conn.heard()
        except TimeoutError:
            why = f"no CONNECT within {limits.connect_timeout:g} s"
        except _TooLarge as err:
            why = str(err)
        if raw is None:
            if why is not None:
                refuse(conn.peer, conn.identity, why)
            return None
        why = await self._connect_refusal(conn.identity, raw)
        if why is None:
            return raw
        refuse(conn.peer, conn.identity, why)
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
    broker_log = logging.getLogger("amqtt.broker")
    if not any(isinstance(f, UnackedDelivery) for f in broker_log.filters):
        broker_log.addFilter(UnackedDelivery())


class UnackedDelivery(logging.Filter):
    """amqtt's broker logs a delivery that a subscriber did not acknowledge within its
    5 s PUBACK wait (a busy or hostile peer) as an ERROR with a traceback ("Task failed
    and will be skipped"). It is a peer's slowness, not our failure: one WARNING line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, TimeoutError) and "PUBACK" in str(error):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "a subscriber did not acknowledge a delivery: %s", (error,)
            record.exc_info = record.exc_text = None
        return True
