"""Accepting TLS connections so that every refusal can be logged, on any event loop.

asyncio's own TLS servers log a failed handshake only in debug mode, and
upgrading an accepted stream with ``StreamWriter.start_tls`` hangs under uvloop
when the client's first handshake bytes are read before the upgrade (seen in
the tunnel: a push stalled for the whole handshake timeout). So listeners
accept raw sockets and run the handshake with ``loop.connect_accepted_socket``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Self

from mesh.errors import ConfigError, LocalProtocolError

LOG = logging.getLogger(__name__)
ACCEPT_RETRY_S = 1.0  # asyncio's own servers pause as long (constants.ACCEPT_RETRY_DELAY)


class Listener:
    """What a TLS server of the agent shares (the broker, the tunnel): the address it
    bound, and ``async with`` for ``start`` and ``stop``."""

    what = "server"  # how errors name it
    _socket: socket.socket | None = None
    _accepting: asyncio.Task[None] | None = None  # accept_forever on _socket

    @property
    def address(self) -> tuple[str, int]:
        """The address actually bound (port 0 picks a free port)."""
        if self._socket is None:
            raise LocalProtocolError(f"the {self.what} is not running")
        host, port = self._socket.getsockname()[:2]
        return str(host), int(port)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def close_listener(self) -> bool:
        """Stop accepting and close the listening socket; False if it was not open."""
        sock, self._socket = self._socket, None
        if sock is None:
            return False
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        sock.close()
        return True


def bind(host: str, port: int) -> socket.socket:
    """A listening, non-blocking socket; ``ConfigError`` (one line) if it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=128)
    except OSError as err:
        raise ConfigError(f"listen on {host}:{port}: {err.strerror or err}") from err
    sock.setblocking(False)
    return sock


async def open_tls(
    client: socket.socket, tls: ssl.SSLContext, handshake_timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | str:
    """The handshake on an accepted socket: the streams, or why it was refused
    (the socket is closed then)."""
    loop = asyncio.get_running_loop()
    # An accepted socket of ours is not from getaddrinfo (proto 0): asyncio leaves Nagle
    # on (uvloop does not), and each small message would wait for the previous ACK.
    with contextlib.suppress(OSError):
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = asyncio.StreamReader(limit=1 << 20)  # a push's bytes: fewer, larger reads
    protocol = asyncio.StreamReaderProtocol(reader)
    try:
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol, client, ssl=tls, ssl_handshake_timeout=handshake_timeout
        )
    except ssl.SSLCertVerificationError as err:
        why = f"TLS: certificate verify failed: {err.verify_message}"
    except ssl.SSLError as err:
        why = "TLS: " + str(err.reason or err).replace("_", " ").lower()
    except (OSError, TimeoutError) as err:
        why = f"TLS handshake: {err or type(err).__name__}"
    else:
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)
    client.close()
    return why


async def accept_forever(
    sock: socket.socket, what: str, on_client: Callable[[socket.socket, tuple[str, int]], None]
) -> None:
    """Hand every accepted, non-blocking client to ``on_client`` until cancelled. Out of
    file descriptors (most likely, when accept fails): pause and retry rather than die."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            client, addr = await loop.sock_accept(sock)
        except OSError as err:
            LOG.warning("%s: accept: %s", what, err)
            await asyncio.sleep(ACCEPT_RETRY_S)
            continue
        client.setblocking(False)
        on_client(client, (str(addr[0]), int(addr[1])))
