"""The sending rsync's loopback connection (``mesh.adapters.rsync.loopback``): the agent
takes it only from the socket its own child holds."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Coroutine
from typing import Any

import pytest
import uvloop

from mesh.adapters import spawn
from mesh.adapters.rsync import loopback

ENV = {"PATH": os.environ.get("PATH", os.defpath)}
# A child that connects to the port it is given, says who it is, and waits to be let go.
CONNECT = ("import socket, sys; s = socket.create_connection(('127.0.0.1', int(sys.argv[1])));"
           " s.sendall(b'child'); s.recv(1)")


def run(main: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main, 30))


def test_the_kernel_names_the_socket_at_the_other_end() -> None:
    with loopback.listen() as listener:
        listener.setblocking(True)
        with socket.create_connection(listener.getsockname()) as client:
            conn, _ = listener.accept()
            with conn:
                inode = loopback.peer_inode(conn)
                assert inode == os.fstat(client.fileno()).st_ino
                assert loopback.holds_socket(os.getpid(), inode)
                elsewhere = os.fstat(conn.fileno()).st_ino + 10**9
                assert not loopback.holds_socket(os.getpid(), elsewhere)


def test_a_stranger_that_connects_first_is_closed_and_the_child_taken() -> None:
    async def main() -> None:
        listener = loopback.listen()
        port = listener.getsockname()[1]
        stranger = socket.create_connection((loopback.HOST, port))  # queued before the child
        child = await spawn.start([sys.executable, "-c", CONNECT, str(port)], env=ENV,
                                  stderr=spawn.DEVNULL)
        exited = asyncio.ensure_future(child.wait())
        conn = await loopback.accept_from(listener, child.pid, exited, "test")
        assert conn is not None
        assert await asyncio.get_running_loop().sock_recv(conn, 5) == b"child"
        assert stranger.recv(1) == b""  # closed by the agent
        conn.close()
        assert await exited == 0
        stranger.close()
        listener.close()

    run(main())


def test_a_child_that_exits_without_connecting_gives_none() -> None:
    async def main() -> None:
        listener = loopback.listen()
        child = await spawn.start(["sh", "-c", "exit 3"], env=ENV, stderr=spawn.DEVNULL)
        exited = asyncio.ensure_future(child.wait())
        assert await loopback.accept_from(listener, child.pid, exited, "test") is None
        assert await exited == 3
        listener.close()

    run(main())


def test_no_connection_within_the_limit_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loopback, "ACCEPT_S", 0.2)

    async def main() -> None:
        listener = loopback.listen()
        never: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        assert await loopback.accept_from(listener, os.getpid(), never, "test") is None
        listener.close()

    run(main())
