"""One connection of an MQTT session (``mesh.adapters.mqtt.links`` keeps one up): the
TLS stream, amqtt's protocol engine over it, and the bounds on both directions.

What amqtt 0.12.1's client does and what this module does instead (DESIGN.md, "amqtt 0.12"):

- TLS. ``MQTTClient`` builds its own ``SSLContext`` from file paths and lets the caller
  see the server's certificate only after it has sent CONNECT (with our client id). We open
  the TLS stream ourselves with ``mesh.pki.client_ssl_context`` (cluster CA only,
  ``CERT_REQUIRED``, strict X.509), read the server's identity from its certificate, and
  only then hand the stream to amqtt's protocol engine (``ClientProtocolHandler``, what
  ``MQTTClient`` runs underneath). So the wrong peer, or ourselves, never sees a CONNECT.
- Liveness. amqtt's client never notices a link that went silent, and times reads out
  with ``wait_for``, which cancels a packet half read. The handler runs without
  keep-alive (only the CONNECT carries one, for the broker); we ping, and silence past
  ``liveness_s`` aborts the transport (amqtt's close drains first, which never returns
  on a link that went silent).
- Bounds. amqtt reads as fast as the socket delivers and queues without bound. Our reader
  stops reading while ``max_inbound`` messages (or ``max_inbound_bytes``) wait for
  ``on_message`` (TCP pushes back; the broker cuts a subscriber that stalls, and the peer
  is caught up by replay), and refuses a packet over ``max_packet_bytes``. ``publish()``
  waits for room in a queue of ``max_queue`` messages, sent with at most ``max_inflight``
  unacknowledged (1 by default: see ``LinkSettings``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter
from amqtt.client import ClientContext
from amqtt.contexts import ClientConfig
from amqtt.mqtt.connack import CONNECTION_ACCEPTED
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.client_handler import ClientProtocolHandler
from amqtt.plugins.manager import PluginManager
from amqtt.session import Session

from mesh.adapters.mqtt import listening
from mesh.adapters.mqtt.frames import FrameMeter
from mesh.errors import ConfigError, MeshError

_SUBSCRIBE_FAILED = 0x80  # SUBACK return code, MQTT 3.1.1 section 3.9.3
_CONNACK_CODES = {
    1: "unacceptable protocol version",
    2: "client id rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}
_GOODBYE_TIMEOUT = 0.5  # seconds to hand a DISCONNECT to the kernel before aborting
_STOP_TIMEOUT = 1.0  # seconds for amqtt's handler to stop once the transport is gone


class LinkDown(MeshError):
    """The link is not connected, or its connection attempt failed."""


class LinkRefused(LinkDown):
    """The other side is not who it must be, or will not have us (TLS, CONNACK, SUBACK)."""


class SelfLink(MeshError):
    """The address leads to this node's own broker."""


@dataclass(frozen=True)
class LinkSettings:
    """Timing and bounds of one session. Every value must be positive."""

    liveness_s: float = 3.0  # inbound silence that drops the connection
    backoff_min: float = 0.2  # first reconnect delay, doubling up to backoff_max
    backoff_max: float = 10.0
    connect_timeout: float = 5.0  # TCP, TLS, CONNACK and SUBACK together
    max_queue: int = 1024  # messages publish() accepted and the sender has not taken
    # Messages being sent or awaiting their PUBACK. amqtt's broker acknowledges a PUBLISH
    # when it queues it, before routing it, and ours cuts a client that gets
    # BrokerLimits.max_inbound_queue messages ahead of routing: a PUBACK is no sign of room.
    # Measured in one process: a window of 4 was cut after ~1,500 messages, 2 kept up
    # barely, 1 carries ~2,100 messages/s end to end. Raise it only against a broker that
    # pushes back instead of cutting.
    max_inflight: int = 1
    max_inbound: int = 1024  # messages received and not yet handed to on_message,
    max_inbound_bytes: int = 16 * 1024 * 1024  # and their payload bytes
    max_packet_bytes: int = 1024 * 1024  # the broker's limit too (BrokerLimits)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ConfigError(f"link setting {name} must be positive, not {value}")
        if self.backoff_max < self.backoff_min:
            raise ConfigError(
                f"link setting backoff_max ({self.backoff_max}) is below "
                f"backoff_min ({self.backoff_min})"
            )

    @property
    def keep_alive(self) -> int:
        """The keep-alive (whole seconds) the CONNECT announces: the broker drops us after
        1.5 times this without a packet from us; we ping every third of ``liveness_s``."""
        return max(2, math.ceil(2 * self.liveness_s))


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Inbox(asyncio.Queue[Any]):
    """Messages received and not yet handed to ``on_message``: one queue per session,
    shared by its successive connections, so that a message read before a reconnect is
    still handed over, and in order.

    amqtt puts into it without bound, and must: a put that waits lets a later message
    overtake it. The bound is applied before amqtt reads (``_GatedReader``), so the queue
    holds at most the limits plus what one socket read brought in (a few hundred KiB).
    """

    def __init__(self, limit: int, limit_bytes: int) -> None:
        super().__init__()
        self.limit = limit
        self.limit_bytes = limit_bytes
        self.bytes = 0
        self.room = asyncio.Event()
        self.room.set()

    def over(self) -> bool:
        return self.qsize() >= self.limit or self.bytes >= self.limit_bytes

    # asyncio.Queue's hooks for subclasses (as PriorityQueue uses them)
    def _put(self, item: Any) -> None:
        super()._put(item)
        self.bytes += len(item.data)

    def _get(self) -> Any:
        item = super()._get()
        self.bytes -= len(item.data)
        if not self.over():
            self.room.set()
        return item


class _GatedReader(ReaderAdapter):  # type: ignore[misc]
    """What amqtt's handler reads: stamps liveness, stops reading while the inbox is
    full, refuses oversized packets and reserved packet types (``mesh.adapters.mqtt.frames``),
    and turns a read error into a clean end of stream (amqtt logs and breaks on anything
    else)."""

    def __init__(self, conn: Connection, reader: asyncio.StreamReader, inbox: Inbox) -> None:
        self._conn = conn
        self._reader = reader
        self._inbox = inbox
        self._meter = FrameMeter()

    async def read(self, n: int = -1) -> bytes:
        limit = self._conn.settings.max_packet_bytes
        if not 0 <= n <= limit:  # amqtt reads a whole payload at once; -1 would read to EOF
            self._conn.end(f"a packet over the {limit}-byte limit")
            return b""
        while self._inbox.over():
            self._conn.paused = True  # our own slowness is not the link's silence
            self._inbox.room.clear()
            await self._inbox.room.wait()
        self._conn.paused = False
        try:
            data = await self._reader.readexactly(n)
        except asyncio.IncompleteReadError:
            return b""
        except OSError as err:  # ssl.SSLError is an OSError
            self._conn.read_error = err
            self._conn.end(f"read: {_describe(err)}")
            return b""
        self._conn.touch()
        self._meter.feed(data)
        if self._meter.reserved is not None:
            self._conn.end(f"reserved packet type {self._meter.reserved} (MQTT-2.2.1)")
            return b""
        return data

    def feed_eof(self) -> None:
        self._reader.feed_eof()


class Connection:
    """One TLS connection and the amqtt handler on it, from CONNECT to abort."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        settings: LinkSettings,
        inbox: Inbox,
        plugins: PluginManager[ClientContext],
    ) -> None:
        self.settings = settings
        self.writer = writer
        self.loop = asyncio.get_running_loop()
        self.clock = listening.of(self.loop)  # silence counts only while we could listen
        self.last_rx = self.clock.free()
        self.paused = False
        self.outbox: asyncio.Queue[Outgoing] = asyncio.Queue(settings.max_queue)
        self.ended: asyncio.Future[str] = self.loop.create_future()
        self.read_error: OSError | None = None
        self.failed_sends = 0  # publishes not acknowledged: amqtt's 5 s PUBACK wait, or cut
        self._inflight = asyncio.Semaphore(settings.max_inflight)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.session = Session()
        self.session.clean_session = True  # the index, not the broker, is the source of truth
        # No keep-alive in amqtt's handler: it would time reads out mid-packet (see the
        # module docstring). open() puts ours into the CONNECT only.
        self.session.keep_alive = 0
        self.session.delivered_message_queue = inbox
        self.handler = ClientProtocolHandler(plugins)
        self.handler.attach(
            self.session, _GatedReader(self, reader, inbox), StreamWriterAdapter(writer)
        )

    @property
    def peer_der(self) -> bytes | None:
        ssl_object = self.writer.get_extra_info("ssl_object")
        return ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None

    def touch(self) -> None:
        self.last_rx = self.clock.free()

    def end(self, reason: str) -> None:
        """Drop the connection now, without waiting on amqtt; the first reason stays."""
        if not self.ended.done():
            self.ended.set_result(reason)
        self.writer.transport.abort()

    async def open(self, client_id: str, subscriptions: list[tuple[str, int]]) -> None:
        self.session.client_id = client_id
        self.session.keep_alive = self.settings.keep_alive
        code = await self._unless_ended(self.handler.mqtt_connect())
        self.session.keep_alive = 0  # read again by handler.start(): see __init__
        if code != CONNECTION_ACCEPTED:
            raise LinkRefused(f"CONNACK {code}: {_CONNACK_CODES.get(code, 'refused')}")
        await self.handler.start()
        self._spawn(self.handler.wait_disconnect()).add_done_callback(
            lambda _: self.end("closed by the broker")
        )
        if subscriptions:
            codes = await self._unless_ended(
                self.handler.mqtt_subscribe(subscriptions, self.session.next_packet_id)
            )
            if len(codes) != len(subscriptions) or _SUBSCRIBE_FAILED in codes:
                refused = [
                    t
                    for (t, _), c in zip(subscriptions, codes, strict=False)
                    if c == _SUBSCRIBE_FAILED
                ]
                raise LinkRefused(f"subscription refused: {', '.join(refused) or codes}")
        self._spawn(self._send())
        self._spawn(self._watch())

    async def _unless_ended(self, coro: Awaitable[Any]) -> Any:
        """Await ``coro`` in a task of its own, or until the connection ends. amqtt turns a
        CancelledError into its ProtocolHandlerError when it is cancelled while writing, so
        our own task's cancellation (a timeout, a shutdown) must never pass through it."""
        task = self._spawn(coro)
        try:
            await asyncio.wait({task, self.ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            raise LinkDown(self.ended.result())
        return task.result()

    async def enqueue(self, item: Outgoing) -> None:
        """Wait for room in the outbox; LinkDown if the connection ends first."""
        try:
            self.outbox.put_nowait(item)
            return
        except asyncio.QueueFull:
            pass
        await self._unless_ended(self.outbox.put(item))

    async def _send(self) -> None:
        while True:
            item = await self.outbox.get()
            await self._inflight.acquire()
            # One task per message, created in order: each takes amqtt's (FIFO) write lock
            # in its first step, so messages hit the wire in the order they were queued.
            task = self._spawn(
                self.handler.mqtt_publish(item.topic, item.payload, item.qos, item.retain)
            )
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[Any]) -> None:
        self._inflight.release()
        if task.cancelled() or task.exception() is not None:
            self.failed_sends += 1

    async def _watch(self) -> None:
        liveness = self.settings.liveness_s
        ping: asyncio.Task[Any] | None = None
        last_ping = self.loop.time()
        while True:
            await asyncio.sleep(liveness / 6)  # a timer tick, not a wait for an outcome
            now, heard = self.loop.time(), self.clock.free()
            if self.paused:
                self.last_rx = heard
                continue
            if heard - self.last_rx > liveness:
                self.end(f"silent for {heard - self.last_rx:.1f} s")
                return
            # Pings make a link without application traffic (OwnClient) prove itself,
            # and keep the broker's keep-alive satisfied (PINGRESP resets last_rx).
            if now - last_ping >= liveness / 3 and (ping is None or ping.done()):
                ping, last_ping = self._spawn(self.handler.mqtt_ping()), now

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: amqtt raises on every path of a lost connection

    async def close(self, *, goodbye: bool) -> int:
        """Send DISCONNECT if asked and possible, abort, stop everything; return how many
        accepted messages were not confirmed sent (queued, in flight, or given up on)."""
        if goodbye and not self.ended.done():
            with contextlib.suppress(OSError, TimeoutError):
                self.writer.write(DisconnectPacket().to_bytes())
                await asyncio.wait_for(self.writer.drain(), _GOODBYE_TIMEOUT)
        self.end("closed")
        # amqtt's stop first: it cancels its reader and PUBACK waiters, so that no PUBACK
        # still buffered is matched against a publish we cancelled (amqtt warns of each).
        # Its stop swallows a cancellation: it runs in a task of its own (_unless_ended).
        stop = self._spawn(self.handler.stop())
        try:
            await asyncio.wait({stop}, timeout=_STOP_TIMEOUT)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        return self.outbox.qsize() + self.failed_sends


def plugin_manager() -> PluginManager[ClientContext]:
    """amqtt's handler fires plugin events; ours has no plugins (and a config, or amqtt
    would look for entry-point plugins and warn that this is deprecated)."""
    context = ClientContext()
    context.config = ClientConfig(plugins={})
    return PluginManager("amqtt.client.plugins", context)


def reraise_cancellation(err: BaseException) -> None:
    """Re-raise ``err`` unless it is an ordinary exception, and raise CancelledError if our
    task was cancelled meanwhile and a library swallowed it (amqtt does, see _unless_ended):
    a shutdown must not turn into one more reconnect."""
    if not isinstance(err, Exception):
        raise err
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from err


def _describe(err: BaseException | None) -> str:
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {err.verify_message}"
    if isinstance(err, ssl.SSLError):
        return str(err.reason or err).replace("_", " ").lower()
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


def translate(err: BaseException, timeout: float) -> LinkDown:
    """One connection attempt's failure, from ssl, the OS or amqtt, as ours."""
    if isinstance(err, ssl.SSLError):
        return LinkRefused(f"TLS: {_describe(err)}")
    if isinstance(err, TimeoutError):
        return LinkDown(f"no answer within {timeout:g} s")
    if isinstance(err, OSError | EOFError):
        return LinkDown(f"connect: {_describe(err)}")
    return LinkDown(f"MQTT: {err!r}")  # amqtt raises many kinds
