"""Which incoming pushes the agent takes (issue 13): mesh.engine.admission in front of the agent's
sink, with the sender's announcements and the exchange faked."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from mesh.core import admit, manifest
from mesh.core.manifest import Entry, Kind, Manifest
from mesh.core.vclock import MAX_HLC, VersionVector, hlc_pack
from mesh.engine.admission import PushAdmission
from mesh.errors import RemoteProtocolError


class Inner:
    def __init__(self) -> None:
        self.begun: list[str] = []
        self.ended: list[int] = []

    async def begin(self, peer: str, push_id: str, m: Manifest) -> object:
        self.begun.append(push_id)
        return push_id

    async def end(self, ticket: object, returncode: int) -> None:
        self.ended.append(returncode)


def header(origin: str, *entries: Entry) -> bytes:
    return manifest.encode(Manifest(origin, 1, 0, entries))


def entry(path: str, hlc: int | None = None, **vector: int) -> Entry:
    stamp = hlc_pack(time.time_ns() // 1_000_000) if hlc is None else hlc
    return Entry(path, VersionVector.of(vector), b"\x01" * 32, 1, 0, 0o644, Kind.FILE, stamp,
                 "n9")


def admission(announced: dict[tuple[str, str], VersionVector], inner: Inner,
              delivered: list[str], on_wait: Any = None, wait_s: float = 1.0) -> PushAdmission:
    async def wait_applied(within: float) -> bool:
        if on_wait is not None:
            on_wait()
            return True
        await asyncio.sleep(within)  # nothing comes: the deadline passes
        return False

    def announced_of(peer: str, paths: list[str]) -> dict[str, VersionVector]:
        return {p: announced[(peer, p)] for p in paths if (peer, p) in announced}

    return PushAdmission(inner, announced=announced_of,
                         wait_applied=wait_applied, limits=admit.Limits(),
                         on_delivered=delivered.append, wait_s=wait_s)


def test_a_push_of_what_was_announced_is_taken_and_its_delivery_noted() -> None:
    async def main() -> None:
        inner, delivered = Inner(), []
        gate = admission({("n9", "a"): VersionVector.of({"n9": 2})}, inner, delivered)
        ticket = await gate.begin("n9", "n9-1-1", header("n9", entry("a", n9=2)))
        await gate.end(ticket, 0)
        assert inner.begun == ["n9-1-1"] and inner.ended == [0] and delivered == ["n9"]
        ticket = await gate.begin("n9", "n9-1-2", header("n9", entry("a", n9=1)))
        await gate.end(ticket, 23)
        assert delivered == ["n9"]

    asyncio.run(main())


def test_a_push_that_overtook_its_announcement_waits_for_it() -> None:
    async def main() -> None:
        announced: dict[tuple[str, str], VersionVector] = {}
        inner: Inner = Inner()
        gate = admission(announced, inner, [], on_wait=lambda: announced.update(
            {("n9", "a"): VersionVector.of({"n9": 1})}))
        await gate.begin("n9", "n9-1-1", header("n9", entry("a", n9=1)))
        assert inner.begun == ["n9-1-1"]

    asyncio.run(main())


@pytest.mark.parametrize(("peer", "payload", "why"), [
    ("n9", header("n9", entry("a", n9=5)), "holds what n9 never announced: 1 path(s): 'a'"),
    ("n9", header("n9", entry("new", n9=1)), "'new': never announced"),
    ("n9", header("n2", entry("a", n9=1)), "push p announced by n2"),
    ("n9", header("n9", entry("a", hlc=MAX_HLC, n9=1)), "ahead of ours"),
    ("n9", header("n9", entry("a", n1=2**63 - 1)), "could overflow"),
    ("n9", header("n9", entry(".mesh-keep/objects/" + "ab" * 32, n9=1)), "reserved path"),
])
def test_a_push_that_says_more_than_was_announced_is_refused(peer: str, payload: bytes,
                                                             why: str) -> None:
    async def main() -> None:
        inner = Inner()
        gate = admission({("n9", "a"): VersionVector.of({"n9": 2})}, inner, [], wait_s=0.05)
        with pytest.raises(RemoteProtocolError) as err:
            await gate.begin(peer, "p", payload)
        assert why in err.value.reason and err.value.peer == peer
        assert inner.begun == []

    asyncio.run(main())
