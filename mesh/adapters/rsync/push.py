"""The sending side of a push (docs/DESIGN.md, "Data plane"; ``mesh.adapters.rsync.tunnel``,
the receiving side, has the protocol): rsync sends some paths of the data folder to one
peer through the TLS tunnel.

Every push runs here, whichever way it started (a batch of lsyncd's that the gate let
through, or the agent's own pusher): ``push`` gives the caller rsync's exit status, or a
``TunnelError`` with the receiver's reason when the push could not start. ``open_push``
connects, checks the peer's identity, sends the header (``PushHello``) and waits for the
go-ahead; the TLS end then runs in the agent's event loop, and rsync connects to it over
loopback TCP (``loopback``): a push starts rsync and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.adapters import spawn
from mesh.adapters.rsync import loopback, relay, rsyncd
from mesh.adapters.streams import read_frame
from mesh.core.paths import is_normalized
from mesh.core.vclock import NODE_ID_RE
from mesh.errors import LocalProtocolError, MeshError, PkiError, RemoteProtocolError
from mesh.frames import MAX_HEADER_BYTES, encode_frame
from mesh.pki.tls import ClientContexts, NodeCredentials, identity_from_peercert

LOG = logging.getLogger("mesh.push")

VERSION = 1
_MAX_REPLY_BYTES = 64 * 1024
_BUFFER = 1 << 20  # a push stream's read-ahead, until the relay takes it over
_CONTEXTS = ClientContexts()


class TunnelError(MeshError):
    """A push could not be set up: connection, TLS, identity, or the receiver refused."""


def _check_version(message: Any, keys: set[str]) -> dict[str, Any]:
    if not isinstance(message, dict) or message.get("v") != VERSION:
        raise RemoteProtocolError(f"not a version {VERSION} tunnel message")
    if set(message) != keys:
        raise RemoteProtocolError(f"fields {sorted(message)} instead of {sorted(keys)}")
    return message


@dataclass(frozen=True)
class PushHello:
    """The first frame of a push."""

    push_id: str
    header: bytes

    def __post_init__(self) -> None:
        if not rsyncd.valid_push_id(self.push_id):
            raise LocalProtocolError(f"invalid push id {self.push_id!r}")
        if not isinstance(self.header, bytes) or len(self.header) > MAX_HEADER_BYTES:
            raise LocalProtocolError(f"push header must be at most {MAX_HEADER_BYTES} bytes")

    def encode(self) -> bytes:
        return encode_frame({"v": VERSION, "push": self.push_id, "header": self.header})

    @classmethod
    def decode(cls, message: Any) -> PushHello:
        fields = _check_version(message, {"v", "push", "header"})
        push_id, header = fields["push"], fields["header"]
        if not rsyncd.valid_push_id(push_id):
            raise RemoteProtocolError(f"invalid push id {str(push_id)[:80]!r}")
        if not isinstance(header, bytes):
            raise RemoteProtocolError("push header is not bytes")
        return cls(push_id, header)


async def open_push(
    creds: NodeCredentials,
    host: str,
    port: int,
    peer: str,
    hello: PushHello,
    *,
    within: float = 10.0,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``peer``'s tunnel, check that it is ``peer``, send the header and wait
    for the go-ahead. Returns the stream that then carries rsync's daemon protocol."""
    where = f"push {hello.push_id} to {peer} at {host}:{port}"
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=_CONTEXTS.get(creds), limit=_BUFFER)
    except ssl.SSLCertVerificationError as err:
        raise TunnelError(f"{where}: certificate verify failed: {err.verify_message}") from None
    except (OSError, TimeoutError) as err:
        raise TunnelError(f"{where}: connect: {err or type(err).__name__}") from None
    try:
        found = identity_from_peercert(writer.get_extra_info("peercert"),
                                       creds.identity.cluster).node
        if found != peer:
            raise TunnelError(f"{where}: the certificate is {found}'s")
        writer.write(hello.encode())
        async with asyncio.timeout(within):
            await writer.drain()
            reply = await read_frame(reader, _MAX_REPLY_BYTES)
        if not isinstance(reply, dict) or reply.get("v") != VERSION:
            raise TunnelError(f"{where}: malformed reply to the push header")
        if reply.get("ok") is not True:
            raise TunnelError(f"{peer} refused push {hello.push_id}: "
                              f"{str(reply.get('error'))[:500]}")
    except TimeoutError:
        writer.transport.abort()
        raise TunnelError(f"{where}: no answer within {within:g} s") from None
    except (OSError, PkiError, RemoteProtocolError) as err:
        writer.transport.abort()
        raise TunnelError(f"{where}: {err}") from None
    except BaseException:
        writer.transport.abort()
        raise
    return reader, writer


# --- the push: rsync through the tunnel --------------------------------------------------

LINGER_S = 30.0  # after rsync exits, for the receiver to close


@dataclass(frozen=True)
class PushOrder:
    """Push ``paths`` to ``peer``, whose tunnel listens on ``host:port``, as push
    ``push_id``; ``header`` is the announcement the receiving agent gets before any
    data lands."""

    peer: str
    host: str
    port: int
    push_id: str
    paths: tuple[str, ...]
    header: bytes

    def __post_init__(self) -> None:
        if NODE_ID_RE.fullmatch(self.peer) is None:
            raise LocalProtocolError(f"push: invalid peer {self.peer!r}")
        if not self.host or "/" in self.host:
            raise LocalProtocolError(f"push: invalid host {self.host!r}")
        if not 0 < self.port < 65536:
            raise LocalProtocolError(f"push: invalid port {self.port!r}")
        if not rsyncd.valid_push_id(self.push_id):
            raise LocalProtocolError(f"push: invalid push id {self.push_id!r}")
        if not all(map(is_normalized, self.paths)):
            raise LocalProtocolError("push: paths must be normalized")
        if len(self.header) > MAX_HEADER_BYTES:
            raise LocalProtocolError(f"push: header over {MAX_HEADER_BYTES} bytes")


async def push(
    order: PushOrder,
    data_dir: Path,
    creds: NodeCredentials,
    *,
    keep_name: str = rsyncd.DEFAULT_KEEP_NAME,
    rsync: str = rsyncd.RSYNC,
) -> int:
    """Push ``order.paths`` from ``data_dir`` to the peer; rsync's exit status. rsync and
    its remote shell run in a process group of their own, killed as one if the push is
    cancelled."""
    if not order.paths:
        return 0
    where = f"push {order.push_id} of {len(order.paths)} path(s) to {order.peer}"
    LOG.debug("%s: starting", where)
    patterns = rsyncd.include_patterns(order.paths, data_dir)
    stdin = b"\0".join(map(os.fsencode, patterns))
    env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"}
    try:
        returncode, errors = await _push(order, data_dir, creds, keep_name, rsync, env, stdin)
    except OSError as err:
        raise MeshError(f"{where}: {err.strerror or err}") from err
    level = logging.DEBUG if returncode == 0 else logging.WARNING
    LOG.log(level, "%s: rsync exit %d", where, returncode)
    for line in errors.decode("utf-8", "backslashreplace").splitlines() if returncode else ():
        LOG.warning("%s: %s", where, line)
    return returncode


async def _push(
    order: PushOrder,
    data_dir: Path,
    creds: NodeCredentials,
    keep_name: str,
    rsync: str,
    env: dict[str, str],
    stdin: bytes,
) -> tuple[int, bytes]:
    def argv(port: int) -> list[str]:
        return rsyncd.client_argv(data_dir, port, keep_name, order.push_id, rsync=rsync)

    return await tunnelled(order, creds, argv, stdin, env)


async def tunnelled(
    order: PushOrder,
    creds: NodeCredentials,
    argv: Callable[[int], list[str]],
    stdin: bytes,
    env: dict[str, str],
) -> tuple[int, bytes]:
    """Open the tunnel for ``order`` (its header announced, the go-ahead received), then
    run the rsync command line ``argv(port)`` and relay the connection it makes to the
    loopback ``port`` through the tunnel (``loopback``); its exit status and stderr.
    ``push`` gives the only command line the agent runs; tests give others, as a hostile
    sender would."""
    where = f"push {order.push_id} to {order.peer}"
    hello = PushHello(order.push_id, order.header)
    remote_reader, remote_writer = await open_push(creds, order.host, order.port, order.peer,
                                                   hello)
    # rsync's socket <-> TLS, in this loop (relay.py: no streams on the way). The local
    # end half-closes: rsync's stream ends before the receiver's answer does.
    remote, local = relay.End(), relay.End(half_close=True)
    relay.join(remote, local)
    listener: socket.socket | None = None
    child: spawn.Child | None = None
    talk: asyncio.Future[Any] | None = None
    try:
        listener = loopback.listen()
        child = await spawn.start(argv(listener.getsockname()[1]), env=env, stdin=spawn.PIPE,
                                  stderr=spawn.PIPE)
        assert child.stderr is not None
        talk = asyncio.gather(child.feed(stdin), child.stderr.read())
        exited = asyncio.ensure_future(child.wait())
        conn = await loopback.accept_from(listener, child.pid, exited, where)
        listener.close()
        if conn is None:  # rsync ended, or never connected: its status says which
            child.kill_group()
        else:
            await asyncio.get_running_loop().create_connection(lambda: local, sock=conn)
            # The receiver done, the TLS end closes, and so does rsync's connection.
            await relay.take_over(remote_reader, remote_writer, remote)
        _, errors = await talk
        returncode = await exited
        if conn is not None:
            # rsync's last words may still be on their way: wait for the receiver to close.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(remote.read_done), LINGER_S)
        return returncode, errors
    finally:
        if child is not None:
            if child.returncode is None:
                child.kill_group()
                await child.wait()
            if talk is not None:  # its stdin and stderr end with it
                await asyncio.gather(talk, return_exceptions=True)
            child.close()
        if listener is not None:
            listener.close()
        local.abort()
        remote_writer.transport.abort()
        relay.release(remote, local)
