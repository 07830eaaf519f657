"""Compatibility: ``mesh.adapters.relay`` is now :mod:`mesh.adapters.rsync.relay`. The push path
(``mesh.gate``, ``mesh.pushes``, ``mesh.adapters.lsyncd`` and their tests) still
imports the old name until it moves (issue 12); delete this when nothing does."""

import asyncio
from typing import cast

from mesh.adapters.rsync.relay import HIGH_WATER as HIGH_WATER
from mesh.adapters.rsync.relay import End as End
from mesh.adapters.rsync.relay import attach as attach
from mesh.adapters.rsync.relay import join as join
from mesh.adapters.rsync.relay import link as link


def take_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, end: End) -> None:
    """The synchronous ``take_over`` mesh.gate still calls: it reads asyncio's private
    buffer, which ``mesh.adapters.rsync.relay.take_over`` (async) does not need to."""
    transport = cast(asyncio.Transport, writer.transport)
    buffered: bytearray = reader._buffer  # type: ignore[attr-defined]  # where asyncio keeps it
    ahead = bytes(buffered)
    buffered.clear()
    end.before = transport.get_protocol()
    transport.set_protocol(end)
    attach(end, transport, ahead, reader.at_eof() or transport.is_closing())
