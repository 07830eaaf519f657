"""Frames over asyncio streams, and the agent's unix-socket servers (the control socket,
the gate): listening with mode 0600, a bounded set of connections, a clean stop. A frame
is ``mesh.frames``' (4-byte big-endian length, msgpack); this is its asyncio side."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import stat
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from mesh.core.manifest import unpack
from mesh.errors import ConfigError, RemoteProtocolError
from mesh.frames import FRAME

LOG = logging.getLogger(__name__)


async def read_frame(reader: asyncio.StreamReader, limit: int) -> Any:
    """One frame, decoded; ``RemoteProtocolError`` if it is cut short, too big or garbage."""
    try:
        (length,) = FRAME.unpack(await reader.readexactly(FRAME.size))
        if length > limit:
            raise RemoteProtocolError(f"frame of {length} bytes exceeds {limit}")
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise RemoteProtocolError("stream ended inside a frame") from None
    return unpack(body, max_bytes=limit)


class Connections:
    """The tasks serving one server's accepted connections, at most ``limit`` at once."""

    def __init__(self, what: str, limit: int) -> None:
        self.what, self.limit = what, limit
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def serve(
        self, writer: asyncio.StreamWriter, handler: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        """Run ``handler()`` for the connection of ``writer``, or drop it when full."""
        if len(self._tasks) >= self.limit:
            LOG.warning("%s: dropped a connection: %d open, the limit", self.what, self.limit)
            writer.transport.abort()
            return
        self.spawn(handler).add_done_callback(lambda _: _abort_open(writer))

    def spawn(self, handler: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.Task[None]:
        """A task for ``handler()``. Cancelled before it began (a stop right after the
        accept), its handler never runs: what it was to close, the caller closes when
        the task is done."""
        task = asyncio.create_task(handler())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self, grace: float = 0.0) -> None:
        """Let the handlers finish for ``grace`` seconds, then cancel the rest."""
        if self._tasks and grace > 0:
            await asyncio.wait(self._tasks, timeout=grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _abort_open(writer: asyncio.StreamWriter) -> None:
    """A connection whose handler is done and left it open (it never ran): abort it."""
    if not writer.transport.is_closing():
        writer.transport.abort()


async def close_stream(writer: asyncio.StreamWriter, within: float = 5.0) -> None:
    """Close after the last bytes went out (``abort`` would drop what is still buffered,
    such as the daemon's final error message); abort if the peer does not take them, or
    if the wait is cancelled (a server's stop): a TLS close left waiting for the peer's
    answer would hold the socket open for the TLS shutdown's own timeout (30 s), or
    leave it to the garbage collector once the loop is gone."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), within)
    except (OSError, TimeoutError):
        writer.transport.abort()
    except asyncio.CancelledError:
        writer.transport.abort()
        raise


async def start_unix_server(
    path: Path, what: str, accepted: Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]
) -> asyncio.AbstractServer:
    """Listen on the unix socket ``path``, mode 0600 (only this node's own processes may
    ask), in place of one an agent that did not stop cleanly left; ``ConfigError`` (one
    line naming ``what``) if that cannot be done."""
    _remove_socket(path, what)
    try:
        server = await asyncio.start_unix_server(accepted, str(path))
        _owner_only(path)
    except OSError as err:
        raise ConfigError(f"{what} socket {path}: {err.strerror or err}") from err
    return server


async def stop_unix_server(
    server: asyncio.AbstractServer, connections: Connections, path: Path
) -> None:
    """Stop listening, end the connections being served, remove the socket."""
    server.close()
    await connections.close()
    await server.wait_closed()
    _unlink(path)


def _remove_socket(path: Path, what: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"{what} socket {path} exists and is not a socket")
    _unlink(path)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _owner_only(path: Path) -> None:
    path.chmod(0o600)
