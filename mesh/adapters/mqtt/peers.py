"""Peer discovery: which brokers this node should link to.

``peers`` lists static ``host:port`` entries and ``dns:NAME`` entries. A DNS
name stands for every address it resolves to: in a Swarm, ``tasks.<service>``
returns one A record per running task of a global service, i.e. one per node
(SWARM-LAB.md), so nodes that join or leave show up at the next resolution.
``PeerWatcher`` re-resolves on an interval and reports only changes.
"""

from __future__ import annotations

import asyncio
import fcntl
import inspect
import ipaddress
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

from mesh.config.values import HostPort, PeerSpec
from mesh.errors import LocalProtocolError, MeshError

LOG = logging.getLogger(__name__)

Endpoint = tuple[str, int]
Lookup = Callable[[str, int], Awaitable[Iterable[str]]]
OnChange = Callable[[frozenset[Endpoint], frozenset[Endpoint]], Awaitable[None] | None]

_SIOCGIFADDR = 0x8915  # Linux <linux/sockios.h>: get an interface's IPv4 address
_IF_INET6 = Path("/proc/net/if_inet6")


class PeerDiscoveryError(MeshError):
    """A DNS name of ``peers`` could not be resolved."""


async def lookup_addresses(name: str, port: int) -> list[str]:
    """Every IPv4 and IPv6 address ``name`` resolves to (the system resolver)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]


def _normal(host: str) -> str:
    """An IP address in its canonical form (scope dropped); a host name as given."""
    try:
        return str(ipaddress.ip_address(host.partition("%")[0]))
    except ValueError:
        return host


async def resolve_peers(
    specs: Sequence[PeerSpec],
    *,
    exclude: set[Endpoint],
    lookup: Lookup = lookup_addresses,
) -> set[Endpoint]:
    """The endpoints ``specs`` stand for, less those in ``exclude``.

    Static entries are taken as given (a host name is not resolved here); ``dns:``
    entries become one endpoint per address. ``exclude`` holds this node's own
    endpoints, compared exactly by (address, port) with IP addresses in canonical
    form. Raises ``PeerDiscoveryError`` if any name fails, so that a caller never
    mistakes a failed lookup for peers that left.
    """
    found: set[Endpoint] = set()
    for spec in specs:
        if spec.kind == "static":
            found.add((_normal(spec.host), spec.port))
            continue
        try:
            addresses = await lookup(spec.host, spec.port)
        except OSError as err:  # socket.gaierror included
            raise PeerDiscoveryError(f"resolve {spec}: {err}") from err
        found.update((_normal(address), spec.port) for address in addresses)
    return found - {(_normal(host), port) for host, port in exclude}


def local_addresses() -> frozenset[str]:
    """This host's interface addresses, from the kernel (no ``ip`` binary, no psutil).

    IPv4: each interface's primary address (SIOCGIFADDR); IPv6: /proc/net/if_inet6.
    Linux only, like the rest of the agent.
    """
    addresses = {"127.0.0.1", "::1"}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                answer = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
            except OSError:
                continue  # no IPv4 address on this interface
            addresses.add(socket.inet_ntoa(answer[20:24]))
    try:
        lines = _IF_INET6.read_text().splitlines()
    except OSError:
        lines = []  # IPv6 disabled
    addresses.update(str(ipaddress.IPv6Address(int(line.split()[0], 16))) for line in lines)
    return frozenset(addresses)


class PeerWatcher:
    """Re-resolves ``specs`` every ``interval`` seconds and reports changes.

    ``on_change(added, removed)`` (plain or async) runs only when the set of
    endpoints changes, the first time included if it is not empty. A failed or
    timed-out resolution keeps the last known set. Logging is on state changes
    only: the set changed, resolution started failing, resolution recovered.
    ``sleep`` is injectable so that tests drive the rounds.
    """

    def __init__(
        self,
        specs: Sequence[PeerSpec],
        *,
        exclude: set[Endpoint],
        interval: float,
        on_change: OnChange,
        lookup: Lookup = lookup_addresses,
        timeout: float = 5.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not interval > 0 or not timeout > 0:
            raise LocalProtocolError("PeerWatcher needs interval > 0 and timeout > 0")
        self._specs = tuple(specs)
        self._exclude = set(exclude)
        self._interval = interval
        self._timeout = timeout
        self._on_change = on_change
        self._lookup = lookup
        self._sleep = sleep
        self._peers: frozenset[Endpoint] = frozenset()
        self._failing = False

    @property
    def peers(self) -> frozenset[Endpoint]:
        """The last known set of peer endpoints."""
        return self._peers

    @property
    def failing(self) -> bool:
        """True while resolution fails (the last known set is being kept)."""
        return self._failing

    async def run(self) -> None:
        """Resolve now, then every ``interval`` seconds; returns at once if no entry
        is a DNS name (static entries never change)."""
        await self.refresh()
        if all(spec.kind == "static" for spec in self._specs):
            return
        while True:
            await self._sleep(self._interval)
            await self.refresh()

    async def refresh(self) -> bool:
        """Resolve once; True if the set changed (and ``on_change`` ran)."""
        try:
            async with asyncio.timeout(self._timeout):
                found = frozenset(
                    await resolve_peers(self._specs, exclude=self._exclude, lookup=self._lookup)
                )
        except (PeerDiscoveryError, TimeoutError) as err:
            if not self._failing:
                self._failing = True
                reason = str(err) or f"timed out after {self._timeout:g} s"
                LOG.warning(
                    "peer discovery failed, keeping %d known peers: %s", len(self._peers), reason
                )
            return False
        if self._failing:
            self._failing = False
            LOG.info("peer discovery works again")
        added, removed = found - self._peers, self._peers - found
        if not added and not removed:
            return False
        self._peers = found
        LOG.info("peers: %d (added %s, removed %s)", len(found), _show(added), _show(removed))
        outcome = self._on_change(added, removed)
        if inspect.isawaitable(outcome):
            await outcome
        return True


def _show(endpoints: Iterable[Endpoint]) -> str:
    return ", ".join(sorted(str(HostPort(host, port)) for host, port in endpoints)) or "none"
