"""The sending side of a push through the tunnel (``mesh.adapters.rsync.tunnel``, the
receiving side, has the protocol): the first frame, ``PushHello``, and ``open_push``, which
connects, checks the peer's identity, sends the header and waits for the go-ahead; the TLS
material handed to the lean remote shell (``mesh.rsh``) through its environment."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.adapters.rsync import rsyncd
from mesh.adapters.streams import read_frame
from mesh.errors import ConfigError, LocalProtocolError, MeshError, PkiError, RemoteProtocolError
from mesh.frames import MAX_HEADER_BYTES, encode_frame
from mesh.pki.tls import (
    NodeCredentials,
    NodeIdentity,
    client_ssl_context,
    identity_from_peercert,
)

VERSION = 1
_MAX_REPLY_BYTES = 64 * 1024
_BUFFER = 1 << 20  # a push stream's read-ahead, until the relay takes it over


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


def credentials_env(creds: NodeCredentials) -> dict[str, str]:
    """The environment that hands a node's TLS material to ``mesh tunnel-rsh``, which
    rsync starts with nothing but a host name."""
    return {
        "MESH_CLUSTER": creds.identity.cluster,
        "MESH_NODE_ID": creds.identity.node,
        "MESH_TLS_CA": str(creds.ca_cert),
        "MESH_TLS_CERT": str(creds.cert),
        "MESH_TLS_KEY": str(creds.key),
    }


def credentials_from_env(environ: Mapping[str, str]) -> NodeCredentials:
    try:
        identity = NodeIdentity(environ["MESH_CLUSTER"], environ["MESH_NODE_ID"])
        return NodeCredentials(
            identity,
            Path(environ["MESH_TLS_CA"]),
            Path(environ["MESH_TLS_CERT"]),
            Path(environ["MESH_TLS_KEY"]),
        )
    except KeyError as err:
        raise ConfigError(f"{err.args[0]} is not set") from None
    except MeshError as err:
        raise ConfigError(str(err)) from None


async def open_push(
    creds: NodeCredentials,
    host: str,
    port: int,
    peer: str,
    hello: PushHello,
    *,
    within: float = 10.0,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The agent's own end of a push (``mesh.rsh`` is the gate's): connect to ``peer``'s
    tunnel, check that it is ``peer``, send the header and wait for the go-ahead. Returns
    the stream that then carries rsync's daemon protocol."""
    where = f"push {hello.push_id} to {peer} at {host}:{port}"
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=client_ssl_context(creds), limit=_BUFFER)
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
