"""Frames: a 4-byte big-endian length, then that many bytes of msgpack. The agent's control
socket and the push tunnel speak them; ``mesh.adapters.streams`` reads them from asyncio
streams."""

from __future__ import annotations

import struct

import msgpack

FRAME = struct.Struct(">I")
# The largest push header (the sender's announcement of a push, ``mesh.core.manifest``) the
# tunnel carries in a frame.
MAX_HEADER_BYTES = 4 * 1024 * 1024


def encode_frame(payload: object) -> bytes:
    body: bytes = msgpack.packb(payload, use_bin_type=True)
    return FRAME.pack(len(body)) + body
