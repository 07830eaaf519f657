"""Copying a push's bytes between transports in the event loop, without streams.

A push crosses the agent twice per node: rsync's socket to TLS on the sender, TLS to
the rsync daemon's pipes on the receiver. ``asyncio`` streams cost three times what the
TLS itself does there: every chunk is appended to the reader's buffer, cut out of it
again (a ``memmove`` of what is left) and handed over by a task switch. Here each
transport's protocol writes what it receives straight into the other transport, and
back-pressure is the transports' own: a sink whose write buffer fills pauses the
source's reading until it drains (measured: 256 MiB received over TLS cost 0.44
CPU-s through a ``StreamReader``, 0.13 CPU-s through a protocol).

An ``End`` is attached to one transport. ``out``: where what it reads goes; ``feeder``:
the end whose reading to pause while its own writes back up. A socket is one end that
does both; a child's stdin and stdout are two. Ends are attached one at a time (each
attachment awaits): what one reads before its ``out`` is attached (the rsync daemon's
greeting, say) is held, its reading paused, and written first when ``out`` attaches.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import cast

HIGH_WATER = 1 << 20  # a sink's write buffer that pauses its source (asyncio's: 64 KiB)


class End(asyncio.Protocol):
    """One transport of a relay; see the module's text."""

    def __init__(self, *, half_close: bool = False) -> None:
        """``half_close``: a socket that still writes once its reading ended (TLS cannot,
        and asyncio warns if asked to)."""
        loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.out: End | None = None
        self.feeder: End | None = None
        self.on_eof: Callable[[], None] | None = None
        self.half_close = half_close
        self.held: list[bytes] = []  # read before ``out`` had a transport
        self.before: asyncio.BaseProtocol | None = None  # the protocol ``take_over`` replaced
        self.read_done: asyncio.Future[None] = loop.create_future()

    # --- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        with contextlib.suppress(AttributeError, NotImplementedError):
            self.transport.set_write_buffer_limits(high=HIGH_WATER)
        feeder = self.feeder
        if feeder is not None and feeder.held:  # what came before this end was there
            self.transport.writelines(feeder.held)
            feeder.held.clear()
            self.resume_feeder()

    def data_received(self, data: bytes) -> None:
        out = self.out
        if out is None:
            return
        if out.transport is None:  # not attached yet (a child's greeting, say): hold it
            self.held.append(data)
            with contextlib.suppress(RuntimeError, AttributeError):
                if self.transport is not None:
                    self.transport.pause_reading()
        elif not out.transport.is_closing():
            out.transport.write(data)
        # else: the other side is gone; what still arrives has nowhere to go, as with
        # a closed pipe, and the relay's owner is ending it anyway.

    def eof_received(self) -> bool:
        self.ended()
        return self.half_close

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended()
        if self.before is not None:  # the stream's own waiters (wait_closed) learn of it
            self.before.connection_lost(exc)
        self.resume_feeder()  # whatever fed this end is dropped now rather than held up

    def pause_writing(self) -> None:
        if self.feeder is not None and self.feeder.transport is not None:
            with contextlib.suppress(RuntimeError, AttributeError):
                self.feeder.transport.pause_reading()

    def resume_writing(self) -> None:
        self.resume_feeder()

    # --- the relay's own ------------------------------------------------------------

    def ended(self) -> None:
        """No more bytes will be read from this end (EOF, or the transport is gone)."""
        if self.read_done.done():
            return
        self.read_done.set_result(None)
        if self.on_eof is not None:
            self.on_eof()

    def resume_feeder(self) -> None:
        feeder = self.feeder.transport if self.feeder is not None else None
        if feeder is not None and not feeder.is_closing():
            with contextlib.suppress(RuntimeError, AttributeError):
                if not feeder.is_reading():
                    feeder.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            # asyncio's own pipe transports raise on an abort once they have closed.
            with contextlib.suppress(AttributeError, RuntimeError):
                self.transport.abort()


def release(*ends: End) -> None:
    """The relay is over: drop what each end holds. An end and its transport, the TLS
    protocol and the stream it took over hold one another; left to the garbage
    collector, which the agent runs rarely (``mesh.engine.gcpolicy``), each push's TLS
    buffers (a quarter MiB a side) outlived it by minutes. ``before`` stays: the stream
    learns of the close through it (``wait_closed``), and lets go of the transport
    then."""
    for end in ends:
        end.transport = end.out = end.feeder = None
        end.on_eof = None
        end.held.clear()


def link(source: End, sink: End) -> None:
    """What ``source`` reads goes to ``sink``; ``sink`` backing up pauses ``source``."""
    source.out, sink.feeder = sink, source


def join(a: End, b: End) -> None:
    """``a`` and ``b`` are each other's source and sink (two sockets)."""
    link(a, b)
    link(b, a)


async def take_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, end: End
                    ) -> None:
    """Move a stream's transport to ``end``, whose ``out`` is attached already. What the
    stream had read ahead of its reader (a daemon's greeting, say) goes out first, and
    ``out`` is closed once ``end``'s reading ends: at once if the stream had seen its
    end. Nothing waits: once the transport is ``end``'s, the stream is ended by hand
    and what it holds read out (TLS and pipes close at their peer's end, which is how
    an end seen before is known; a plain socket's half-close before would not be)."""
    transport = cast(asyncio.Transport, writer.transport)
    ended = reader.at_eof() or transport.is_closing()
    end.before = transport.get_protocol()
    transport.set_protocol(end)  # nothing more reaches the stream
    reader.feed_eof()
    attach(end, transport, await reader.read(), ended)


def attach(end: End, transport: asyncio.Transport, ahead: bytes, ended: bool) -> None:
    """Make ``transport`` (whose protocol is ``end`` now) ``end``'s: ``ahead``, what was
    read from it before, goes out first; ``ended``: it had seen its end."""
    out = end.out
    assert out is not None and out.transport is not None
    end.on_eof = out.close
    end.connection_made(transport)
    if ahead:  # through the end, as all it reads (serverargs.CheckedEnd reads it first)
        end.data_received(ahead)
    if ended:
        end.ended()
    elif not transport.is_reading():  # the stream may have paused it (a full buffer)
        transport.resume_reading()
