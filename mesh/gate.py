"""The gate: which changed paths this node may push to a peer now, and the push itself
(DESIGN.md, "Data plane").

lsyncd runs ``mesh gate`` as its rsync binary (see ``mesh.adapters.lsyncd`` for the command
line it gets). The gate asks the agent over a unix socket, the agent's ``PushPolicy``
answers with a ``PushGrant``, and ``push`` runs the real rsync with only the granted paths,
through the TLS tunnel to the peer. The agent calls ``push`` itself for the pushes lsyncd
never sees (catch-up, conflict copies). Paths the policy leaves out are dropped from this
run, never retried by lsyncd: the agent pushes them later if they still need to go.

Socket protocol, version 1: one request frame and one reply frame (``mesh.adapters.tunnel``
framing: 4-byte big-endian length, msgpack); path lists travel as one string of
NUL-separated paths (NUL cannot occur in a path), so only the byte size bounds them::

    request  {"v": 1, "target": <peer node id>, "paths": "a\\0b/c"}
    reply    {"v": 1, "grant": {"peer", "host", "port", "push", "allowed", "header"}}
          or {"v": 1, "error": <one line>}
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mesh.adapters import relay, rsyncd
from mesh.adapters.tunnel import (
    MAX_HEADER_BYTES,
    Connections,
    PushHello,
    close_stream,
    credentials_env,
    credentials_from_env,
    encode_frame,
    open_push,
    read_frame,
    start_unix_server,
    stop_unix_server,
)
from mesh.core.paths import is_normalized
from mesh.core.vclock import NODE_ID_RE
from mesh.errors import ConfigError, LocalProtocolError, MeshError, RemoteProtocolError
from mesh.gatecall import (
    EXIT_RETRY,
    EXIT_USAGE,
    MAX_PATHS_BYTES,
    MAX_REPLY_BYTES,
    VERSION,
)
from mesh.tls import NodeCredentials

LOG = logging.getLogger(__name__)

MAX_REQUEST_BYTES = MAX_PATHS_BYTES + 4096
TUNNEL_RSH = ("-m", "mesh.rsh")  # lean: started once per push (see mesh/rsh.py)
LINGER_S = 30.0  # after rsync exits, for the receiver to close (as mesh.rsh waits)


class GateUnavailable(MeshError):
    """The agent could not be asked, or did not answer in time."""


class GateRefused(MeshError):
    """The agent answered with an error instead of a grant."""


@dataclass(frozen=True)
class PushGrant:
    """The agent's answer: push ``allowed`` (a subset of the paths asked about, maybe
    empty) to ``peer``, whose tunnel listens on ``host:port``, as push ``push_id``;
    ``header`` is the announcement the receiving agent gets before any data lands."""

    peer: str
    host: str
    port: int
    push_id: str
    allowed: list[str]
    header: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.peer, str) or NODE_ID_RE.fullmatch(self.peer) is None:
            raise LocalProtocolError(f"grant: invalid peer {self.peer!r}")
        if not isinstance(self.host, str) or not self.host or "/" in self.host:
            raise LocalProtocolError(f"grant: invalid host {self.host!r}")
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise LocalProtocolError(f"grant: invalid port {self.port!r}")
        if not rsyncd.valid_push_id(self.push_id):
            raise LocalProtocolError(f"grant: invalid push id {self.push_id!r}")
        if not isinstance(self.allowed, list) or not all(map(is_normalized, self.allowed)):
            raise LocalProtocolError("grant: allowed must be a list of normalized paths")
        if not isinstance(self.header, bytes) or len(self.header) > MAX_HEADER_BYTES:
            raise LocalProtocolError(f"grant: header must be at most {MAX_HEADER_BYTES} bytes")

    def to_wire(self) -> dict[str, object]:
        return {
            "peer": self.peer,
            "host": self.host,
            "port": self.port,
            "push": self.push_id,
            "allowed": _join(self.allowed),
            "header": self.header,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> PushGrant:
        keys = {"peer", "host", "port", "push", "allowed", "header"}
        if not isinstance(raw, dict) or set(raw) != keys or not isinstance(raw["allowed"], str):
            raise RemoteProtocolError("malformed grant")
        try:
            return cls(
                raw["peer"],
                raw["host"],
                raw["port"],
                raw["push"],
                _split(raw["allowed"]),
                raw["header"],
            )
        except LocalProtocolError as err:
            raise RemoteProtocolError(str(err)) from None


class PushPolicy(Protocol):
    """The agent's decision (implemented by the agent)."""

    async def authorize(self, target: str, paths: list[str]) -> PushGrant:
        """Which of ``paths`` (normalized, relative to the data dir; changed, created or
        deleted) may go to peer ``target`` now. Raise ``MeshError`` to refuse the call;
        lsyncd then retries the whole batch later."""
        ...


def _join(paths: Sequence[str]) -> str:
    return "\0".join(paths)


def _split(joined: str) -> list[str]:
    return joined.split("\0") if joined else []


# --- the agent's side of the socket ---------------------------------------------------------


@dataclass(frozen=True)
class GateLimits:
    request_timeout: float = 10.0  # for a connected gate to send its request
    max_connections: int = 64


class GateServer:
    """The unix-socket server in the agent that answers ``mesh gate``. The socket is made
    mode 0600: only this node's own processes may ask."""

    def __init__(
        self,
        socket_path: Path,
        policy: PushPolicy,
        *,
        limits: GateLimits | None = None,
        finished: Callable[[PushGrant], None] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.policy = policy
        # Called when the gate that holds a non-empty grant closes its connection, which it
        # keeps open while its rsync runs (or dies with it): the push is over.
        self.finished = finished
        self.limits = limits or GateLimits()
        self._server: asyncio.AbstractServer | None = None
        self._connections = Connections("gate", self.limits.max_connections)

    async def __aenter__(self) -> GateServer:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._server is not None:
            raise LocalProtocolError("the gate server is already running")
        self._server = await start_unix_server(self.socket_path, "gate", self._accepted)
        LOG.info("gate listening on %s", self.socket_path)

    async def stop(self) -> None:
        if self._server is None:
            return
        await stop_unix_server(self._server, self._connections, self.socket_path)
        self._server = None

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.serve(writer, lambda: self._serve(reader, writer))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        grant: PushGrant | None = None
        try:
            reply, grant = await self._answer(reader)
            writer.write(encode_frame({"v": VERSION, **reply}))
            await writer.drain()
            if grant is not None and grant.allowed and self.finished is not None:
                await reader.read(1)  # the gate sends nothing more: this returns at its close
        except (OSError, TimeoutError) as err:
            LOG.info("gate: request ended early: %s", err or type(err).__name__)
        finally:
            if grant is not None and grant.allowed and self.finished is not None:
                self.finished(grant)
            await close_stream(writer)

    async def _answer(
        self, reader: asyncio.StreamReader
    ) -> tuple[dict[str, object], PushGrant | None]:
        try:
            async with asyncio.timeout(self.limits.request_timeout):
                message = await read_frame(reader, MAX_REQUEST_BYTES)
            target, paths = _decode_request(message)
            grant = await self.policy.authorize(target, paths)
            _check_grant(grant, target, paths)
            return {"grant": grant.to_wire()}, grant
        except TimeoutError:
            why = "no request in time"
        except RemoteProtocolError as err:
            why = f"bad request: {err.reason}"
        except MeshError as err:
            why = str(err)
        except Exception as err:  # the policy's bug: tell the gate, keep serving
            LOG.exception("gate: the push policy failed")
            why = f"internal error ({type(err).__name__})"
        LOG.warning("gate: refused: %s", why)
        return {"error": why}, None


def _decode_request(message: Any) -> tuple[str, list[str]]:
    if not isinstance(message, dict) or message.get("v") != VERSION:
        raise RemoteProtocolError(f"not a version {VERSION} gate request")
    if set(message) != {"v", "target", "paths"}:
        raise RemoteProtocolError(f"fields {sorted(message)}")
    target, joined = message["target"], message["paths"]
    if not isinstance(target, str) or NODE_ID_RE.fullmatch(target) is None:
        raise RemoteProtocolError(f"invalid target {str(target)[:80]!r}")
    if not isinstance(joined, str):
        raise RemoteProtocolError("paths is not a string")
    paths = _split(joined)
    bad = next((p for p in paths if not is_normalized(p)), None)
    if bad is not None:
        raise RemoteProtocolError(f"path not normalized: {bad[:80]!r}")
    return target, list(dict.fromkeys(paths))


def _check_grant(grant: PushGrant, target: str, paths: list[str]) -> None:
    if not isinstance(grant, PushGrant):
        raise LocalProtocolError(f"the policy returned {type(grant).__name__}, not a PushGrant")
    if grant.peer != target:
        raise LocalProtocolError(f"the policy granted a push to {grant.peer}, not {target}")
    extra = set(grant.allowed) - set(paths)
    if extra:
        raise LocalProtocolError(f"the policy allowed paths it was not asked about: {extra}")


# --- the gate's side of the socket ----------------------------------------------------------


async def request_grant(
    socket_path: Path, target: str, paths: Sequence[str], *, within: float = 30.0
) -> PushGrant:
    """Ask the agent which of ``paths`` may go to ``target``."""
    async with hold_grant(socket_path, target, paths, within=within) as grant:
        return grant


@contextlib.asynccontextmanager
async def hold_grant(
    socket_path: Path, target: str, paths: Sequence[str], *, within: float = 30.0
) -> AsyncIterator[PushGrant]:
    """Ask the agent which of ``paths`` may go to ``target``, and hold the grant while
    the body runs (the push): the agent counts the paths as on their way until then."""
    where = f"agent at {socket_path}"
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_unix_connection(str(socket_path))
    except (OSError, TimeoutError) as err:
        raise GateUnavailable(f"{where}: {_why(err)}") from None
    try:
        writer.write(encode_frame({"v": VERSION, "target": target, "paths": _join(paths)}))
        async with asyncio.timeout(within):
            await writer.drain()
            reply = await read_frame(reader, MAX_REPLY_BYTES)
    except TimeoutError:
        writer.transport.abort()
        raise GateUnavailable(f"{where} did not answer within {within:g} s") from None
    except (OSError, RemoteProtocolError) as err:
        writer.transport.abort()
        raise GateUnavailable(f"{where}: {_why(err)}") from None
    try:
        yield _decode_reply(reply, where, paths)
    finally:
        writer.transport.abort()


def _why(err: BaseException) -> str:
    return (err.strerror if isinstance(err, OSError) else None) or str(err) or type(err).__name__


def _decode_reply(reply: Any, where: str, paths: Sequence[str]) -> PushGrant:
    if isinstance(reply, dict) and set(reply) == {"v", "error"} and reply["v"] == VERSION:
        raise GateRefused(f"{where} refused: {str(reply['error'])[:500]}")
    if not isinstance(reply, dict) or set(reply) != {"v", "grant"} or reply["v"] != VERSION:
        raise GateUnavailable(f"{where}: malformed reply")
    try:
        grant = PushGrant.from_wire(reply["grant"])
    except RemoteProtocolError as err:
        raise GateUnavailable(f"{where}: {err}") from None
    if not set(grant.allowed) <= set(paths):
        raise GateUnavailable(f"{where} allowed paths it was not asked about")
    return grant


# --- the push --------------------------------------------------------------------------------


def tunnel_env(grant: PushGrant, creds: NodeCredentials, header_file: Path) -> dict[str, str]:
    """What ``mesh tunnel-rsh`` reads: rsync hands its remote shell only the host."""
    return {
        "MESH_PUSH_PEER": grant.peer,
        "MESH_PUSH_PORT": str(grant.port),
        "MESH_PUSH_ID": grant.push_id,
        "MESH_PUSH_HEADER_FILE": str(header_file),
        **credentials_env(creds),
    }


async def push(
    grant: PushGrant,
    data_dir: Path,
    creds: NodeCredentials,
    *,
    keep_name: str = rsyncd.DEFAULT_KEEP_NAME,
    rsync: str = rsyncd.RSYNC,
    python: str = sys.executable,
    own_group: bool = True,
    inline: bool = False,
) -> int:
    """Push ``grant.allowed`` from ``data_dir`` to the peer; rsync's exit status.

    ``own_group`` puts rsync and its tunnel in a process group of their own, killed as one
    if the push is cancelled; the gate passes False so that stopping lsyncd's group stops
    them too. ``inline`` (the agent's own pushes) runs the TLS end in this event loop and
    hands rsync a socket through two ``cat``s instead of starting ``mesh.rsh``: no
    interpreter start on the path of a push.
    """
    if not grant.allowed:
        return 0
    where = f"push {grant.push_id} of {len(grant.allowed)} path(s) to {grant.peer}"
    LOG.debug("%s: starting", where)
    patterns = rsyncd.include_patterns(grant.allowed, data_dir)
    stdin = b"\0".join(map(os.fsencode, patterns))
    env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"}
    try:
        if inline:
            returncode, errors = await _push_inline(grant, data_dir, creds, keep_name, rsync,
                                                    env, stdin, own_group)
        else:
            rsh = rsyncd.rsh_command([python, *TUNNEL_RSH])
            argv = rsyncd.client_argv(data_dir, grant.host, rsh, keep_name, grant.push_id,
                                      rsync=rsync)
            with tempfile.TemporaryDirectory(prefix="mesh-push-") as tmp:  # mode 0700
                header_file = Path(tmp) / "header"
                header_file.write_bytes(grant.header)
                env |= tunnel_env(grant, creds, header_file)
                returncode, errors = await _run(argv, env, stdin, own_group)
    except OSError as err:
        raise MeshError(f"{where}: start {rsync}: {err.strerror or err}") from err
    level = logging.INFO if returncode == 0 else logging.WARNING
    LOG.log(level, "%s: rsync exit %d", where, returncode)
    for line in errors.decode("utf-8", "backslashreplace").splitlines() if returncode else ():
        LOG.warning("%s: %s", where, line)
    return returncode


async def _push_inline(
    grant: PushGrant,
    data_dir: Path,
    creds: NodeCredentials,
    keep_name: str,
    rsync: str,
    env: dict[str, str],
    stdin: bytes,
    own_group: bool,
) -> tuple[int, bytes]:
    hello = PushHello(grant.push_id, grant.header)
    remote_reader, remote_writer = await open_push(creds, grant.host, grant.port, grant.peer,
                                                   hello)
    ours, theirs = socket.socketpair()
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    # rsync's socket <-> TLS, in this loop (relay.py: no streams on the way). The local
    # end half-closes: rsync's stream ends before the receiver's answer does.
    remote, local = relay.End(), relay.End(half_close=True)
    relay.join(remote, local)
    try:
        fd = theirs.fileno()
        # rsync's remote shell: a cat in the background copies rsync's stream into the
        # socket; the shell itself becomes the cat that copies the socket to rsync, so it
        # exits when the receiver is done, as rsync expects of a remote shell. (bash: dash
        # redirects only fds 0-9; "0<&0": a background job's stdin is otherwise /dev/null;
        # --norc: with a socket on its stdin, bash takes itself for rshd's and would run
        # ~/.bashrc — a pyenv set-up there cost 0.3 s per push.)
        script = f"cat 0<&0 >&{fd} & exec cat <&{fd}"
        rsh = rsyncd.rsh_command(["/bin/bash", "--norc", "--noprofile", "-c", script, "relay"])
        argv = rsyncd.client_argv(data_dir, grant.host, rsh, keep_name, grant.push_id,
                                  rsync=rsync)
        await asyncio.get_running_loop().create_connection(lambda: local, sock=ours)
        # The receiver done, the local socket closes: the cat reading it ends.
        relay.take_over(remote_reader, remote_writer, remote)
        started = _run(argv, env, stdin, own_group, pass_fds=(fd,), started=theirs.close)
        returncode, errors = await started
        # rsync's last words may still be on their way: wait for the receiver to close.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(remote.read_done), LINGER_S)
        return returncode, errors
    finally:
        local.abort()
        remote_writer.transport.abort()
        theirs.close()
        ours.close()


async def _run(
    argv: list[str],
    env: dict[str, str],
    stdin: bytes,
    own_group: bool,
    *,
    pass_fds: tuple[int, ...] = (),
    started: Callable[[], None] | None = None,
) -> tuple[int, bytes]:
    """Run to the end: exit status and stderr. Cancelled, it kills the process (and its
    group, if it has one of its own) before it returns. ``started`` runs once it has."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=own_group,
        pass_fds=pass_fds,
    )
    if started is not None:
        started()
    try:
        _, errors = await proc.communicate(stdin)
    finally:
        if proc.returncode is None:
            _kill(proc, own_group)
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, errors


def _kill(proc: asyncio.subprocess.Process, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()


# --- mesh gate ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateEnv:
    """The gate's settings, from the environment the lsyncd wrapper script sets."""

    socket_path: Path
    data_dir: Path
    creds: NodeCredentials
    keep_name: str
    rsync: str

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> GateEnv:
        missing = [k for k in ("MESH_GATE_SOCKET", "MESH_DATA_DIR") if not environ.get(k)]
        if missing:
            raise ConfigError(f"{', '.join(missing)} not set")
        keep_name = environ.get("MESH_KEEP_NAME", rsyncd.DEFAULT_KEEP_NAME)
        if not rsyncd.valid_keep_name(keep_name):
            raise ConfigError(f"MESH_KEEP_NAME {keep_name!r} is not a valid keep dir name")
        return cls(
            Path(environ["MESH_GATE_SOCKET"]),
            Path(environ["MESH_DATA_DIR"]),
            credentials_from_env(environ),
            keep_name,
            environ.get("MESH_RSYNC", rsyncd.RSYNC),
        )


def push_granted(reply: Any, peer: str, paths: list[str], environ: Mapping[str, str]) -> int:
    """The rest of ``mesh gate`` (``mesh.gatecall`` asked) once the agent's reply allows
    something: check the reply strictly and push. Returns the exit status for lsyncd."""
    try:
        env = GateEnv.from_environ(environ)
        grant = _decode_reply(reply, f"agent at {env.socket_path}", paths)
    except ConfigError as err:
        LOG.error("%s", err)
        return EXIT_USAGE
    except (GateUnavailable, GateRefused) as err:
        LOG.error("%s", err)
        return EXIT_RETRY
    return asyncio.run(_push_granted(grant, peer, paths, env))


async def _push_granted(grant: PushGrant, peer: str, paths: list[str], env: GateEnv) -> int:
    dropped = len(paths) - len(grant.allowed)
    LOG.info("%d of %d path(s) may go to %s", len(grant.allowed), len(paths), peer)
    if dropped:
        LOG.debug("held back: %s", sorted(set(paths) - set(grant.allowed)))
    try:
        return await push(
            grant, env.data_dir, env.creds, keep_name=env.keep_name, rsync=env.rsync,
            own_group=False,
        )  # fmt: skip
    except MeshError as err:
        LOG.error("%s", err)
        return EXIT_RETRY
