"""The connections of the agent's servers (``mesh.adapters.streams``): none is left
open at a stop, whatever the stop interrupted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from mesh.adapters.streams import Connections


def run(body: Coroutine[Any, Any, None]) -> None:
    """No pytest-asyncio: the body runs under ``asyncio.run``, with a deadline."""
    asyncio.run(asyncio.wait_for(body, 30))


@asynccontextmanager
async def connection() -> AsyncIterator[asyncio.StreamWriter]:
    """Our end of a connection to a server on 127.0.0.1; the server's end, and the
    server, are closed when the block ends."""
    theirs: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda _, w: theirs.append(w), "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        _, writer = await asyncio.open_connection(host, port)
        yield writer
    finally:
        for end in theirs:
            end.transport.abort()
        server.close()
        await server.wait_closed()


def test_a_connection_whose_handler_never_began_is_closed_at_the_stop() -> None:
    """A stop right after an accept cancels the handler before it ran: its ``finally``
    never closes the connection, so the connections' close does."""
    run(never_began())


def test_a_connection_its_handler_closed_is_left_as_it_is() -> None:
    run(closed_by_its_handler())


async def never_began() -> None:
    async with connection() as writer:
        ran: list[bool] = []

        async def handler() -> None:
            ran.append(True)
            writer.close()

        connections = Connections("test", 4)
        connections.serve(writer, handler)
        await connections.close()  # no turn of the loop between: the handler never began
        assert ran == []
        assert writer.transport.is_closing()


async def closed_by_its_handler() -> None:
    async with connection() as writer:
        connections = Connections("test", 4)

        async def handler() -> None:
            writer.close()
            await writer.wait_closed()

        connections.serve(writer, handler)
        await connections.close(grace=5)
        assert writer.transport.is_closing()
