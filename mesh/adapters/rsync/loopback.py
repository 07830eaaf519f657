"""The sending rsync's connection to the agent: a loopback TCP listener per push, which
only that rsync may use (docs/DESIGN.md, "Data plane").

rsync reaches a daemon either through a remote shell or over TCP. Through a shell, each
push started three processes besides rsync (a shell, and a ``cat`` each way between rsync's
pipes and the agent's socket); over TCP it starts none. The agent listens on
``127.0.0.1``, port 0, for one push, and relays what it accepts to the peer's tunnel.

Another local process could connect to that port first. It could not forge a push (the
receiver checks each staged file against the version the header announced; the header is
the agent's, sent before the listener exists), but it could feed the push or starve it, so
the agent takes the connection only from the socket its own rsync holds: the kernel says
which socket inode is at the other end of the connection (``NETLINK_SOCK_DIAG``, as
``ss`` asks it), and that inode must be among the rsync child's file descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from pathlib import Path
from typing import Any

LOG = logging.getLogger("mesh.push")

HOST = "127.0.0.1"
ACCEPT_S = 10.0  # for rsync to connect once started
MAX_STRANGERS = 8  # connections from others before the push gives up

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NO_COOKIE = 0xFFFFFFFF
_ALL_STATES = 0xFFFFFFFF
_HEADER = struct.Struct("=IHHII")  # nlmsghdr
_REQUEST = struct.Struct("=BBBxI")  # inet_diag_req_v2, before its socket id
_SOCKET_ID = struct.Struct("!HH16s16s")  # ports and addresses, network order
_SOCKET_ID_TAIL = struct.Struct("=III")  # interface, cookie
_MESSAGE_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
_MESSAGE_HEAD = 4 + _SOCKET_ID.size + _SOCKET_ID_TAIL.size


def listen() -> socket.socket:
    """A non-blocking listener on an ephemeral loopback port."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((HOST, 0))
        listener.listen(MAX_STRANGERS)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


def peer_inode(conn: socket.socket) -> int | None:
    """The inode of the socket at the other end of the loopback TCP connection ``conn``
    (this network namespace), or None if the kernel does not say."""
    peer_host, peer_port = conn.getpeername()[:2]
    host, port = conn.getsockname()[:2]
    sockid = _SOCKET_ID.pack(peer_port, port, ipaddress.ip_address(peer_host).packed,
                             ipaddress.ip_address(host).packed)
    body = (_REQUEST.pack(socket.AF_INET, socket.IPPROTO_TCP, 0, _ALL_STATES) + sockid
            + _SOCKET_ID_TAIL.pack(0, _NO_COOKIE, _NO_COOKIE))
    request = _HEADER.pack(_HEADER.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST,
                           1, 0) + body
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as diag:
            diag.settimeout(1.0)
            diag.send(request)
            reply = diag.recv(8192)
    except OSError as err:
        LOG.warning("push: cannot ask the kernel who connected (sock_diag): %s", err)
        return None
    if len(reply) < _HEADER.size:
        return None
    _, kind, _, _, _ = _HEADER.unpack_from(reply)
    end = _HEADER.size + _MESSAGE_HEAD + _MESSAGE_TAIL.size
    if kind != _SOCK_DIAG_BY_FAMILY or len(reply) < end:
        return None  # NLMSG_ERROR: no such socket (it went away)
    *_, inode = _MESSAGE_TAIL.unpack_from(reply, _HEADER.size + _MESSAGE_HEAD)
    return int(inode)


def holds_socket(pid: int, inode: int) -> bool:
    """Whether process ``pid`` has socket ``inode`` open."""
    want = f"socket:[{inode}]"
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if str(fd.readlink()) == want:
                return True
    return False


async def accept_from(listener: socket.socket, pid: int, exited: asyncio.Future[int],
                      where: str) -> socket.socket | None:
    """The connection process ``pid`` makes to ``listener``; None if it exits first, or
    does not connect within ``ACCEPT_S``. Connections from anyone else are closed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ACCEPT_S
    for _ in range(MAX_STRANGERS + 1):
        accepting = asyncio.ensure_future(loop.sock_accept(listener))
        waiting: set[asyncio.Future[Any]] = {accepting, exited}
        done, _ = await asyncio.wait(waiting, timeout=deadline - loop.time(),
                                     return_when=asyncio.FIRST_COMPLETED)
        if accepting not in done:
            accepting.cancel()
            await asyncio.gather(accepting, return_exceptions=True)
            if exited not in done:
                LOG.warning("%s: rsync did not connect within %g s", where, ACCEPT_S)
            return None
        conn, address = accepting.result()
        inode = peer_inode(conn)
        if inode is not None and holds_socket(pid, inode):
            conn.setblocking(False)
            return conn
        conn.close()
        LOG.warning("%s: closed a connection from %s:%s that is not our rsync's", where,
                    *address[:2])
    return None
