"""rsync's remote shell for a push: ``python -m mesh.rsh HOST [rsync's command...]``.

rsync starts this once per push, so it is kept lean: no asyncio, no typer, no
cryptography (a push paid ~0.3 s per interpreter start with them on a loaded
2-core machine, measured in bench/dataplane.py). It connects to the peer's
tunnel with mutual TLS, checks the peer's identity from its already verified
certificate (the URI SAN ``spiffe://<cluster>/node/<peer>``), sends the push
header frame, waits for the go-ahead, then relays stdin/stdout until the
receiver closes. The command rsync asks for is ignored: the receiver runs its
own fixed daemon (mesh.adapters.tunnel).

Settings come from the environment the gate gives rsync (``mesh.gate.tunnel_env``):
MESH_PUSH_PEER, MESH_PUSH_PORT, MESH_PUSH_ID, MESH_PUSH_HEADER_FILE, MESH_CLUSTER,
MESH_TLS_CA, MESH_TLS_CERT, MESH_TLS_KEY. Any failure: one line on stderr and
exit status 255, which is what ssh exits with and what lsyncd retries on.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from mesh.frames import FrameError, encode_frame, recv_frame

EXIT_RSH = 255
VERSION = 1
MAX_HEADER_BYTES = 4 * 1024 * 1024
MAX_REPLY_BYTES = 64 * 1024
CHUNK = 64 * 1024
LINGER_S = 30.0  # after our rsync closed stdin: TLS has no half-close to pass that on


class RshError(Exception):
    pass


def _env(environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name, "")
    if not value:
        raise RshError(f"{name} is not set")
    return value


def context(environ: Mapping[str, str]) -> ssl.SSLContext:
    """The same policy as mesh.pki.client_ssl_context: TLS 1.2+, CA-verified, strict."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.check_hostname = False  # peers are dialled by address; identity is checked below
    try:
        ctx.load_verify_locations(cafile=_env(environ, "MESH_TLS_CA"))
        ctx.load_cert_chain(_env(environ, "MESH_TLS_CERT"), _env(environ, "MESH_TLS_KEY"))
    except OSError as err:
        raise RshError(f"load TLS credentials: {err}") from None
    return ctx


def check_peer(tls: ssl.SSLSocket, cluster: str, peer: str, where: str) -> None:
    cert = tls.getpeercert() or {}
    prefix = f"spiffe://{cluster}/node/"
    sans: Any = cert.get("subjectAltName", ())
    found = [value[len(prefix):] for kind, value in sans
             if kind == "URI" and isinstance(value, str) and value.startswith(prefix)]
    if not found:
        raise RshError(f"{where}: certificate has no identity in cluster {cluster}")
    if found[0] != peer:
        raise RshError(f"{where} is {found[0]}, not the expected peer {peer}")


def read_reply(tls: ssl.SSLSocket) -> str | None:
    """None for the go-ahead, else the receiver's reason for refusing."""
    try:
        reply: Any = recv_frame(tls, MAX_REPLY_BYTES, "reply to the push header")
    except FrameError as err:
        raise RshError(str(err)) from None
    if isinstance(reply, dict) and reply.get("v") == VERSION and reply.get("ok") is True:
        return None
    if isinstance(reply, dict) and isinstance(reply.get("error"), str):
        return str(reply["error"])[:500]
    raise RshError("malformed reply to the push header")


def connect(host: str, environ: Mapping[str, str], timeout: float = 10.0) -> ssl.SSLSocket:
    port = int(_env(environ, "MESH_PUSH_PORT"))
    peer, push_id = _env(environ, "MESH_PUSH_PEER"), _env(environ, "MESH_PUSH_ID")
    with open(_env(environ, "MESH_PUSH_HEADER_FILE"), "rb") as f:  # noqa: PTH123 - lean
        header = f.read(MAX_HEADER_BYTES + 1)
    if len(header) > MAX_HEADER_BYTES:
        raise RshError(f"push header is over {MAX_HEADER_BYTES} bytes")
    where = f"{host}:{port}"
    ctx = context(environ)
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
        tls = ctx.wrap_socket(raw)
    except ssl.SSLCertVerificationError as err:
        raise RshError(f"TLS to {where}: certificate verify failed: {err.verify_message}"
                       ) from None
    except OSError as err:
        raise RshError(f"connect to {where}: {err}") from None
    try:
        check_peer(tls, _env(environ, "MESH_CLUSTER"), peer, where)
        tls.sendall(encode_frame({"v": VERSION, "push": push_id, "header": header}))
        refusal = read_reply(tls)
    except (OSError, RshError) as err:
        tls.close()
        raise RshError(f"push {push_id} to {peer} at {where}: {err}") from None
    if refusal is not None:
        tls.close()
        raise RshError(f"{peer} refused push {push_id}: {refusal}")
    tls.settimeout(None)
    return tls


def relay(tls: ssl.SSLSocket) -> None:
    """stdin -> tunnel and tunnel -> stdout until the receiver closes the tunnel."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    stdin_open, closed_at = True, None
    while True:
        if tls.pending():
            readable = [tls]
        else:
            wait: list[Any] = [tls, stdin] if stdin_open else [tls]
            timeout = (None if closed_at is None
                       else max(0.0, closed_at + LINGER_S - time.monotonic()))
            readable, _, _ = select.select(wait, [], [], timeout)
            if not readable:
                return  # lingered long enough after our rsync finished
        if tls in readable:
            data = tls.recv(CHUNK)
            if not data:
                return
            view = memoryview(data)
            while view:
                view = view[os.write(stdout, view):]
        if stdin_open and stdin in readable:
            data = os.read(stdin, CHUNK)
            if data:
                tls.sendall(data)
            else:
                stdin_open, closed_at = False, time.monotonic()


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    hosts = [a for a in argv if not a.startswith("-")]
    if not hosts:
        print("mesh tunnel-rsh: no host given", file=sys.stderr)
        return EXIT_RSH
    try:
        tls = connect(hosts[0], environ)
    except (RshError, ValueError) as err:
        print(f"mesh tunnel-rsh: {err}", file=sys.stderr)
        return EXIT_RSH
    try:
        relay(tls)
    except OSError as err:
        print(f"mesh tunnel-rsh: relay: {err}", file=sys.stderr)
        return EXIT_RSH
    finally:
        tls.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], os.environ))
