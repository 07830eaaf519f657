"""The MQTT client side of the mesh: one TLS connection per broker, kept alive by us.

``MqttSession`` is one client connection to one broker address (the two kinds the agent
runs are in ``mesh.adapters.mqtt.links``). Nothing else in the agent touches amqtt
(but ``mesh.adapters.mqtt.connection``, one connection of a session, and the broker).

What amqtt 0.12.1's client does and what this module does instead (DESIGN.md, "amqtt 0.12"):

- Reconnects. amqtt does not resubscribe after a reconnect and backs off without jitter;
  ``run()`` is our own loop: jittered exponential backoff, a fresh clean session and
  the full subscription list on every connect.
- Delivery. QoS 1 gives up after amqtt's 5 s PUBACK wait and nothing is resent after a
  reconnect (clean sessions): a published message is *probably* delivered. The envelope
  ``{origin, epoch, seq}`` above this layer detects gaps; ``status.dropped`` counts what
  this layer knows it lost.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from amqtt.client import ClientContext
from amqtt.plugins.manager import PluginManager

from mesh.adapters.mqtt.connection import (
    Connection,
    Inbox,
    LinkDown,
    LinkRefused,
    LinkSettings,
    Outgoing,
    SelfLink,
    plugin_manager,
    reraise_cancellation,
    translate,
)
from mesh.errors import ConfigError, LocalProtocolError, PkiError
from mesh.pki import NodeCredentials, client_ssl_context, identity_from_der

LOG = logging.getLogger(__name__)

OnMessage = Callable[[str, bytes], Awaitable[None]]
Subscriptions = Callable[[str], list[tuple[str, int]]]


class MqttSession:
    """One MQTT client connection to one broker address, kept up by ``run()``.

    Raises ``ConfigError`` (address) or ``PkiError`` (credentials) when built; after that,
    only ``publish()`` and ``wait_up()`` raise, ``LinkDown``.

    ``subscriptions`` maps the server's node id (from its certificate) to topic/QoS pairs,
    subscribed on every connect. ``on_message(topic, payload)`` is awaited in order; what it
    raises is logged and the session goes on. A server whose certificate names this node
    closes the session for good (state CLOSED, reason "self"), unless ``expect_peer`` is
    this node; a server other than ``expect_peer`` is refused and retried with backoff.
    """

    def __init__(
        self,
        *,
        creds: NodeCredentials,
        client_id: str,
        host: str,
        port: int,
        subscriptions: Subscriptions,
        on_message: OnMessage,
        settings: LinkSettings | None = None,
        rng: random.Random | None = None,
        expect_peer: str | None = None,
        on_state: Callable[[LinkState], None] | None = None,
        deaf_after: float | None = None,
    ) -> None:
        if not host or not 0 < port <= 65535:
            raise ConfigError(f"link address {host!r}:{port} is not valid")
        self.creds = creds
        self.client_id = client_id
        self.host = host
        self.port = port
        self.settings = settings or LinkSettings()
        self.expect_peer = expect_peer
        self._subscriptions = subscriptions
        self._on_message = on_message
        self._on_state = on_state
        if deaf_after is not None and deaf_after <= 0:
            raise ConfigError(f"deaf_after must be positive, not {deaf_after}")
        self.deaf_after = deaf_after  # see ``_hold``
        self._handling = False  # on_message runs
        self._rng = rng or random.Random()
        self._tls = client_ssl_context(creds)
        self._conn: Connection | None = None
        self._running = False
        self._state = LinkState.DOWN
        self._peer_id = expect_peer
        self._since: float | None = None
        self._last_message: float | None = None
        self._connections = 0
        self._attempts = 0
        self._dropped = 0
        self._error: str | None = None
        self._logged: str | None = None  # the last failure logged, to log a repeat once
        self._up = asyncio.Event()
        self._closed = asyncio.Event()

    # --- what the agent uses ----------------------------------------------------------------

    @property
    def me(self) -> str:
        return self.creds.identity.node

    @property
    def label(self) -> str:
        """How log lines name this link: the peer once known, else the address."""
        return self._peer_id or f"{self.host}:{self.port}"

    @property
    def status(self) -> LinkStatus:
        return LinkStatus(
            state=self._state,
            peer_id=self._peer_id,
            address=f"{self.host}:{self.port}",
            connected_since=self._since,
            last_message=self._last_message,
            reconnects=max(0, self._connections - 1),
            last_error=self._error,
            attempts=self._attempts,
            dropped=self._dropped + (self._conn.failed_sends if self._conn else 0),
        )

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Queue one message for this connection. Waits while the queue is full (back
        pressure, bounded by ``max_queue``); raises ``LinkDown`` if the link is not up or
        goes down before the message is queued. Returning means queued, not delivered."""
        if qos not in (0, 1):
            raise LocalProtocolError(f"publish on {topic}: QoS {qos} is not used by the mesh")
        if len(payload) + len(topic) + 16 > self.settings.max_packet_bytes:
            raise LocalProtocolError(
                f"publish on {topic}: {len(payload)} bytes is over the packet limit"
            )
        conn = self._conn
        if conn is None:
            raise LinkDown(f"link {self.label}: {self._state.value} ({self._error or 'not up'})")
        if conn.ended.done():
            raise LinkDown(f"link {self.label}: down ({conn.ended.result()})")
        try:
            await conn.enqueue(Outgoing(topic, bytes(payload), qos, retain))
        except LinkDown as err:
            raise LinkDown(f"link {self.label}: down ({err})") from err

    async def wait_up(self, timeout: float) -> None:  # noqa: ASYNC109 - LinkDown, with why
        """Return once the link is up; ``LinkDown`` if it is not within ``timeout`` s or
        it closed for good."""
        waits = [asyncio.ensure_future(e.wait()) for e in (self._up, self._closed)]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
        if self._state is not LinkState.UP:
            raise LinkDown(
                f"link {self.label}: not up within {timeout:g} s "
                f"({self._state.value}: {self._error or 'no error'})"
            )

    async def run(self) -> None:
        """Connect, serve, reconnect with backoff, until cancelled or closed as "self".
        Network errors are logged, never raised."""
        if self._running:
            raise LocalProtocolError(f"link {self.label} is already running")
        self._running = True
        self._closed.clear()
        inbox = Inbox(self.settings.max_inbound, self.settings.max_inbound_bytes)
        dispatcher = asyncio.create_task(self._dispatch(inbox))
        try:
            await self._connect_loop(inbox, plugin_manager())
        finally:
            dispatcher.cancel()
            await asyncio.gather(dispatcher, return_exceptions=True)
            if self._state is not LinkState.CLOSED:
                self._set_state(LinkState.CLOSED, "stopped")
                LOG.info("link %s: closed (stopped)", self.label)
            self._running = False

    # --- the connect loop --------------------------------------------------------------------

    async def _connect_loop(self, inbox: Inbox, plugins: PluginManager[ClientContext]) -> None:
        failures = 0
        while True:
            self._set_state(LinkState.CONNECTING, self._error)
            self._attempts += 1
            try:
                conn = await self._connect(inbox, plugins)
            except SelfLink:
                self._set_state(LinkState.CLOSED, "self")
                LOG.warning("link %s: closed (self: the address leads to this node)", self.label)
                return
            except LinkDown as err:
                self._failed(err)
                failures += 1
            else:
                lived = await self._serve(conn)
                failures = 0 if lived >= self.settings.liveness_s else failures + 1
            await asyncio.sleep(self._backoff(failures))

    def _backoff(self, failures: int) -> float:
        """Exponential, with full jitter: spread over the whole interval so that peers
        restarted together do not reconnect in step. After a failed attempt the draw has a
        floor of backoff_min, so an unlucky streak cannot make a tight loop; after a
        connection that lived, the first retry comes within backoff_min."""
        low, high = self.settings.backoff_min, self.settings.backoff_max
        if failures == 0:
            return self._rng.uniform(0, low)
        return self._rng.uniform(low, min(high, low * 2 ** min(failures - 1, 32)))

    async def _connect(self, inbox: Inbox, plugins: PluginManager[ClientContext]) -> Connection:
        conn: Connection | None = None
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self._tls,
                    ssl_handshake_timeout=self.settings.connect_timeout,
                )
                conn = Connection(reader, writer, self.settings, inbox, plugins)
                peer = self._judge_server(conn)
                await conn.open(self.client_id, self._subscriptions(peer))
                return conn
        except BaseException as err:
            if conn is not None:
                await conn.close(goodbye=False)
            reraise_cancellation(err)
            if isinstance(err, LinkRefused | SelfLink):
                raise
            # A TLS alert read after the handshake (the server refusing our certificate,
            # TLS 1.3) reaches amqtt as a lost connection: the reader kept the real cause.
            cause = conn.read_error if conn is not None and conn.read_error else err
            if isinstance(cause, LinkDown):
                raise
            raise translate(cause, self.settings.connect_timeout) from err

    def _judge_server(self, conn: Connection) -> str:
        der = conn.peer_der
        try:
            if not der:
                raise PkiError("the server presented no certificate")
            peer = identity_from_der(der, self.creds.identity.cluster).node
        except PkiError as err:
            raise LinkRefused(str(err)) from err
        if peer == self.me and self.expect_peer != self.me:
            raise SelfLink(peer)
        if self.expect_peer is not None and peer != self.expect_peer:
            raise LinkRefused(
                f"the server at {self.host}:{self.port} is {peer}, not {self.expect_peer}"
            )
        self._peer_id = peer
        return peer

    async def _serve(self, conn: Connection) -> float:
        """Hold the connection until it ends; return how long it was up."""
        self._conn = conn
        self._connections += 1
        self._since = time.time()
        self._logged = None
        self._set_state(LinkState.UP, None)
        LOG.info("link %s: up (%s:%d)", self.label, self.host, self.port)
        goodbye = True
        try:
            reason, goodbye = await self._hold(conn)
        finally:
            lived = time.time() - self._since
            self._conn = None
            self._since = None
            self._dropped += await conn.close(goodbye=goodbye)
        self._set_state(LinkState.DOWN, reason)
        self._logged = f"down ({reason})"
        LOG.warning("link %s: %s", self.label, self._logged)
        return lived

    async def _hold(self, conn: Connection) -> tuple[str, bool]:
        """Wait for ``conn`` to end: why, and whether to say goodbye. With ``deaf_after``,
        a connection that handed on no message for that long, while none was being
        handled, is ended by us: a peer publishes its head every second, and a link that
        came back up with no subscription behind it (seen among ten nodes, issue 16)
        stayed up on MQTT's keepalive alone, its peer never caught up with."""
        deaf = self.deaf_after
        while True:  # wait() leaves the future alone if cancelled
            await asyncio.wait({conn.ended}, timeout=None if deaf is None else deaf / 4)
            if conn.ended.done():
                return conn.ended.result(), False
            heard = max(self._since or 0.0, self._last_message or 0.0)
            if deaf is not None and not self._handling and time.time() - heard > deaf:
                return f"deaf: no message for {deaf:g} s", True

    def _failed(self, err: LinkDown) -> None:
        verb = "refused" if isinstance(err, LinkRefused) else "down"
        line = f"{verb} ({err})"
        self._set_state(LinkState.DOWN, str(err))
        if line != self._logged:  # a repeat of the same failure is not a state change
            LOG.warning("link %s: %s", self.label, line)
            self._logged = line
        else:
            LOG.debug("link %s: %s, again (attempt %d)", self.label, line, self._attempts)

    def _set_state(self, state: LinkState, error: str | None) -> None:
        self._state, self._error = state, error
        (self._up.set if state is LinkState.UP else self._up.clear)()
        if state is LinkState.CLOSED:
            self._closed.set()
        if self._on_state is not None:
            self._on_state(state)

    async def _dispatch(self, inbox: Inbox) -> None:
        while True:
            message = await inbox.get()
            topic, payload = str(message.topic), bytes(message.data)
            self._last_message = time.time()
            self._handling = True
            try:
                await self._on_message(topic, payload)
            except Exception:
                LOG.exception("link %s: handling a message on %s failed", self.label, topic)
            finally:
                self._handling = False
                self._last_message = time.time()


class LinkState(enum.Enum):
    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"
    CLOSED = "closed"


@dataclass(frozen=True)
class LinkStatus:
    """A snapshot of one session; times are wall-clock seconds (``time.time()``)."""

    state: LinkState
    peer_id: str | None  # from the server's certificate, once known
    address: str  # host:port as dialled
    connected_since: float | None
    last_message: float | None  # when on_message was last handed a message, or done with one
    reconnects: int  # connections made after the first
    last_error: str | None
    attempts: int  # connection attempts, successful or not
    dropped: int  # messages publish() accepted that were not sent or not acknowledged
