"""The mutual-TLS tunnel that carries one rsync push to a peer (DESIGN.md, "Data plane").

After the TLS handshake (client certificate required, identity from its URI SAN), the stream
carries, in this order::

    client -> server   one frame: msgpack {"v": 1, "push": <push id>, "header": <bytes>}
    server -> client   one frame: msgpack {"v": 1, "ok": true}
                                       or {"v": 1, "ok": false, "error": <one line>}
    both ways          raw bytes: the client's rsync <-> the server's fixed rsync daemon

A frame is a 4-byte big-endian length and that many bytes. The header is opaque here: it
is the sender's announcement of the push, for the receiving agent (``PushSink.begin``),
which registers the push before the daemon starts, so before any byte of file data can
land. The server answers only after ``begin`` returned, so a refused push fails on the
client with the receiver's reason instead of a broken rsync stream.

Whatever command the client's rsync asked its remote shell to run, the server starts
``rsync --server --daemon --config=C .`` with the config of ``mesh.adapters.rsync.rsyncd``,
which lets the push write only into its staging dir, ``<keep>/in/<push id>/``, made here
(exclusively) before the daemon starts. Nothing in the live tree is created, changed or
removed by the daemon: the agent checks what was staged and places it after ``end``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import shutil
import signal
import socket
import ssl
import stat
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mesh.adapters.rsync import relay, rsyncd
from mesh.adapters.tls_server import accept_forever, bind, open_tls
from mesh.core.manifest import unpack
from mesh.errors import ConfigError, LocalProtocolError, MeshError, PkiError, RemoteProtocolError
from mesh.frames import FRAME
from mesh.frames import encode_frame as encode_frame  # the agent's side speaks them too
from mesh.pki.tls import (
    NodeCredentials,
    NodeIdentity,
    client_ssl_context,
    identity_from_peercert,
    server_ssl_context,
)

LOG = logging.getLogger(__name__)

VERSION = 1
MAX_HEADER_BYTES = 4 * 1024 * 1024
_HELLO_OVERHEAD = 1024  # the map, the keys and the push id around the header
_MAX_REPLY_BYTES = 64 * 1024
PIPE_BYTES = 1 << 20  # the daemon's stdin (Linux's default: 64 KiB)
_BUFFER = 1 << 20  # a push stream's read-ahead, until the relay takes it over


class TunnelError(MeshError):
    """A push could not be set up: connection, TLS, identity, or the receiver refused."""


# --- frames --------------------------------------------------------------------------------


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
        self.spawn(handler)

    def spawn(self, handler: Callable[[], Coroutine[Any, Any, None]]) -> None:
        task = asyncio.create_task(handler())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, grace: float = 0.0) -> None:
        """Let the handlers finish for ``grace`` seconds, then cancel the rest."""
        if self._tasks and grace > 0:
            await asyncio.wait(self._tasks, timeout=grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# --- receiving side ------------------------------------------------------------------------


class PushSink(Protocol):
    """The receiving agent's view of pushes (implemented by the agent)."""

    async def begin(self, peer: str, push_id: str, header: bytes) -> object:
        """Register the push before any of its data lands; raise to refuse it. The return
        value is handed back to ``end``. The push lands in ``<keep_dir>/in/<push_id>/``
        (its staging dir, empty when ``begin`` is called), never in the live tree."""
        ...

    async def end(self, ticket: object, returncode: int) -> None:
        """The daemon exited with ``returncode`` (negative: killed by that signal)."""
        ...


@dataclass(frozen=True)
class TunnelLimits:
    handshake_timeout: float = 10.0
    hello_timeout: float = 10.0  # from the handshake to a complete first frame
    max_connections: int = 16
    drain_timeout: float = 10.0  # for the daemon's last bytes to reach the client
    stop_timeout: float = 5.0


class TunnelServer:
    """Accept pushes from peers and run the fixed rsync daemon for each one."""

    def __init__(
        self,
        creds: NodeCredentials,
        host: str,
        port: int,
        data_dir: Path,
        keep_dir: Path,
        sink: PushSink,
        *,
        rsync: str = rsyncd.RSYNC,
        python: str = sys.executable,
        limits: TunnelLimits | None = None,
        peers: Callable[[str], bool] | None = None,
    ) -> None:
        self.creds = creds
        # Whose pushes are taken: a node of the cluster that is not a current peer of
        # ours is refused before its header is read (issue 13). None: any node.
        self.peers = peers
        self.host, self.port = host, port
        self.data_dir, self.keep_dir = data_dir, keep_dir
        self.sink = sink
        self.rsync, self.python = rsync, python
        self.limits = limits or TunnelLimits()
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._conf_dir: Path | None = None
        self._connections = Connections("tunnel", self.limits.max_connections)
        self._procs: set[asyncio.subprocess.Process] = set()

    @property
    def address(self) -> tuple[str, int]:
        if self._socket is None:
            raise LocalProtocolError("the tunnel server is not running")
        host, port = self._socket.getsockname()[:2]
        return str(host), int(port)

    async def __aenter__(self) -> TunnelServer:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._socket is not None:
            raise LocalProtocolError("the tunnel server is already running")
        data_dir, keep_name = _check_dirs(self.data_dir, self.keep_dir)
        chroot = os.geteuid() == 0
        if not chroot:
            LOG.warning("tunnel: not root, so no chroot: incoming symlinks get sanitized")
        config = rsyncd.DaemonConfig(data_dir, keep_name, self.python, chroot)
        self._conf_dir = Path(tempfile.mkdtemp(prefix="mesh-rsyncd-"))
        (self._conf_dir / "rsyncd.conf").write_text(rsyncd.render_daemon_config(config))
        self._keep_name = keep_name
        tls = server_ssl_context(self.creds)
        try:
            self._socket = bind(self.host, self.port)
        except ConfigError as err:
            shutil.rmtree(self._conf_dir, ignore_errors=True)
            raise ConfigError(f"tunnel: {err}") from err
        self._accepting = asyncio.create_task(accept_forever(
            self._socket, "tunnel", functools.partial(self._accepted, tls=tls)))
        LOG.info("tunnel of %s listening on %s:%d", self.creds.identity.node, *self.address)

    async def stop(self) -> None:
        if self._socket is None:
            return
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        self._socket.close()
        for proc in list(self._procs):
            _kill_group(proc, signal.SIGTERM)
        await self._connections.close(grace=self.limits.stop_timeout)
        for proc in list(self._procs):
            _kill_group(proc, signal.SIGKILL)
        self._socket = None
        if self._conf_dir is not None:
            shutil.rmtree(self._conf_dir, ignore_errors=True)

    def _accepted(self, client: socket.socket, addr: tuple[str, int], tls: ssl.SSLContext
                  ) -> None:
        address = f"{addr[0]}:{addr[1]}"
        if len(self._connections) >= self.limits.max_connections:
            client.close()
            LOG.warning("tunnel: refused %s: %d pushes running, the limit", address,
                        len(self._connections))
            return
        self._connections.spawn(functools.partial(self._serve, client, tls, address))

    async def _serve(self, client: socket.socket, tls: ssl.SSLContext, address: str) -> None:
        opened = await open_tls(client, tls, self.limits.handshake_timeout)
        if isinstance(opened, str):
            LOG.warning("tunnel: refused %s: %s", address, opened)
            return
        reader, writer = opened
        try:
            peer = self._identify(writer, address)
            if peer is not None and self.peers is not None and not self.peers(peer):
                await _refuse(writer, f"push from {peer} ({address})",
                              "not a peer of this node (it links to no broker of that node)")
            elif peer is not None:
                await self._push(peer, reader, writer)
        except RemoteProtocolError as err:
            LOG.warning("tunnel: refused %s: %s", err.peer or address, err.reason)
        except (OSError, TimeoutError) as err:
            LOG.info("tunnel: connection from %s ended: %s", address, err or type(err).__name__)
        except Exception:  # a bug here must not end the server's other pushes
            LOG.exception("tunnel: connection from %s failed", address)
        finally:
            await close_stream(writer)

    def _identify(self, writer: asyncio.StreamWriter, address: str) -> str | None:
        """The client's node id from its verified certificate, or None (logged)."""
        try:
            cert = writer.get_extra_info("ssl_object").getpeercert()
            if not cert:
                raise PkiError("no client certificate")
            return identity_from_peercert(cert, self.creds.identity.cluster).node
        except PkiError as err:
            LOG.warning("tunnel: refused %s: %s", address, err)
            return None

    async def _push(
        self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            async with asyncio.timeout(self.limits.hello_timeout):
                message = await read_frame(reader, MAX_HEADER_BYTES + _HELLO_OVERHEAD)
            hello = PushHello.decode(message)
        except TimeoutError:
            raise RemoteProtocolError("no push header in time", peer=peer) from None
        except RemoteProtocolError as err:
            raise RemoteProtocolError(f"push header: {err.reason}", peer=peer) from None
        LOG.debug("tunnel: push %s from %s: header received", hello.push_id, peer)
        ticket = await self._begin(peer, hello, writer)
        if ticket is None:
            return
        returncode = -1
        try:
            writer.write(encode_frame({"v": VERSION, "ok": True}))
            await writer.drain()
            returncode = await self._run_daemon(peer, hello.push_id, reader, writer)
            # The sender is done once the daemon is: let it go before the agent files
            # what the push landed (its next push to us need not wait for that). Not
            # waiting for the close to complete: mesh.rsh sends no close_notify, and the
            # push would stay open — its paths unscanned — until the close timed out.
            writer.close()
        finally:
            await self.sink.end(ticket, returncode)

    async def _begin(
        self, peer: str, hello: PushHello, writer: asyncio.StreamWriter
    ) -> object | None:
        """Make the push's staging dir, then let the agent register the push; None (after
        telling the client why) when either refuses."""
        where = f"push {hello.push_id} from {peer}"
        try:
            _make_staging_dir(self.keep_dir, hello.push_id)
        except OSError as err:
            why = "push id already used" if isinstance(err, FileExistsError) else str(err)
            await _refuse(writer, where, f"staging dir: {why}")
            return None
        try:
            return await self.sink.begin(peer, hello.push_id, hello.header)
        except RemoteProtocolError as err:
            why = err.reason  # the line names the peer already
        except MeshError as err:
            why = str(err)
        except Exception as err:  # the agent's bug must not take the tunnel down
            LOG.exception("tunnel: %s: the push sink failed", where)
            why = f"internal error ({type(err).__name__})"
        with contextlib.suppress(OSError):
            (self.keep_dir / rsyncd.STAGING / hello.push_id).rmdir()
        await _refuse(writer, where, why)
        return None

    async def _run_daemon(
        self,
        peer: str,
        push_id: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> int:
        assert self._conf_dir is not None
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "LC_ALL": "C",
            "MESH_PUSH_ID": push_id,
            "MESH_KEEP_NAME": self._keep_name,
        }
        conf = self._conf_dir / "rsyncd.conf"
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        with contextlib.suppress(OSError):  # fewer, larger hand-overs to the daemon
            fcntl.fcntl(stdin_w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        try:
            proc = await asyncio.create_subprocess_exec(
                *[self.rsync, "--server", "--daemon", f"--config={conf}", "."],
                stdin=stdin_r,
                stdout=stdout_w,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # its own process group, killed as one on stop
            )
        except OSError as err:
            for fd in (stdin_w, stdout_r):
                os.close(fd)
            LOG.error("tunnel: push %s: cannot start %s: %s", push_id, self.rsync, err)
            return 127  # what a shell reports for a command it cannot run
        finally:
            os.close(stdin_r)
            os.close(stdout_w)
        assert proc.stderr is not None
        self._procs.add(proc)
        errors: deque[str] = deque(maxlen=20)
        stderr = asyncio.create_task(_collect(proc.stderr, errors))
        # TLS -> the daemon's stdin; its stdout -> TLS (relay.py: no streams on the way).
        tls, daemon_in, daemon_out = relay.End(), relay.End(), relay.End()
        relay.link(tls, daemon_in)
        relay.link(daemon_out, tls)
        to_daemon = os.fdopen(stdin_w, "wb", buffering=0)  # the transports own them, once made
        from_daemon = os.fdopen(stdout_r, "rb", buffering=0)
        try:
            loop = asyncio.get_running_loop()
            await loop.connect_write_pipe(lambda: daemon_in, to_daemon)
            await loop.connect_read_pipe(lambda: daemon_out, from_daemon)
            relay.take_over(reader, writer, tls)  # the client leaving ends the daemon's stdin
            returncode = await proc.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(asyncio.shield(daemon_out.read_done), stderr),
                    self.limits.drain_timeout)
        finally:
            _kill_group(proc, signal.SIGKILL)
            self._procs.discard(proc)
            stderr.cancel()
            await asyncio.gather(stderr, return_exceptions=True)
            for end, pipe in ((daemon_in, to_daemon), (daemon_out, from_daemon)):
                if end.transport is None:
                    pipe.close()
                end.abort()
        level = logging.INFO if returncode == 0 else logging.WARNING
        LOG.log(level, "tunnel: push %s from %s: rsync exit %d", push_id, peer, returncode)
        for line in errors if returncode else ():
            LOG.warning("tunnel: push %s: rsync: %s", push_id, line)
        return returncode


def _check_dirs(data_dir: Path, keep_dir: Path) -> tuple[Path, str]:
    """The resolved data dir and the keep dir's name; creates the keep dir and its staging
    area, ``<keep>/in`` (mode 0700)."""
    if not data_dir.is_dir():
        raise ConfigError(f"tunnel: data dir {data_dir} is not a directory")
    if keep_dir.parent.resolve() != data_dir.resolve():
        raise ConfigError(f"tunnel: keep dir {keep_dir} must be directly inside {data_dir}")
    if not rsyncd.valid_keep_name(keep_dir.name):
        raise ConfigError(f"tunnel: keep dir name {keep_dir.name!r} must match .NAME")
    with contextlib.suppress(FileExistsError):
        keep_dir.mkdir(mode=0o700)
    if not keep_dir.is_dir() or keep_dir.is_symlink():
        raise ConfigError(f"tunnel: keep dir {keep_dir} is not a directory")
    try:
        os.close(_open_staging_area(keep_dir))
    except OSError as err:
        raise ConfigError(f"tunnel: staging area {keep_dir / rsyncd.STAGING}: {err}") from err
    return data_dir.resolve(), keep_dir.name


def _open_staging_area(keep_dir: Path) -> int:
    """An fd of ``<keep_dir>/in``, made (mode 0700) if missing; no link is followed."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    keep_fd = os.open(keep_dir, flags)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(rsyncd.STAGING, 0o700, dir_fd=keep_fd)
        return os.open(rsyncd.STAGING, flags, dir_fd=keep_fd)
    finally:
        os.close(keep_fd)


def _make_staging_dir(keep_dir: Path, push_id: str) -> None:
    """Create ``<keep_dir>/in/<push_id>`` (mode 0700), failing if it exists, without
    following a link."""
    fd = _open_staging_area(keep_dir)
    try:
        os.mkdir(push_id, 0o700, dir_fd=fd)
    finally:
        os.close(fd)


async def _refuse(writer: asyncio.StreamWriter, where: str, why: str) -> None:
    LOG.warning("tunnel: refused %s: %s", where, why)
    writer.write(encode_frame({"v": VERSION, "ok": False, "error": why}))
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.drain(), 5)


async def close_stream(writer: asyncio.StreamWriter, within: float = 5.0) -> None:
    """Close after the last bytes went out (``abort`` would drop what is still buffered,
    such as the daemon's final error message); abort if the peer does not take them."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), within)
    except (OSError, TimeoutError):
        writer.transport.abort()


def _address(writer: asyncio.StreamWriter) -> str:
    peername = writer.get_extra_info("peername")
    return f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)


def _kill_group(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)


async def _collect(stream: asyncio.StreamReader, lines: deque[str]) -> None:
    async for raw in stream:
        lines.append(raw.decode("utf-8", "backslashreplace").rstrip())


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


# --- sending side ------------------------------------------------------------------------


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
