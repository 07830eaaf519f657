"""The agent's side of lsyncd's gate (docs/DESIGN.md, "Data plane").

lsyncd runs ``lsyncd/gate.pl`` as its rsync binary once per batch and peer; the script
hands the command line and the include patterns to this unix-socket server, mode 0600
(only this node's processes may ask), and exits with the status it gets back. The
server checks the command line (``mesh.adapters.lsyncd.call``), reads the paths and
hands them to the agent's ``Carrier``, which decides which may go and pushes them; the
answer is sent when the push is over, so lsyncd starts the peer's next batch only then
and the changes made meanwhile go together.

Protocol version 2 (``lsyncd/gate.pl`` has the other half)::

    request  b"mesh-gate 2\\n", then two fields, each a 4-byte big-endian length and
             bytes: the command line (arguments joined by NUL), the include patterns
    reply    b"<exit status>\\n", then optionally one line for lsyncd's log
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mesh.adapters.lsyncd.call import CallError, parse_rsync_call, paths_from_patterns
from mesh.adapters.streams import (
    Connections,
    close_stream,
    start_unix_server,
    stop_unix_server,
)
from mesh.errors import LocalProtocolError, MeshError

LOG = logging.getLogger("mesh.gate")

MAGIC = b"mesh-gate 2\n"
FIELD = struct.Struct(">I")
EXIT_OK = 0
EXIT_USAGE = 1  # lsyncd's "die": a command line the agent does not understand is a bug
EXIT_RETRY = 10  # rsync's "socket I/O error", which lsyncd 2.2.3 retries ("again")


class Carrier(Protocol):
    """The agent's decision and push (``mesh.engine.pushes.Pushes``)."""

    async def carry(self, peer: str, paths: list[str]) -> None:
        """lsyncd's batch for ``peer`` names ``paths`` (normalized; changed, created or
        deleted): push those that may go now, and return when that push is over. A
        failed push is the carrier's to retry. Raise ``MeshError`` when the batch could
        not be looked at: lsyncd then runs it again."""
        ...


@dataclass(frozen=True)
class GateLimits:
    request_timeout: float = 10.0  # for a connected gate to send its request
    max_connections: int = 64
    max_command_bytes: int = 64 * 1024
    max_patterns_bytes: int = 32 * 1024 * 1024


@dataclass
class GateCounters:
    batches: int = 0  # lsyncd batches the gate brought
    refused: int = 0  # ... that could not be read (bad request) or looked at (retried)


class GateServer:
    def __init__(self, socket_path: Path, data_dir: Path, carrier: Carrier, *,
                 limits: GateLimits | None = None) -> None:
        self.socket_path = socket_path
        self.data_dir = data_dir
        self.carrier = carrier
        self.limits = limits or GateLimits()
        self.counters = GateCounters()
        self._server: asyncio.AbstractServer | None = None
        self._connections = Connections("gate", self.limits.max_connections)

    async def __aenter__(self) -> GateServer:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    @property
    def serving(self) -> int:
        """lsyncd batches being looked at or pushed now."""
        return len(self._connections)

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
        self.counters.batches += 1
        try:
            status, note = await self._answer(reader)
            if status != EXIT_OK:
                self.counters.refused += 1
                LOG.warning("gate: %s", note)
            writer.write(f"{status}\n{note}\n".encode() if note else f"{status}\n".encode())
            await close_stream(writer)
        except OSError as err:  # the gate went away (lsyncd stopped): nothing to tell
            LOG.debug("gate: answer not delivered: %s", err)
        finally:
            writer.transport.abort()  # stopped mid-batch (the agent stops), or closed

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, str]:
        try:
            async with asyncio.timeout(self.limits.request_timeout):
                argv, patterns = await self._read(reader)
            call = parse_rsync_call(argv)
            if call.source != self.data_dir:  # as the config names it (supervisor.py)
                raise CallError(f"source {call.source} is not the data dir {self.data_dir}")
        except TimeoutError:
            return EXIT_RETRY, "no request in time"
        except (asyncio.IncompleteReadError, OSError) as err:
            return EXIT_RETRY, f"request cut short: {err}"
        except CallError as err:
            return EXIT_USAGE, str(err)
        paths = paths_from_patterns(patterns)
        if not paths:
            return EXIT_OK, ""
        try:
            await self.carrier.carry(call.peer, paths)
        except MeshError as err:
            return EXIT_RETRY, f"batch of {len(paths)} path(s) to {call.peer}: {err}"
        except Exception as err:  # the carrier's bug: tell lsyncd to retry, keep serving
            LOG.exception("gate: the carrier failed")
            return EXIT_RETRY, f"internal error ({type(err).__name__})"
        return EXIT_OK, ""

    async def _read(self, reader: asyncio.StreamReader) -> tuple[list[str], bytes]:
        magic = await reader.readexactly(len(MAGIC))
        if magic != MAGIC:
            raise CallError(f"not a version 2 gate request: {magic[:40]!r}")
        command = await _field(reader, self.limits.max_command_bytes, "command line")
        patterns = await _field(reader, self.limits.max_patterns_bytes, "patterns")
        return [os.fsdecode(arg) for arg in command.split(b"\0")], patterns


async def _field(reader: asyncio.StreamReader, limit: int, what: str) -> bytes:
    (length,) = FIELD.unpack(await reader.readexactly(FIELD.size))
    if length > limit:
        raise CallError(f"{what} of {length} bytes exceeds {limit}")
    return await reader.readexactly(length)
