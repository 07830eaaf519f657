"""Which incoming pushes the agent takes (issue 13): the tunnel's sink in front of the
agent's own (``mesh.engine.pushes.Pushes``).

The tunnel has checked the client's certificate and that its node is a current peer
(``TunnelServer(peers=...)``). Here the push header, decoded as strictly as any
manifest (reserved names refused), must also:

* name the certificate's node as its origin;
* keep the bounds of ``mesh.core.admit.screen`` on every write (a push is refused
  whole: its sender retries, and backs off);
* say no more than its sender announced on the manifest stream
  (``mesh.core.admit.unannounced``). A header was a second way in, around the
  manifest stream, for any version a node cared to claim. An honest sender pushes
  what it announced, but its push may overtake the manifest: the check waits for the
  sender's announcements, up to ``wait_s``.

Every push that ends well is reported (``on_delivered``): content is moving from that
peer, which ``mesh.core.stall`` needs to tell a slow catch-up from a peer that never
delivers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from mesh.clock import now_ms
from mesh.core import admit, manifest
from mesh.core.manifest import Manifest
from mesh.core.vclock import VersionVector
from mesh.errors import RemoteProtocolError

LOG = logging.getLogger("mesh.engine.admission")

# For a sender's announcements to catch up with its push: shorter than the sender's wait
# for our answer (``mesh.adapters.rsync.push.open_push``, 10 s), so that it learns why.
WAIT_S = 5.0


class AdmittedSink(Protocol):
    """The agent's sink behind the admission: a push's header comes decoded (once: a
    catch-up's header of 2,000 entries was decoded here and again behind, issue 16)."""

    async def begin(self, peer: str, push_id: str, m: Manifest) -> object: ...

    async def end(self, ticket: object, returncode: int) -> None: ...


@dataclass(frozen=True, slots=True)
class _Ticket:
    peer: str
    inner: object


class PushAdmission:
    def __init__(
        self,
        inner: AdmittedSink,
        *,
        announced: Callable[[str, list[str]], Mapping[str, VersionVector]],
        wait_applied: Callable[[float], Awaitable[bool]],
        limits: admit.Limits,
        on_delivered: Callable[[str], None] = lambda peer: None,
        wait_s: float = WAIT_S,
    ) -> None:
        self.inner = inner
        # (peer, paths) -> what the peer last announced of each, in one read (issue 16:
        # a catch-up push lists 2,000 paths, and a query each was a twentieth of the
        # receiver's time).
        self.announced = announced
        self.wait_applied = wait_applied  # until the exchange applies more, or a timeout
        self.limits = limits
        self.on_delivered = on_delivered
        self.wait_s = wait_s

    async def begin(self, peer: str, push_id: str, header: bytes) -> object:
        where = f"push {push_id}"
        m = manifest.decode_push(header, peer, push_id)
        screened = admit.screen(m.entries, m.conflicts, now_ms(), self.limits)
        if screened.refused:
            raise RemoteProtocolError(f"{where}: {admit.summary(screened.refused)}", peer=peer)
        await self._announced(peer, where, m)
        return _Ticket(peer, await self.inner.begin(peer, push_id, m))

    async def _announced(self, peer: str, where: str, m: Manifest) -> None:
        """Until everything in the header is among what ``peer`` announced; refused if
        that does not happen within ``wait_s``."""
        paths = sorted({e.path for e in m.entries}
                       | {x.path for pair in m.conflicts for x in pair})

        def check() -> dict[str, str]:
            return admit.unannounced(m.entries, m.conflicts,
                                     self.announced(peer, paths).get)

        deadline = time.monotonic() + self.wait_s
        while missing := check():
            left = deadline - time.monotonic()
            if left <= 0:
                raise RemoteProtocolError(
                    f"{where} holds what {peer} never announced: {admit.summary(missing)}",
                    peer=peer)
            await self.wait_applied(left)

    async def end(self, ticket: object, returncode: int) -> None:
        assert isinstance(ticket, _Ticket)
        try:
            await self.inner.end(ticket.inner, returncode)
        finally:
            if returncode == 0:
                self.on_delivered(ticket.peer)
