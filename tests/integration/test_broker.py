"""The embedded broker with real TLS on 127.0.0.1: who is refused, with which log line,
and that the allowed paths carry messages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
from amqtt.client import MQTTClient
from amqtt.contexts import Action
from amqtt.mqtt.connack import NOT_AUTHORIZED

from mesh import pki
from mesh.adapters.mqtt.broker import BrokerSettings, EmbeddedBroker, UnackedDelivery
from mesh.adapters.mqtt.guard import BrokerLimits
from mesh.errors import ConfigError, PkiError
from tests.integration.conftest import CLUSTER, ClientFiles, Pki, until

pytestmark = pytest.mark.integration

OWNER, PEER, THIRD = "alpha", "bravo", "charlie"
ORIGIN = f"mesh/v1/{CLUSTER}/{OWNER}/"
SUBSCRIBE_REFUSED = 0x80
CONNACK_REFUSED = bytes([0x20, 2, 0, NOT_AUTHORIZED])  # MQTT 3.1.1 section 3.2
BROKER_LOG = "mesh.adapters.mqtt.broker"


# --- helpers -------------------------------------------------------------------------------


@asynccontextmanager
async def running_broker(
    cluster_pki: Pki, limits: BrokerLimits | None = None
) -> AsyncIterator[EmbeddedBroker]:
    settings = BrokerSettings(
        cluster_pki.creds(OWNER), host="127.0.0.1", port=0, limits=limits or BrokerLimits()
    )
    broker = EmbeddedBroker(settings)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


def mqtt_client(files: ClientFiles, client_id: str, **config: Any) -> MQTTClient:
    connection: dict[str, str] = {"cafile": str(files.ca)}
    if files.cert is not None and files.key is not None:
        connection |= {"certfile": str(files.cert), "keyfile": str(files.key)}
    return MQTTClient(
        client_id=client_id,
        config={
            "connection": connection,
            "check_hostname": False,  # nodes are identified by URI SAN, not host name
            "auto_reconnect": False,
            "plugins": {},
            **config,
        },
    )


@asynccontextmanager
async def connected(
    broker: EmbeddedBroker, files: ClientFiles, client_id: str
) -> AsyncIterator[MQTTClient]:
    client = mqtt_client(files, client_id)
    await client.connect(uri(broker))
    try:
        yield client
    finally:
        if client.session is not None and client.session.transitions.is_connected():
            await client.disconnect()


def uri(broker: EmbeddedBroker) -> str:
    host, port = broker.address
    return f"mqtts://{host}:{port}"


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == BROKER_LOG and r.levelno == logging.WARNING
    ]


async def logged(caplog: pytest.LogCaptureFixture, *parts: str) -> str:
    """Wait for exactly one broker warning that contains every part; return it."""

    def matching() -> list[str]:
        return [line for line in refusals(caplog) if all(p in line for p in parts)]

    await until(lambda: bool(matching()), f"a broker log line with {parts}")
    lines = matching()
    assert len(lines) == 1, lines
    return lines[0]


async def next_message(client: MQTTClient) -> tuple[str, bytes]:
    message = await client.deliver_message(timeout_duration=5)
    assert message is not None
    return str(message.topic), bytes(message.data)


def tls_context(files: ClientFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(files.ca)
    if files.cert is not None and files.key is not None:
        ctx.load_cert_chain(files.cert, files.key)
    return ctx


async def connack_to(
    broker: EmbeddedBroker, files: ClientFiles, client_id: str, connect: bytes | None = None
) -> bytes:
    """Send a CONNECT (``connect``, or a plain one for ``client_id``; b"" sends nothing)
    and return what the broker answers before it hangs up: b"" when TLS refused the
    client. (amqtt's client leaks its transport when it is refused, hence no MQTTClient.)"""
    host, port = broker.address
    try:
        reader, writer = await asyncio.open_connection(host, port, ssl=tls_context(files))
    except (ssl.SSLError, ConnectionError):
        return b""  # refused before or during the handshake
    try:
        if connect != b"":
            writer.write(connect or _connect_packet(client_id))
            await writer.drain()
        return await reader.read(1024)
    except (ssl.SSLError, ConnectionError):
        return b""  # with TLS 1.3 the client learns of the refusal on its first read
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


# --- refused -------------------------------------------------------------------------------


async def test_client_without_certificate_is_refused(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_broker(cluster_pki) as broker:
        assert await connack_to(broker, cluster_pki.files(None), PEER) == b""
        line = await logged(caplog, "refused 127.0.0.1:", "[no identity]")
        assert "peer did not return a certificate" in line


async def test_certificate_from_another_ca_is_refused(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_broker(cluster_pki) as broker:
        assert await connack_to(broker, cluster_pki.files(PEER, foreign=True), PEER) == b""
        await logged(caplog, "refused 127.0.0.1:", "TLS: certificate verify failed")


async def test_expired_certificate_is_refused(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_broker(cluster_pki) as broker:
        assert await connack_to(broker, cluster_pki.files("stale"), "stale") == b""
        await logged(caplog, "refused 127.0.0.1:", "certificate has expired")


async def test_client_id_of_another_node_is_refused(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        running_broker(cluster_pki) as broker,
        connected(broker, cluster_pki.files(OWNER), OWNER) as owner,
    ):
        assert await owner.subscribe([(f"{ORIGIN}hello", 1)]) == [1]
        answer = await connack_to(broker, cluster_pki.files(PEER), OWNER)
        assert answer == CONNACK_REFUSED
        line = await logged(caplog, f"[{PEER}]", "client id 'alpha'")
        assert line.startswith("refused 127.0.0.1:")
        # The impostor was judged before amqtt saw it (amqtt would have deleted the
        # session of that client id first): the owner's session and subscription live on.
        await owner.publish(f"{ORIGIN}hello", b"still here", qos=1)
        assert await next_message(owner) == (f"{ORIGIN}hello", b"still here")


async def test_will_on_a_foreign_topic_is_refused(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    # amqtt publishes a will without asking the ACL, so the will is judged at CONNECT.
    async with running_broker(cluster_pki) as broker:
        connect = _connect_packet(PEER, will=(f"{ORIGIN}manifest", b"forged"))
        answer = await connack_to(broker, cluster_pki.files(PEER), PEER, connect=connect)
        assert answer == CONNACK_REFUSED
        await logged(caplog, f"[{PEER}]", f"will on '{ORIGIN}manifest'")


async def test_publishing_into_other_nodes_topics_is_refused(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        running_broker(cluster_pki) as broker,
        connected(broker, cluster_pki.files(OWNER), OWNER) as owner,
        connected(broker, cluster_pki.files(PEER), PEER) as peer,
    ):
        assert await owner.subscribe([(f"{ORIGIN}#", 1)]) == [1]
        forged = [f"{ORIGIN}manifest", f"{ORIGIN}req/{THIRD}/digest", f"mesh/v1/{CLUSTER}/x/y"]
        for topic in forged:
            await peer.publish(topic, b"forged", qos=1)
        # A client's messages are routed in order: once this one arrives, the forged
        # ones have been dropped, not merely delayed.
        await peer.publish(f"{ORIGIN}req/{PEER}/digest", b"mine", qos=1)
        assert await next_message(owner) == (f"{ORIGIN}req/{PEER}/digest", b"mine")
        for topic in forged:
            line = await logged(caplog, f"[{PEER}]", f"publish '{topic}'")
            assert f"writes only {ORIGIN}req/{PEER}/#" in line


async def test_subscribing_to_unreadable_topics_is_refused(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    unreadable = [
        "#",
        f"mesh/v1/{CLUSTER}/{THIRD}/#",
        f"{ORIGIN}#",  # would include other nodes' requests
        f"{ORIGIN}+/x",
        f"{ORIGIN}req/{THIRD}/#",
        f"{ORIGIN}resp/{THIRD}/#",
    ]
    async with (
        running_broker(cluster_pki) as broker,
        connected(broker, cluster_pki.files(PEER), PEER) as peer,
    ):
        granted = await peer.subscribe([(f, 1) for f in unreadable])
        assert granted == [SUBSCRIBE_REFUSED] * len(unreadable)
        readable = [f"{ORIGIN}manifest", f"{ORIGIN}hello", f"{ORIGIN}resp/{PEER}/#"]
        assert await peer.subscribe([(f, 1) for f in readable]) == [1, 1, 1]
        for topic_filter in unreadable:
            await logged(caplog, f"[{PEER}]", f"subscribe '{topic_filter}'")


async def test_oversized_message_is_refused_and_the_broker_stays_up(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    limits = BrokerLimits(max_packet_bytes=64 * 1024)
    async with running_broker(cluster_pki, limits) as broker:
        async with connected(broker, cluster_pki.files(PEER), PEER) as peer:
            await peer.publish(f"{ORIGIN}req/{PEER}/big", b"x" * 100_000, qos=0)
            line = await logged(caplog, "cut 127.0.0.1:", f"[{PEER}]", "over the 65536-byte")
            assert "packet of 100" in line
            await until(lambda: not _is_connected(peer), "the oversized client to be dropped")
        await _manifest_reaches_peer(broker, cluster_pki)


async def test_reserved_packets_cut_the_client_with_one_line_not_one_per_packet(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 13: 1.2 MB of zeros after a CONNECT is 600,000 reserved packets (type 0,
    length 0); amqtt 0.12.1 logged each one and read on. The first one cuts the client."""
    caplog.set_level(logging.INFO)
    async with running_broker(cluster_pki) as broker:
        reader, writer = await _raw_client(broker, cluster_pki.creds(PEER), _connect_packet(PEER))
        try:
            assert await reader.readexactly(4) == b"\x20\x02\x00\x00"
            writer.write(bytes(1_200_000))
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.drain()
            await logged(caplog, "cut 127.0.0.1:", f"[{PEER}]", "reserved packet type 0")
            with contextlib.suppress(ConnectionError, ssl.SSLError):  # cut: a reset
                assert await reader.read() == b""
        finally:
            writer.close()
        await _manifest_reaches_peer(broker, cluster_pki)
    amqtt = [r for r in caplog.records if r.name.startswith("amqtt")
             and r.levelno >= logging.WARNING]
    assert len(amqtt) <= 1, [r.getMessage() for r in amqtt[:3]]


async def test_a_subscription_made_while_a_message_is_broadcast_loses_nothing(
    cluster_pki: Pki,
) -> None:
    """amqtt 0.12.1's ``_run_broadcast`` walks the subscriptions across the ACL's await;
    a filter subscribed meanwhile raised "dictionary changed size during iteration"
    (issue 13) and the message never reached the rest. Held at that await here."""
    async with running_broker(cluster_pki) as broker:
        amqtt_broker: Any = broker._broker
        acl = amqtt_broker._topic_filtering
        held, go_on = asyncio.Event(), asyncio.Event()

        async def slow_acl(session: Any, topic: str, action: Action) -> bool:
            if action == Action.RECEIVE and not go_on.is_set():
                held.set()
                await go_on.wait()
            return bool(await acl(session, topic=topic, action=action))

        amqtt_broker._topic_filtering = slow_acl
        responses = f"{ORIGIN}resp/{PEER}"
        async with (
            connected(broker, cluster_pki.files(PEER), f"{PEER}/a") as first,
            connected(broker, cluster_pki.files(PEER), f"{PEER}/b") as second,
            connected(broker, cluster_pki.files(OWNER), OWNER) as owner,
        ):
            # Two filters that match one topic, so the broadcast walks the dict on.
            assert await first.subscribe([(responses, 1)]) == [1]
            assert await second.subscribe([(f"{responses}/#", 1)]) == [1]
            await owner.publish(responses, b"one", qos=0)
            await held.wait()  # the broadcast is at its first subscriber's ACL check
            async with connected(broker, cluster_pki.files(PEER), f"{PEER}/late") as late:
                assert await late.subscribe([(f"{ORIGIN}head", 0)]) == [0]  # a new filter
                go_on.set()
                assert await next_message(first) == (responses, b"one")
                assert await next_message(second) == (responses, b"one")
                await owner.publish(f"{ORIGIN}head", b"two", qos=0)
                assert await next_message(late) == (f"{ORIGIN}head", b"two")


async def test_a_late_subscribe_of_a_connection_taken_over_leaves_the_new_one_subscribed(
    cluster_pki: Pki,
) -> None:
    """Issue 16, ten nodes: a peer link gave up on a connection whose SUBACK was late and
    connected again with its client id. amqtt 0.12.1 added the old session's late
    subscription, then skipped the new session's on that filter (one per client id)
    though it acknowledged it: the owner's replies never reached the link, and the
    node never caught up with the owner. The old connection is held here at its ACL
    check until the new one is connected."""
    async with running_broker(cluster_pki) as broker:
        amqtt_broker: Any = broker._broker
        acl = amqtt_broker._topic_filtering
        responses = f"{ORIGIN}resp/{PEER}"
        held, go_on = asyncio.Event(), asyncio.Event()

        async def slow_acl(session: Any, topic: str, action: Action) -> bool:
            if action == Action.SUBSCRIBE and not held.is_set():
                held.set()
                await go_on.wait()
            return bool(await acl(session, topic=topic, action=action))

        amqtt_broker._topic_filtering = slow_acl
        async with (
            connected(broker, cluster_pki.files(OWNER), f"{OWNER}/replies") as owner,
            contextlib.AsyncExitStack() as stack,
        ):
            old = await stack.enter_async_context(
                connected(broker, cluster_pki.files(PEER), PEER))
            late = asyncio.create_task(old.subscribe([(responses, 1)]))
            await held.wait()
            async with connected(broker, cluster_pki.files(PEER), PEER) as new:
                go_on.set()
                assert await asyncio.wait_for(late, 5) == [SUBSCRIBE_REFUSED]  # taken over
                await stack.aclose()  # the old connection ends, as the link's did
                assert await new.subscribe([(responses, 1)]) == [1]
                await owner.publish(responses, b"the reply", qos=1)
                assert await next_message(new) == (responses, b"the reply")


async def test_stalled_subscriber_is_cut_off(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    limits = BrokerLimits(max_inflight=4)
    async with (
        running_broker(cluster_pki, limits) as broker,
        connected(broker, cluster_pki.files(OWNER), OWNER) as owner,
    ):
        stalled = await _raw_subscriber(broker, cluster_pki.creds(THIRD), f"{ORIGIN}manifest")
        try:
            for seq in range(8):  # a subscriber that never acknowledges
                await owner.publish(f"{ORIGIN}manifest", b"%d" % seq, qos=1)
            await logged(caplog, f"[{THIRD}]", "stalled subscriber: 4 messages unacknowledged")
        finally:
            stalled.close()
        await _manifest_reaches_peer(broker, cluster_pki)


async def test_connections_over_the_limit_are_refused(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        running_broker(cluster_pki, BrokerLimits(max_connections=1)) as broker,
        connected(broker, cluster_pki.files(OWNER), OWNER),
    ):
        assert await connack_to(broker, cluster_pki.files(PEER), PEER) == b""
        await logged(caplog, "[no identity]", "1 connections open, the limit")


async def test_client_without_connect_is_dropped(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_broker(cluster_pki, BrokerLimits(connect_timeout=0.2)) as broker:
        assert await connack_to(broker, cluster_pki.files(PEER), PEER, connect=b"") == b""
        await logged(caplog, f"[{PEER}]", "no CONNECT within 0.2 s")


async def test_silent_client_is_cut_after_one_and_a_half_keepalives(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    # MQTT-3.1.2-24; amqtt 0.12.1 itself waits on forever.
    async with running_broker(cluster_pki) as broker:
        connect = _connect_packet(PEER, keepalive=1)
        reader, writer = await _raw_client(broker, cluster_pki.creds(PEER), connect)
        try:
            assert await reader.readexactly(4) == b"\x20\x02\x00\x00"
            await logged(caplog, "cut 127.0.0.1:", f"[{PEER}]", "silent for 1.5 s")
            assert await reader.read() == b""
        finally:
            writer.close()


async def test_only_the_owner_retains(cluster_pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async with (
        running_broker(cluster_pki) as broker,
        connected(broker, cluster_pki.files(OWNER), OWNER) as owner,
        connected(broker, cluster_pki.files(PEER), PEER) as peer,
    ):
        await owner.publish(f"{ORIGIN}hello", b"alpha v1", qos=1, retain=True)
        await peer.publish(f"{ORIGIN}req/{PEER}/digest", b"keep me", qos=1, retain=True)
        await logged(caplog, f"[{PEER}]", f"retain '{ORIGIN}req/{PEER}/digest': only alpha")
        async with connected(broker, cluster_pki.files(THIRD), THIRD) as late:
            assert await late.subscribe([(f"{ORIGIN}hello", 1)]) == [1]
            assert await next_message(late) == (f"{ORIGIN}hello", b"alpha v1")


# --- allowed -------------------------------------------------------------------------------


async def test_peer_receives_what_the_owner_publishes(cluster_pki: Pki) -> None:
    async with (
        running_broker(cluster_pki) as broker,
        connected(broker, cluster_pki.files(OWNER), OWNER) as owner,
        connected(broker, cluster_pki.files(PEER), PEER) as peer,
    ):
        assert await peer.subscribe([(f"{ORIGIN}manifest", 1)]) == [1]
        await owner.publish(f"{ORIGIN}manifest", b"manifest-1", qos=1)
        assert await next_message(peer) == (f"{ORIGIN}manifest", b"manifest-1")


async def test_peer_request_reaches_the_owner(cluster_pki: Pki) -> None:
    async with (
        running_broker(cluster_pki) as broker,
        # A second client of the owner's node, named <node>/<name>, beside nothing else.
        connected(broker, cluster_pki.files(OWNER), f"{OWNER}/requests") as owner,
        connected(broker, cluster_pki.files(PEER), PEER) as peer,
    ):
        assert await owner.subscribe([(f"{ORIGIN}req/+/#", 1)]) == [1]
        await peer.publish(f"{ORIGIN}req/{PEER}/digest", b"digest?", qos=1)
        assert await next_message(owner) == (f"{ORIGIN}req/{PEER}/digest", b"digest?")


async def test_connections_are_served_without_nagle(cluster_pki: Pki) -> None:
    """asyncio leaves Nagle on for a socket accepted from our listener (proto 0, not
    from getaddrinfo): a subscriber then got each manifest after the ACK of the one
    before, up to the 40 ms delayed-ACK timer (bench/mqtt_mesh.py, p99 on asyncio)."""
    async with (
        running_broker(cluster_pki) as broker,
        connected(broker, cluster_pki.files(PEER), PEER),
    ):
        connections = broker._guard.connections
        await until(lambda: bool(connections), "the connection")
        for conn in connections.values():
            sock = conn.writer.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


# --- start-up errors -----------------------------------------------------------------------


async def test_port_in_use_is_a_config_error(cluster_pki: Pki) -> None:
    async with running_broker(cluster_pki) as first:
        host, port = first.address
        second = EmbeddedBroker(BrokerSettings(cluster_pki.creds(OWNER), host=host, port=port))
        with pytest.raises(ConfigError, match=f"listen on {host}:{port}"):
            await second.start()


async def test_mismatched_key_is_a_pki_error(cluster_pki: Pki) -> None:
    creds = cluster_pki.creds(OWNER)
    wrong = replace(creds, key=cluster_pki.creds(PEER).key)
    with pytest.raises(PkiError, match="load TLS credentials"):
        await EmbeddedBroker(BrokerSettings(wrong, host="127.0.0.1", port=0)).start()


# --- internals of the tests ----------------------------------------------------------------


def _is_connected(client: MQTTClient) -> bool:
    return client.session is not None and bool(client.session.transitions.is_connected())


async def _manifest_reaches_peer(broker: EmbeddedBroker, cluster_pki: Pki) -> None:
    async with (
        connected(broker, cluster_pki.files(OWNER), f"{OWNER}/check") as owner,
        connected(broker, cluster_pki.files(PEER), f"{PEER}/check") as peer,
    ):
        assert await peer.subscribe([(f"{ORIGIN}hello", 1)]) == [1]
        await owner.publish(f"{ORIGIN}hello", b"up", qos=1)
        assert await next_message(peer) == (f"{ORIGIN}hello", b"up")


def _mqtt_packet(first_byte: int, body: bytes) -> bytes:
    length, encoded = len(body), bytearray()
    while True:
        digit, length = length % 128, length // 128
        encoded.append(digit | (0x80 if length else 0))
        if not length:
            return bytes([first_byte]) + bytes(encoded) + body


def _mqtt_string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return len(data).to_bytes(2, "big") + data


def _connect_packet(
    client_id: str, will: tuple[str, bytes] | None = None, keepalive: int = 60
) -> bytes:
    """An MQTT 3.1.1 CONNECT with a clean session (section 3.1)."""
    flags = 0x02 | (0x04 | 0x08 if will else 0)  # clean session; will flag, will QoS 1
    header = _mqtt_string("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big")
    payload = _mqtt_string(client_id)
    if will is not None:
        payload += _mqtt_string(will[0]) + _mqtt_string(will[1])
    return _mqtt_packet(0x10, header + payload)


async def _raw_subscriber(
    broker: EmbeddedBroker, creds: pki.NodeCredentials, topic: str
) -> asyncio.StreamWriter:
    """A client that connects and subscribes at QoS 1, then never reads or acknowledges
    (amqtt's client always acknowledges, so this one speaks MQTT by hand)."""
    reader, writer = await _raw_client(broker, creds, _connect_packet(creds.identity.node))
    writer.write(_mqtt_packet(0x82, (1).to_bytes(2, "big") + _mqtt_string(topic) + b"\x01"))
    await writer.drain()
    connack, suback = await reader.readexactly(4), await reader.readexactly(5)
    assert connack == b"\x20\x02\x00\x00", connack
    assert suback == b"\x90\x03\x00\x01\x01", suback
    return writer


async def _raw_client(
    broker: EmbeddedBroker, creds: pki.NodeCredentials, connect: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = broker.address
    reader, writer = await asyncio.open_connection(host, port, ssl=pki.client_ssl_context(creds))
    writer.write(connect)
    await writer.drain()
    return reader, writer


def test_an_unacknowledged_delivery_is_one_warning_line(caplog: pytest.LogCaptureFixture) -> None:
    """amqtt logs a subscriber's missing PUBACK as an ERROR with a traceback; the broker
    wrapper makes it one WARNING line (a slow or hostile peer is not our failure)."""
    logger = logging.getLogger("amqtt.broker")
    logger.addFilter(filter_ := UnackedDelivery())
    try:
        with caplog.at_level(logging.WARNING, logger="amqtt.broker"):
            try:
                raise TimeoutError("Timeout waiting for PUBACK for packet ID 1")
            except TimeoutError:
                logger.exception("Task failed and will be skipped: <Task ...>")
            try:
                raise ValueError("something else")
            except ValueError:
                logger.exception("Task failed and will be skipped: <Task ...>")
    finally:
        logger.removeFilter(filter_)
    first, second = caplog.records
    assert (first.levelno, first.exc_info) == (logging.WARNING, None)
    assert first.getMessage() == ("a subscriber did not acknowledge a delivery: "
                                  "Timeout waiting for PUBACK for packet ID 1")
    assert second.levelno == logging.ERROR and second.exc_info is not None
