"""Mesh links against real embedded brokers with real TLS on 127.0.0.x: delivery, order,
reconnects with backoff, liveness through a proxy that goes silent, and refusals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import pytest

from mesh.adapters.mqtt.broker import BrokerSettings, EmbeddedBroker
from mesh.adapters.mqtt.connection import LinkDown, LinkSettings
from mesh.adapters.mqtt.links import DEAF_AFTER, OwnClient, PeerLink
from mesh.adapters.mqtt.session import LinkState, MqttSession, OnMessage
from mesh.core.topics import Topics
from mesh.pki import NodeCredentials, load_node, server_ssl_context
from tests.integration.conftest import CLUSTER, Pki, until

pytestmark = pytest.mark.integration

ALPHA, BRAVO = "alpha", "bravo"
ALPHA_HOST, BRAVO_HOST = "127.0.0.1", "127.0.0.2"
LINKS_LOG = "mesh.adapters.mqtt.session"
FAST = LinkSettings(liveness_s=1.5, backoff_min=0.1, backoff_max=1.0, connect_timeout=2.0)


# --- helpers -------------------------------------------------------------------------------


@asynccontextmanager
async def serving(
    creds: NodeCredentials, host: str, port: int = 0
) -> AsyncIterator[EmbeddedBroker]:
    broker = EmbeddedBroker(BrokerSettings(creds, host=host, port=port))
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


@asynccontextmanager
async def running(*sessions: MqttSession) -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks = [asyncio.create_task(s.run()) for s in sessions]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Inbox:
    """What one session's on_message was handed, optionally only for some topics."""

    topics: tuple[str, ...] = ()
    messages: list[tuple[str, bytes]] = field(default_factory=list)

    async def __call__(self, topic: str, payload: bytes) -> None:
        if not self.topics or topic in self.topics:
            self.messages.append((topic, payload))

    @property
    def payloads(self) -> list[bytes]:
        return [payload for _, payload in self.messages]


async def ignore(topic: str, payload: bytes) -> None:
    pass


def own_client(
    cluster_pki: Pki, node: str, broker: EmbeddedBroker, on_request: OnMessage = ignore
) -> OwnClient:
    host, port = broker.address
    return OwnClient(
        creds=cluster_pki.creds(node), host=host, port=port, on_request=on_request, settings=FAST
    )


def link_to(
    cluster_pki: Pki,
    address: tuple[str, int],
    on_message: Inbox,
    node: str = ALPHA,
    expect_peer: str | None = None,
    settings: LinkSettings = FAST,
    deaf_after: float = DEAF_AFTER,
) -> PeerLink:
    return PeerLink(
        creds=cluster_pki.creds(node),
        host=address[0],
        port=address[1],
        on_message=on_message,
        settings=settings,
        rng=random.Random(7),
        expect_peer=expect_peer,
        deaf_after=deaf_after,
    )


def link_lines(caplog: pytest.LogCaptureFixture, *parts: str) -> list[str]:
    return [
        line
        for line in (r.getMessage() for r in caplog.records if r.name == LINKS_LOG)
        if all(part in line for part in parts)
    ]


@asynccontextmanager
async def heartbeat(own: OwnClient, every: float = 0.5) -> AsyncIterator[None]:
    """Publish a head every ``every`` seconds while the body runs, as the agent does."""

    async def beat() -> None:
        seq = 0
        while True:
            with contextlib.suppress(LinkDown):
                await own.publish(own.topics.head, str(seq).encode(), qos=0)
                seq += 1
            await asyncio.sleep(every)  # the cadence under test, not a wait for an outcome

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class SilentProxy:
    """A TCP proxy on 127.0.0.1 that can stop forwarding both ways while keeping every
    socket open: what a link sees when a route or a peer's host goes silent."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.forwarding = asyncio.Event()
        self.forwarding.set()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def __aenter__(self) -> SilentProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        writers = [writer]
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
            writers.append(upstream_writer)
            pumps = [
                asyncio.create_task(self._pump(reader, upstream_writer)),
                asyncio.create_task(self._pump(upstream_reader, writer)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except OSError:
            pass
        finally:
            for each in writers:
                each.transport.abort()
            self._handlers.discard(task)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            await self.forwarding.wait()  # hold what was read: nothing passes, nothing closes
            sink.write(data)
            await sink.drain()


# --- delivery ------------------------------------------------------------------------------


async def test_link_receives_10000_manifests_exactly_once_in_order(cluster_pki: Pki) -> None:
    count = 10_000
    manifest = Topics(CLUSTER, BRAVO).manifest
    inbox = Inbox((manifest,))
    payloads = [f"{i:08d}".encode() + b"m" * 192 for i in range(count)]
    async with serving(cluster_pki.creds(BRAVO), BRAVO_HOST) as broker:
        own = own_client(cluster_pki, BRAVO, broker)
        link = link_to(cluster_pki, broker.address, inbox, expect_peer=BRAVO)
        async with running(own, link):
            await own.wait_up(5)
            await link.wait_up(5)
            loop = asyncio.get_running_loop()
            started = loop.time()
            for payload in payloads:
                await own.publish(own.topics.manifest, payload, qos=1)
            await until(lambda: len(inbox.messages) >= count, f"{count} manifests", within=40)
            elapsed = loop.time() - started
            # A duplicate or a late message would arrive before this one.
            await own.publish(own.topics.manifest, b"end", qos=1)
            await until(lambda: inbox.payloads[-1:] == [b"end"], "the end marker")
            assert inbox.payloads == [*payloads, b"end"]
            print(f"\n{count} QoS 1 messages of 200 B: {elapsed:.2f} s, {count / elapsed:.0f}/s")
            assert own.status.dropped == 0
            assert link.status.reconnects == 0 and own.status.reconnects == 0
            assert link.status.last_message is not None


async def test_requests_reach_the_owner_and_responses_the_peer(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    owner_topics = Topics(CLUSTER, ALPHA)
    requests = Inbox()
    responses = Inbox((owner_topics.resp(BRAVO),))

    async def serve_requests(topic: str, payload: bytes) -> None:
        await requests(topic, payload)
        if payload == b"boom":
            raise RuntimeError("a handler bug")  # must not take the session down

    async with serving(cluster_pki.creds(ALPHA), ALPHA_HOST) as broker:
        own = own_client(cluster_pki, ALPHA, broker, on_request=serve_requests)
        peer = link_to(cluster_pki, broker.address, responses, node=BRAVO)
        async with running(own, peer):
            await own.wait_up(5)
            await peer.wait_up(5)
            assert peer.status.peer_id == ALPHA
            await peer.request(b"boom")
            await peer.request(b"digest?")
            await until(lambda: len(requests.messages) == 2, "two requests at the owner")
            assert requests.messages == [
                (owner_topics.req(BRAVO), b"boom"),
                (owner_topics.req(BRAVO), b"digest?"),
            ]
            assert link_lines(caplog, "link own broker: handling a message on", "failed")
            await own.respond(BRAVO, b"digest!")
            await until(lambda: bool(responses.messages), "the response at the peer")
            assert responses.payloads == [b"digest!"]
            assert own.status.state is LinkState.UP and own.status.reconnects == 0


async def test_a_slow_consumer_pauses_reading_and_is_not_taken_for_a_silent_link(
    cluster_pki: Pki,
) -> None:
    manifest = Topics(CLUSTER, BRAVO).manifest
    inbox = Inbox((manifest,))
    release = asyncio.Event()

    async def slow(topic: str, payload: bytes) -> None:
        await release.wait()
        await inbox(topic, payload)

    payloads = [b"%03d" % i for i in range(200)]
    settings = replace(FAST, max_inbound=10)
    async with serving(cluster_pki.creds(BRAVO), BRAVO_HOST) as broker:
        own = own_client(cluster_pki, BRAVO, broker)
        link = PeerLink(
            creds=cluster_pki.creds(ALPHA),
            host=broker.address[0],
            port=broker.address[1],
            on_message=slow,
            settings=settings,
        )
        async with running(own, link):
            await own.wait_up(5)
            await link.wait_up(5)
            for payload in payloads:
                await own.publish(own.topics.manifest, payload, qos=1)
            await until(lambda: link._conn is not None and link._conn.paused, "reading to pause")
            # Nothing is read while paused: that must not count as the link's silence.
            await asyncio.sleep(settings.liveness_s * 1.5)  # time passing is the condition
            assert link.status.state is LinkState.UP
            release.set()
            await until(lambda: len(inbox.messages) == len(payloads), "every manifest")
            assert inbox.payloads == payloads
            assert link.status.reconnects == 0


# --- reconnects and liveness -----------------------------------------------------------------


async def test_link_reconnects_with_backoff_and_resubscribes_after_a_broker_restart(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LINKS_LOG)
    creds = cluster_pki.creds(BRAVO)
    inbox = Inbox((Topics(CLUSTER, BRAVO).manifest,))
    loop = asyncio.get_running_loop()
    async with serving(creds, BRAVO_HOST) as first:
        address = first.address
        own = own_client(cluster_pki, BRAVO, first)
        link = link_to(cluster_pki, address, inbox, expect_peer=BRAVO)
        async with running(own, link):
            await own.wait_up(5)
            await link.wait_up(5)
            await own.publish(own.topics.manifest, b"before", qos=1)
            await until(lambda: inbox.payloads == [b"before"], "the first manifest")

            await first.stop()
            await until(lambda: link.status.state is not LinkState.UP, "the link to drop")
            down_at, attempts = loop.time(), link.status.attempts
            await until(lambda: link.status.attempts >= attempts + 5, "five retries", within=10)
            elapsed = loop.time() - down_at
            # Four of the five waits follow a failed attempt: each is at least backoff_min.
            # A retry loop without backoff makes five attempts in a few milliseconds.
            assert elapsed >= 4 * FAST.backoff_min, elapsed
            assert len(link_lines(caplog, f"link {BRAVO}: down (connect:")) == 1

            async with serving(creds, *address):
                await own.wait_up(FAST.backoff_max + 5)
                await link.wait_up(FAST.backoff_max + 5)
                outage = loop.time() - down_at
                retries = link.status.attempts - attempts
                # Every retry but the first waits at least backoff_min.
                assert retries <= outage / FAST.backoff_min + 1, (retries, outage)
                await own.publish(own.topics.manifest, b"after", qos=1)
                await until(lambda: inbox.payloads == [b"before", b"after"], "a manifest again")
                assert link.status.reconnects == 1
    assert link_lines(caplog, f"link {BRAVO}: down (closed by the broker)")
    assert len(link_lines(caplog, f"link {BRAVO}: up")) == 2


async def test_a_silent_link_is_dropped_and_reconnects(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    head = Topics(CLUSTER, BRAVO).head
    heads = Inbox((head,))
    loop = asyncio.get_running_loop()
    async with serving(cluster_pki.creds(BRAVO), BRAVO_HOST) as broker:
        own = own_client(cluster_pki, BRAVO, broker)
        async with SilentProxy(broker.address) as proxy, running(own), heartbeat(own):
            link = link_to(cluster_pki, proxy.address, heads, expect_peer=BRAVO)
            async with running(link):
                await link.wait_up(5)
                await until(lambda: bool(heads.messages), "a head through the proxy")

                proxy.forwarding.clear()
                blocked_at = loop.time()
                await until(
                    lambda: link.status.state is not LinkState.UP,
                    "the silent link to drop",
                    within=FAST.liveness_s + 2,
                )
                detected = loop.time() - blocked_at
                assert detected <= FAST.liveness_s + 1.0, detected
                assert link_lines(caplog, f"link {BRAVO}: down (silent for")

                received = len(heads.messages)
                proxy.forwarding.set()
                await link.wait_up(FAST.connect_timeout + FAST.backoff_max + 2)
                await until(lambda: len(heads.messages) > received, "heads again")
                assert link.status.reconnects >= 1


async def test_a_held_event_loop_is_not_taken_for_the_silence_of_its_links(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 16: among ten agents on two cores, most dropped links were the dropping
    node's own doing: its event loop was held for seconds, the silence checks ran before
    the reader had taken what waited in the socket, and the broker cut its clients the
    same way. Here the one loop that runs the broker and both clients is held longer than
    the link's liveness and the broker's keep-alive cut; afterwards every connection is
    still the one from before, and the hold is logged."""
    caplog.set_level(logging.INFO)
    heads = Inbox((Topics(CLUSTER, BRAVO).head,))
    async with serving(cluster_pki.creds(BRAVO), BRAVO_HOST) as broker:
        own = own_client(cluster_pki, BRAVO, broker)
        link = link_to(cluster_pki, broker.address, heads, expect_peer=BRAVO)
        async with running(own, link):
            await own.wait_up(5)
            await link.wait_up(5)
            async with heartbeat(own, every=0.1):
                await until(lambda: len(heads.messages) >= 5, "heads")
                broker_cut = 1.5 * FAST.keep_alive  # MQTT-3.1.2-24
                time.sleep(max(broker_cut, FAST.liveness_s) + 1.0)  # noqa: ASYNC251 (the hold)
                received = len(heads.messages)
                await until(lambda: len(heads.messages) >= received + 20, "heads after it")
            assert link.status.reconnects == 0 and own.status.reconnects == 0
            lines = [r.getMessage() for r in caplog.records]
            assert not [line for line in lines if "silent for" in line], lines
            assert [line for line in lines if "event loop was held for" in line]


async def test_a_link_that_hands_on_no_message_is_reconnected_and_one_that_does_is_kept(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 16: among ten nodes, two peer links came back up after a reconnect with
    nothing behind them: no message for 1,000 s, MQTT's keepalive holding them up. A
    peer's heads come every second; a link that hands on none for ``deaf_after`` is
    reconnected. Here bravo's heads stop and start again."""
    head = Topics(CLUSTER, BRAVO).head
    heads = Inbox((head,))
    async with serving(cluster_pki.creds(BRAVO), BRAVO_HOST) as broker:
        own = own_client(cluster_pki, BRAVO, broker)
        link = link_to(cluster_pki, broker.address, heads, expect_peer=BRAVO, deaf_after=1.0)
        async with running(own, link):
            await own.wait_up(5)
            await link.wait_up(5)
            async with heartbeat(own, every=0.1):
                # Heads flowing: the link stays, for several times deaf_after.
                await until(lambda: len(heads.messages) >= 40, "40 heads")
                assert link.status.reconnects == 0 and not link_lines(caplog, "deaf")
            # No head any more: the link is taken for deaf and made again.
            await until(lambda: link.status.reconnects >= 1, "the deaf link reconnected",
                        within=10)
            assert link_lines(caplog, f"link {BRAVO}: down (deaf: no message for 1 s)")
            await link.wait_up(5)
            received = len(heads.messages)
            async with heartbeat(own, every=0.1):
                await until(lambda: len(heads.messages) > received, "heads again")


# --- refusals ------------------------------------------------------------------------------


async def test_a_link_that_leads_to_itself_closes_as_self(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(cluster_pki.creds(ALPHA), ALPHA_HOST) as broker:
        host, port = broker.address
        link = link_to(cluster_pki, (host, port), Inbox())
        async with running(link) as (task,):
            await asyncio.wait_for(task, 5)  # run() returns by itself: no retry storm
            status = link.status
            assert status.state is LinkState.CLOSED
            assert status.last_error == "self"
            assert status.attempts == 1 and status.connected_since is None
            with pytest.raises(LinkDown, match="self"):
                await link.wait_up(1)
    assert link_lines(caplog, f"link {host}:{port}: closed (self")


async def test_a_peer_with_a_certificate_from_another_ca_is_refused(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    impostor = load_node(cluster_pki.foreign, BRAVO)
    async with serving(impostor, BRAVO_HOST) as broker:
        link = link_to(cluster_pki, broker.address, Inbox(), expect_peer=BRAVO)
        async with running(link):
            await until(lambda: link.status.attempts >= 3, "three attempts")
            assert link.status.state is not LinkState.UP
            assert link.status.reconnects == 0
            lines = link_lines(caplog, f"link {BRAVO}: refused (TLS: certificate verify failed")
            assert len(lines) == 1, lines  # one line, not one per attempt
            with pytest.raises(LinkDown, match="certificate verify failed"):
                await link.publish(Topics(CLUSTER, BRAVO).req(ALPHA), b"x")


async def test_a_peer_other_than_the_expected_one_is_refused(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(cluster_pki.creds("charlie"), BRAVO_HOST) as broker:
        link = link_to(cluster_pki, broker.address, Inbox(), expect_peer=BRAVO)
        async with running(link):
            await until(lambda: bool(link_lines(caplog, "refused")), "a refusal")
            host, port = broker.address
            assert link_lines(
                caplog, f"link {BRAVO}: refused (the server at {host}:{port} is charlie, not bravo)"
            )
            assert link.status.state is not LinkState.UP


async def test_a_broker_sending_reserved_packets_is_dropped_with_one_line(
    cluster_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 13: a certified peer's broker answering with 1.2 MB of zeros (600,000 reserved
    packets) made amqtt's client log a line per packet. The link drops at the first."""
    caplog.set_level(logging.INFO)
    sent = asyncio.Event()

    async def hostile(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(2)  # CONNECT's fixed header (a short CONNECT)
        await reader.read(4096)
        writer.write(b"\x20\x02\x00\x00")  # CONNACK, accepted
        subscribe = await reader.read(4096)
        packet_id = subscribe[2:4] if len(subscribe) >= 4 else b"\x00\x01"
        writer.write(b"\x90\x06" + packet_id + b"\x01\x01\x01\x01")  # SUBACK, 4 topics
        writer.write(bytes(1_200_000))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        sent.set()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(hostile, BRAVO_HOST, 0,
                                        ssl=server_ssl_context(cluster_pki.creds(BRAVO)))
    async with server:
        address = server.sockets[0].getsockname()[:2]
        link = link_to(cluster_pki, address, Inbox(), expect_peer=BRAVO)
        async with running(link):
            await until(lambda: bool(link_lines(caplog, "reserved packet type 0")),
                        "the link to drop the hostile broker", within=10)
            await sent.wait()
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING
             and (r.name.startswith("amqtt") or "reserved packet" in r.getMessage())]
    assert len(lines) <= 3, [r.getMessage() for r in lines[:5]]
