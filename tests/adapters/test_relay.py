"""The push relay (mesh/adapters/rsync/relay.py) on real sockets, on asyncio's loop and uvloop:
bytes in order, nothing lost before a side is attached, and a slow sink holding its
source back instead of the agent buffering a whole file."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from mesh.adapters.rsync import relay

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(loop: str, main: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(main(), 30))


async def attach(end: relay.End) -> socket.socket:
    """``end`` on one side of a socketpair; the other side, blocking, for the test."""
    ours, theirs = socket.socketpair()
    await asyncio.get_running_loop().create_connection(lambda: end, sock=ours)
    theirs.setblocking(False)
    return theirs


async def until(cond: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):  # bounded in count, and so in time
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")


def shut(socks: list[socket.socket], ends: list[relay.End]) -> None:
    for sock in socks:
        sock.close()
    for end in ends:
        end.abort()


async def read_all(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < size:
        chunk = await loop.sock_recv(sock, 1 << 16)
        if not chunk:
            break
        got += chunk
    return bytes(got)


@pytest.mark.parametrize("loop", LOOPS)
def test_bytes_cross_both_ways_in_order(loop: str) -> None:
    async def main() -> None:
        a, b = relay.End(half_close=True), relay.End(half_close=True)
        relay.join(a, b)
        left, right = await attach(a), await attach(b)
        there, back = os.urandom(3 << 20), os.urandom(1 << 20)
        ev = asyncio.get_running_loop()
        sends = asyncio.gather(ev.sock_sendall(left, there), ev.sock_sendall(right, back))
        got_there, got_back = await asyncio.gather(read_all(right, len(there)),
                                                   read_all(left, len(back)))
        await sends
        assert got_there == there and got_back == back
        left.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(a.read_done, 10)
        shut([left, right], [a, b])

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_what_arrives_before_the_other_side_is_attached_is_held(loop: str) -> None:
    async def main() -> None:
        source, sink = relay.End(), relay.End()
        relay.link(source, sink)
        left = await attach(source)
        await asyncio.get_running_loop().sock_sendall(left, b"@RSYNCD: 32.0\n")
        await until(lambda: bool(source.held), "the source to read (and hold) it")
        right = await attach(sink)
        assert await read_all(right, 14) == b"@RSYNCD: 32.0\n"
        assert not source.held
        shut([left, right], [source, sink])

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_sink_that_does_not_read_pauses_its_source(loop: str) -> None:
    async def main() -> None:
        source, sink = relay.End(), relay.End()
        relay.join(source, sink)
        left, right = await attach(source), await attach(sink)
        ev = asyncio.get_running_loop()
        sending = asyncio.ensure_future(ev.sock_sendall(left, os.urandom(64 << 20)))
        await until(lambda: source.transport is not None and not source.transport.is_reading(),
                    "the source to stop reading")
        assert sink.transport is not None
        held_back = sink.transport.get_write_buffer_size()
        assert held_back < 8 * relay.HIGH_WATER, held_back  # not the whole 64 MiB
        assert not sending.done()  # the sender is held back by the sockets' own buffers
        got = await read_all(right, 64 << 20)  # the sink drains: everything arrives
        await sending
        assert len(got) == 64 << 20
        shut([left, right], [source, sink])

    run(loop, main)
