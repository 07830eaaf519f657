"""Peer discovery: resolve_peers, local_addresses and PeerWatcher.

No network: the real resolver only sees ``localhost``; everything else goes through
an injected lookup. No sleeps wait for an outcome: rounds are driven through an
injected ``sleep`` and outcomes awaited on queues with deadlines.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Iterable
from typing import TypeVar

import pytest

from mesh.adapters.mqtt.peers import (
    Endpoint,
    PeerDiscoveryError,
    PeerWatcher,
    local_addresses,
    resolve_peers,
)
from mesh.config.values import PeerSpec
from mesh.errors import LocalProtocolError

T = TypeVar("T")
DEADLINE = 5.0
LOGGER = "mesh.adapters.mqtt.peers"


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(DEADLINE):
            return await coro

    return asyncio.run(bounded())


def specs(*texts: str) -> list[PeerSpec]:
    return [PeerSpec.parse(text) for text in texts]


class FakeDns:
    """Answers from a table the test edits; an exception in the table is raised."""

    def __init__(self, **answers: list[str] | OSError) -> None:
        self.answers: dict[str, list[str] | OSError] = answers
        self.calls = 0

    async def __call__(self, name: str, port: int) -> Iterable[str]:
        self.calls += 1
        answer = self.answers[name]
        if isinstance(answer, OSError):
            raise answer
        return list(answer)


class Changes:
    """Records on_change calls, and lets a test await the next one."""

    def __init__(self) -> None:
        self.seen: asyncio.Queue[tuple[set[Endpoint], set[Endpoint]]] = asyncio.Queue()
        self.count = 0

    def __call__(self, added: frozenset[Endpoint], removed: frozenset[Endpoint]) -> None:
        self.count += 1
        self.seen.put_nowait((set(added), set(removed)))


# resolve_peers ------------------------------------------------------------------------


def test_static_entries_are_taken_as_given() -> None:
    got = run(resolve_peers(specs("node2", "10.0.0.3:1884", "[FD00:0::4]"), exclude=set()))
    assert got == {("node2", 8883), ("10.0.0.3", 1884), ("fd00::4", 8883)}


def test_a_dns_entry_stands_for_every_address() -> None:
    dns = FakeDns(**{"tasks.mesh": ["10.0.1.2", "10.0.1.3", "fd00::5"]})
    got = run(resolve_peers(specs("dns:tasks.mesh:1884"), exclude=set(), lookup=dns))
    assert got == {("10.0.1.2", 1884), ("10.0.1.3", 1884), ("fd00::5", 1884)}


def test_own_endpoints_are_excluded_by_address_and_port() -> None:
    dns = FakeDns(**{"tasks.mesh": ["10.0.1.2", "10.0.1.3"]})
    exclude = {("10.0.1.2", 8883), ("10.0.1.3", 9999), ("0:0::1", 8883)}
    got = run(resolve_peers(specs("dns:tasks.mesh", "[::1]"), exclude=exclude, lookup=dns))
    assert got == {("10.0.1.3", 8883)}


def test_dns_localhost_resolves_without_network() -> None:
    got = run(resolve_peers(specs("dns:localhost:18883"), exclude=set()))
    assert got
    assert got <= {("127.0.0.1", 18883), ("::1", 18883)}


def test_dns_localhost_is_excluded_as_own_address() -> None:
    own = {(address, 8883) for address in local_addresses()}
    assert run(resolve_peers(specs("dns:localhost", "10.9.9.9"), exclude=own)) == {
        ("10.9.9.9", 8883)
    }


def test_a_failed_name_raises_with_the_name() -> None:
    dns = FakeDns(**{"tasks.gone": OSError(-2, "Name or service not known")})
    with pytest.raises(PeerDiscoveryError, match=r"^resolve dns:tasks.gone:8883: "):
        run(resolve_peers(specs("a", "dns:tasks.gone"), exclude=set(), lookup=dns))


def test_local_addresses_are_this_hosts_ips() -> None:
    addresses = local_addresses()
    assert {"127.0.0.1", "::1"} <= addresses
    for address in addresses:
        assert str(ipaddress.ip_address(address)) == address


# PeerWatcher ------------------------------------------------------------------------------


def watcher(dns: FakeDns, on_change: Changes) -> PeerWatcher:
    """A watcher of tasks.mesh on a node whose own endpoint is 10.0.0.1:8883."""
    return PeerWatcher(
        specs("dns:tasks.mesh"),
        exclude={("10.0.0.1", 8883)},
        interval=10.0,
        on_change=on_change,
        lookup=dns,
    )


def test_on_change_runs_only_when_the_set_changes() -> None:
    dns = FakeDns(**{"tasks.mesh": ["10.0.0.1", "10.0.0.2"]})
    changes = Changes()
    w = watcher(dns, changes)

    async def scenario() -> None:
        assert await w.refresh()
        assert changes.seen.get_nowait() == ({("10.0.0.2", 8883)}, set())
        assert not await w.refresh()  # same answer
        dns.answers["tasks.mesh"] = ["10.0.0.3", "10.0.0.2", "10.0.0.1"]
        assert await w.refresh()
        assert changes.seen.get_nowait() == ({("10.0.0.3", 8883)}, set())
        dns.answers["tasks.mesh"] = ["10.0.0.3"]
        assert await w.refresh()
        assert changes.seen.get_nowait() == (set(), {("10.0.0.2", 8883)})

    run(scenario())
    assert changes.count == 3
    assert w.peers == {("10.0.0.3", 8883)}


def test_an_empty_first_answer_is_no_change() -> None:
    changes = Changes()
    w = watcher(FakeDns(**{"tasks.mesh": ["10.0.0.1"]}), changes)  # only this node
    assert not run(w.refresh())
    assert changes.count == 0


def test_a_dns_failure_keeps_the_set_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    dns = FakeDns(**{"tasks.mesh": ["10.0.0.2"]})
    changes = Changes()
    w = watcher(dns, changes)
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def scenario() -> None:
        await w.refresh()
        dns.answers["tasks.mesh"] = OSError(-3, "Temporary failure in name resolution")
        for _ in range(3):
            assert not await w.refresh()
            assert w.failing
            assert w.peers == {("10.0.0.2", 8883)}
        dns.answers["tasks.mesh"] = ["10.0.0.2"]
        assert not await w.refresh()  # recovered, same set: no change
        assert not w.failing
        dns.answers["tasks.mesh"] = ["10.0.0.4"]
        assert await w.refresh()

    run(scenario())
    assert dns.calls == 6
    assert changes.count == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "keeping 1 known peers" in warnings[0].getMessage()
    assert "tasks.mesh" in warnings[0].getMessage()
    assert sum("works again" in r.getMessage() for r in caplog.records) == 1


def test_a_resolution_that_hangs_times_out_and_keeps_the_set() -> None:
    never = asyncio.Event()

    async def hanging(name: str, port: int) -> list[str]:
        await never.wait()
        return []

    changes = Changes()
    w = PeerWatcher(
        specs("dns:tasks.mesh"),
        exclude=set(),
        interval=10.0,
        timeout=0.01,
        on_change=changes,
        lookup=hanging,
    )
    assert not run(w.refresh())
    assert w.failing
    assert changes.count == 0


def test_run_resolves_every_interval_and_reports_changes() -> None:
    # One answer per round, in order: a change, two failed rounds, a change.
    script: list[list[str] | OSError] = [
        ["10.0.0.2"],
        OSError(-3, "down"),
        OSError(-3, "down"),
        ["10.0.0.2", "10.0.0.5"],
    ]
    rounds = 0
    slept: list[float] = []

    async def lookup(name: str, port: int) -> list[str]:
        nonlocal rounds
        answer = script[rounds]
        rounds += 1
        if isinstance(answer, OSError):
            raise answer
        return answer

    async def scenario() -> None:
        ticks: asyncio.Queue[None] = asyncio.Queue()
        seen: asyncio.Queue[tuple[set[Endpoint], set[Endpoint]]] = asyncio.Queue()

        async def sleep(seconds: float) -> None:
            slept.append(seconds)
            await ticks.get()

        async def on_change(added: frozenset[Endpoint], removed: frozenset[Endpoint]) -> None:
            await seen.put((set(added), set(removed)))

        w = PeerWatcher(
            specs("dns:tasks.mesh"),
            exclude=set(),
            interval=7.0,
            on_change=on_change,
            lookup=lookup,
            sleep=sleep,
        )
        task = asyncio.create_task(w.run())
        assert await seen.get() == ({("10.0.0.2", 8883)}, set())
        for _ in range(3):
            ticks.put_nowait(None)
        assert await seen.get() == ({("10.0.0.5", 8883)}, set())
        assert seen.empty()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())
    assert rounds == 4
    assert slept == [7.0] * 4


def test_run_returns_after_one_round_for_static_peers() -> None:
    changes = Changes()
    w = PeerWatcher(specs("a", "b:1"), exclude=set(), interval=1.0, on_change=changes)
    run(w.run())
    assert w.peers == {("a", 8883), ("b", 1)}
    assert changes.count == 1


@pytest.mark.parametrize(("interval", "timeout"), [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0)])
def test_watcher_needs_positive_interval_and_timeout(interval: float, timeout: float) -> None:
    with pytest.raises(LocalProtocolError):
        PeerWatcher([], exclude=set(), interval=interval, timeout=timeout, on_change=Changes())
