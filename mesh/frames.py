"""Frames: a 4-byte big-endian length, then that many bytes of msgpack. The agent's unix
sockets and the push tunnel speak them; this module is the blocking side, for the lean
processes that rsync and lsyncd start (``mesh.rsh``, ``mesh.gatecall``): standard library
and msgpack only, as each start pays for its imports."""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

FRAME = struct.Struct(">I")
# The largest push header (the sender's announcement of a push, ``mesh.core.manifest``) the
# tunnel and the gate carry in a frame: one home for the agent and the lean processes.
MAX_HEADER_BYTES = 4 * 1024 * 1024


class FrameError(Exception):
    """The stream ended inside a frame, or the frame is too big or not msgpack."""


def encode_frame(payload: object) -> bytes:
    body: bytes = msgpack.packb(payload, use_bin_type=True)
    return FRAME.pack(len(body)) + body


def recv_frame(sock: socket.socket, limit: int, what: str = "reply") -> Any:
    """One frame from a blocking socket, decoded."""
    (length,) = FRAME.unpack(_recv_exact(sock, FRAME.size))
    if length > limit:
        raise FrameError(f"{what} of {length} bytes exceeds {limit}")
    try:
        return msgpack.unpackb(_recv_exact(sock, length), raw=False)
    except (ValueError, msgpack.UnpackException):
        raise FrameError(f"malformed {what}") from None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise FrameError("the connection closed before the answer was complete")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
