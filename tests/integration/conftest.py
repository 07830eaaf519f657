"""Integration fixtures: a throwaway cluster PKI and ``async def`` tests.

No pytest-asyncio in the dev dependencies: an ``async def`` test runs in its own event
loop under ``asyncio.run``, with a deadline so that a hung broker fails the test
instead of stalling the run.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mesh import pki
from mesh.adapters.rsync import push as rsync_push
from mesh.adapters.rsync.push import PushOrder
from mesh.errors import MeshError
from mesh.pki.tls import NodeCredentials

CLUSTER = "test"
NODES = ("alpha", "bravo", "charlie")
ASYNC_TEST_TIMEOUT = 60.0


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    test = pyfuncitem.obj
    if not inspect.iscoroutinefunction(test):
        return None
    names = inspect.signature(test).parameters
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}
    asyncio.run(asyncio.wait_for(test(**kwargs), ASYNC_TEST_TIMEOUT))
    return True


@dataclass(frozen=True)
class ClientFiles:
    """The PEM files an MQTT client presents; ``cert``/``key`` None for no certificate."""

    ca: Path
    cert: Path | None
    key: Path | None


@dataclass(frozen=True)
class Pki:
    """A cluster CA with NODES, an expired node "stale", and a foreign CA that issued
    a certificate for "bravo" of a cluster of the same name."""

    root: Path
    foreign: Path

    def creds(self, node: str) -> pki.NodeCredentials:
        return pki.load_node(self.root, node)

    def files(self, node: str | None, *, foreign: bool = False) -> ClientFiles:
        ca = self.root / pki.CA_CERT
        if node is None:
            return ClientFiles(ca, None, None)
        where = self.foreign if foreign else self.root
        return ClientFiles(ca, where / f"{node}.crt", where / f"{node}.key")


@pytest.fixture(scope="session")
def cluster_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    root, foreign = base / "cluster", base / "foreign"
    now = datetime.now(UTC)
    pki.init_ca(root, CLUSTER, now=now - timedelta(days=30))
    pki.issue(root, NODES)
    pki.issue(root, ["stale"], days=1, now=now - timedelta(days=10))
    pki.init_ca(foreign, CLUSTER)
    pki.issue(foreign, ["bravo"])
    return Pki(root, foreign)


async def until(condition: Callable[[], bool], what: str, within: float = 5.0) -> None:
    """Wait for ``condition`` to hold, or fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.01)


# --- pushes: the tunnel, the gate and lsyncd (test_tunnel, test_gate, test_lsyncd) ----------


@dataclass
class PushRecord:
    """One push as a ``RecordingSink`` saw it; ``seen`` holds the watched files' bytes
    (None: absent) at the moment ``begin`` ran, before the daemon started."""

    peer: str
    push_id: str
    header: bytes
    seen: dict[str, bytes | None]
    returncode: int | None = None


class RecordingSink:
    """A ``PushSink`` that records each push and refuses all of them while ``refuse`` is
    set."""

    def __init__(self, data_dir: Path, watch: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.watch = watch
        self.refuse: str | None = None
        self.pushes: list[PushRecord] = []

    async def begin(self, peer: str, push_id: str, header: bytes) -> object:
        if self.refuse is not None:
            raise MeshError(self.refuse)
        seen = {name: _read_or_none(self.data_dir / name) for name in self.watch}
        record = PushRecord(peer, push_id, header, seen)
        self.pushes.append(record)
        return record

    async def end(self, ticket: object, returncode: int) -> None:
        assert isinstance(ticket, PushRecord)
        ticket.returncode = returncode

    def finished(self) -> list[PushRecord]:
        return [p for p in self.pushes if p.returncode is not None]


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


class RecordingCarrier:
    """A fake ``Carrier`` (``mesh.adapters.lsyncd.gate``; the agent's is
    ``mesh.engine.pushes.Pushes``). Each ``carry`` is recorded in ``calls``; with ``gate`` set it
    waits for it; with ``refuse`` set it raises ``MeshError`` (the gate tells lsyncd to
    retry). Otherwise it pushes ``choose(peer, paths)`` from ``source`` as ``creds`` to
    the tunnel of ``peer`` in ``tunnels`` through the one executor
    (``mesh.adapters.rsync.push.push``), as the agent does, and returns once that push is over; each
    push's order and rsync exit status go to ``pushes``. Nothing is pushed when nothing
    is chosen or ``peer`` has no tunnel here."""

    def __init__(
        self,
        tunnels: dict[str, tuple[str, int]] | None = None,
        choose: Callable[[str, list[str]], list[str]] = lambda peer, paths: paths,
        *,
        source: Path | None = None,
        creds: NodeCredentials | None = None,
    ) -> None:
        self.tunnels = tunnels or {}
        self.choose = choose
        self.source = source
        self.creds = creds
        self.gate: asyncio.Event | None = None
        self.refuse: str | None = None
        self.calls: list[tuple[str, list[str]]] = []
        self.called_at: list[float] = []  # time.monotonic() of each call
        self.pushes: list[tuple[PushOrder, int]] = []
        self._count = 0

    async def carry(self, peer: str, paths: list[str]) -> None:
        self.calls.append((peer, list(paths)))
        self.called_at.append(time.monotonic())
        if self.gate is not None:
            await self.gate.wait()
        if self.refuse is not None:
            raise MeshError(self.refuse)
        chosen = self.choose(peer, list(paths))
        if not chosen or peer not in self.tunnels:
            return
        assert set(chosen) <= set(paths), "choose picked paths it was not given"
        assert self.source is not None and self.creds is not None, "nothing to push from"
        self._count += 1
        host, port = self.tunnels[peer]
        order = PushOrder(
            peer,
            host,
            port,
            f"p{self._count}-{uuid.uuid4().hex[:8]}",
            tuple(chosen),
            f"push {self._count} of {chosen}".encode(),
        )
        self.pushes.append((order, await rsync_push.push(order, self.source, self.creds)))
