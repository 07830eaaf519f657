"""Integration fixtures: a throwaway cluster PKI and ``async def`` tests.

No pytest-asyncio in the dev dependencies: an ``async def`` test runs in its own event
loop under ``asyncio.run``, with a deadline so that a hung broker fails the test
instead of stalling the run.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mesh import pki

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
