"""MQTT 3.1.1 framing, followed byte by byte over what a connection reads (section 2.2).

Both ends of our MQTT connections (the broker's ``_GuardedReader``, the links'
``_GatedReader``) feed what amqtt reads through a ``FrameMeter`` to judge each packet
from its fixed header, before amqtt reads the body:

* the remaining length, against the packet-size limit;
* the packet type: 0 and 15 are reserved (section 2.2.1, MQTT-2.2.1). amqtt 0.12.1
  logs "Received reserved packet ... closing connection" and then reads on: one
  1.2 MB packet of zeros made 600,000 such lines (issue 13). The connection is cut
  at the first one instead.
"""

from __future__ import annotations

RESERVED_TYPES = frozenset((0, 15))


class FrameMeter:
    """Follows MQTT framing over the bytes read, to learn each packet's type and length
    from its fixed header before the body is read."""

    def __init__(self) -> None:
        self._body_left = 0
        self._in_header = False
        self._length = 0
        self._multiplier = 1
        self.reserved: int | None = None
        """The type of the first reserved packet seen, if any."""

    @property
    def at_packet_start(self) -> bool:
        return self._body_left == 0 and not self._in_header

    def feed(self, data: bytes) -> int | None:
        """Return the largest remaining length of the fixed headers completed by ``data``."""
        completed, index = None, 0
        while index < len(data):
            if self._body_left:
                taken = min(self._body_left, len(data) - index)
                self._body_left -= taken
                index += taken
                continue
            byte = data[index]
            index += 1
            if not self._in_header:  # the packet type byte
                if byte >> 4 in RESERVED_TYPES and self.reserved is None:
                    self.reserved = byte >> 4
                self._in_header, self._length, self._multiplier = True, 0, 1
                continue
            self._length += (byte & 0x7F) * self._multiplier
            self._multiplier *= 128
            if not byte & 0x80 or self._multiplier > 128**4:
                self._in_header, self._body_left = False, self._length
                completed = max(completed or 0, self._length)
        return completed
