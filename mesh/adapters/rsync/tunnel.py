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
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mesh.adapters import spawn
from mesh.adapters.rsync import relay, rsyncd, serverargs
from mesh.adapters.rsync.push import VERSION, PushHello
from mesh.adapters.streams import Connections, close_stream, read_frame
from mesh.adapters.tls_server import Listener, accept_forever, bind, open_tls
from mesh.errors import ConfigError, LocalProtocolError, MeshError, PkiError, RemoteProtocolError
from mesh.frames import MAX_HEADER_BYTES, encode_frame
from mesh.pki.tls import (
    NodeCredentials,
    identity_from_peercert,
    server_ssl_context,
)

LOG = logging.getLogger(__name__)

_HELLO_OVERHEAD = 1024  # the map, the keys and the push id around the header
PIPE_BYTES = 1 << 20  # the daemon's stdin (Linux's default: 64 KiB)


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


class TunnelServer(Listener):
    """Accept pushes from peers and run the fixed rsync daemon for each one."""

    what = "tunnel server"

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
        self.rsync = rsync
        self.limits = limits or TunnelLimits()
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._conf_dir: Path | None = None
        self._connections = Connections("tunnel", self.limits.max_connections)
        self._procs: set[spawn.Child] = set()

    async def start(self) -> None:
        if self._socket is not None:
            raise LocalProtocolError("the tunnel server is already running")
        data_dir, keep_name = rsyncd.check_dirs(self.data_dir, self.keep_dir)
        chroot = os.geteuid() == 0
        if not chroot:
            LOG.warning("tunnel: not root, so no chroot: incoming symlinks get sanitized")
        config = rsyncd.DaemonConfig(data_dir, keep_name, chroot=chroot)
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
        if not await self.close_listener():
            return
        for proc in list(self._procs):
            proc.kill_group(signal.SIGTERM)
        await self._connections.close(grace=self.limits.stop_timeout)
        for proc in list(self._procs):
            proc.kill_group(signal.SIGKILL)
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
        serving = self._connections.spawn(functools.partial(self._serve, client, tls, address))
        # Once served, the socket is closed (by its transport, or by ``open_tls``); a
        # handler cancelled before it began would leave it open.
        serving.add_done_callback(lambda _: client.close())

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
            # waiting for the close to complete: a sender that sends no close_notify would
            # keep the push open — its paths unscanned — until the close timed out.
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
            rsyncd.make_staging_dir(self.keep_dir, hello.push_id)
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
            "MESH_PUSH_ID": push_id,  # the daemon filter's (rsyncd.daemon_filter)
        }
        conf = self._conf_dir / "rsyncd.conf"
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        with contextlib.suppress(OSError):  # fewer, larger hand-overs to the daemon
            fcntl.fcntl(stdin_w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        try:
            proc = await spawn.start(  # its own process group, killed as one on stop
                [self.rsync, "--server", "--daemon", f"--config={conf}", "."],
                stdin=stdin_r, stdout=stdout_w, stderr=spawn.PIPE, env=env)
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
        # What the client asks of the daemon is read on its way in (serverargs).
        def refused(why: str) -> None:
            LOG.warning("tunnel: refused push %s from %s: %s", push_id, peer, why)

        tls = serverargs.CheckedEnd(serverargs.Prologue(self._keep_name, push_id), refused)
        daemon_in, daemon_out = relay.End(), relay.End()
        relay.link(tls, daemon_in)
        relay.link(daemon_out, tls)
        to_daemon = os.fdopen(stdin_w, "wb", buffering=0)  # the transports own them, once made
        from_daemon = os.fdopen(stdout_r, "rb", buffering=0)
        try:
            loop = asyncio.get_running_loop()
            await loop.connect_write_pipe(lambda: daemon_in, to_daemon)
            await loop.connect_read_pipe(lambda: daemon_out, from_daemon)
            await relay.take_over(reader, writer, tls)  # the client leaving ends the daemon's stdin
            returncode = await proc.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(asyncio.shield(daemon_out.read_done), stderr),
                    self.limits.drain_timeout)
        finally:
            proc.kill_group(signal.SIGKILL)
            self._procs.discard(proc)
            stderr.cancel()
            await asyncio.gather(stderr, return_exceptions=True)
            proc.close()
            for end, pipe in ((daemon_in, to_daemon), (daemon_out, from_daemon)):
                if end.transport is None:
                    pipe.close()
                end.abort()
            # The TLS end stays open: the caller closes it once the last bytes are out.
            relay.release(tls, daemon_in, daemon_out)
        level = logging.INFO if returncode == 0 else logging.WARNING
        LOG.log(level, "tunnel: push %s from %s: rsync exit %d", push_id, peer, returncode)
        for line in errors if returncode else ():
            LOG.warning("tunnel: push %s: rsync: %s", push_id, line)
        return returncode


async def _refuse(writer: asyncio.StreamWriter, where: str, why: str) -> None:
    LOG.warning("tunnel: refused %s: %s", where, why)
    writer.write(encode_frame({"v": VERSION, "ok": False, "error": why}))
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.drain(), 5)


def _address(writer: asyncio.StreamWriter) -> str:
    peername = writer.get_extra_info("peername")
    return f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)


async def _collect(stream: asyncio.StreamReader, lines: deque[str]) -> None:
    async for raw in stream:
        lines.append(raw.decode("utf-8", "backslashreplace").rstrip())
