"""The collector over a real keep area and index (issue 14): the cap takes the oldest
first, retention waits for every known peer, needed content stays, tombstones go."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mesh import config
from mesh.core.effects import PathState
from mesh.core.manifest import Entry
from mesh.core.resolver import Version
from mesh.core.retention import Reason
from mesh.core.vclock import VersionVector, hlc_pack
from mesh.engine.collector import Collector, KeepLimits
from mesh.engine.keep import KeepArea
from mesh.errors import ConfigError
from mesh.store.index import Index
from mesh.store.kept import KeptLog

NONE = Path("/nonexistent/agent.toml")
NOW = 1_800_000_000_000
DAY = 86_400_000


def v(**counters: int) -> VersionVector:
    return VersionVector.of(counters)


class Setup:
    def __init__(self, tmp: Path, limits: KeepLimits, live: list[str] | None = None) -> None:
        self.keep = KeepArea(tmp)
        self.index = Index(tmp / "state.db", keep=self.keep.has)
        self.kept = KeptLog(self.index)
        self.horizon = 0
        self.live = live or []
        self.collector = Collector(index=self.index, keep=self.keep, kept=self.kept,
                                   set_horizon=self._horizon, limits=limits,
                                   live_peers=lambda: self.live)

    def _horizon(self, h: int) -> None:
        self.horizon = h

    def file(self, path: str, data: bytes, kept_ms: int, vector: VersionVector) -> bytes:
        """A version of ``path`` filed into the keep area at ``kept_ms``."""
        digest = hashlib.sha256(data).digest()
        (self.keep.objects / digest.hex()).write_bytes(data)
        entry = Entry(path, vector, digest, len(data), writer="n1", hlc=hlc_pack(kept_ms))
        self.kept.add(entry, vector, Reason.REPLACED, kept_ms)
        return digest

    def objects(self) -> set[bytes]:
        return set(self.keep.objects_held())


def test_the_cap_collects_the_oldest_versions_first(tmp_path: Path) -> None:
    s = Setup(tmp_path, KeepLimits(7 * 86400, (2500, "bytes"), 30 * 86400, 300))
    digests = [s.file(f"f{i}", bytes([i]) * 1000, NOW + i * 1000, v(n1=1)) for i in range(5)]
    out = s.collector.round(NOW + 10_000)
    assert out.freed == 3000
    assert s.objects() == set(digests[3:])  # the two newest stay, under the cap
    assert [r.path for r in s.kept.oldest(10)] == ["f3", "f4"]
    assert s.collector.stats.bytes == 2000 and s.collector.stats.freed_bytes == 3000


def test_retention_waits_for_every_known_peer_then_for_the_duration(tmp_path: Path) -> None:
    s = Setup(tmp_path, KeepLimits(86400, (0, "bytes"), 30 * 86400, 300), live=["n2"])
    old = s.file("f", b"old", NOW, v(n1=1))
    with s.index.batch():  # our disk moved on; n2 still announces the old version
        s.index.set_state("f", PathState(Version((Entry("f", v(n1=2), b"\x01" * 32, 1,
                                                        writer="n1", hlc=1),)), None))
        s.index.set_peer_vector("n2", "f", v(n1=1))
    s.collector.round(NOW + 2 * DAY)
    assert old in s.objects(), "collected before n2 confirmed a newer version"
    s.index.set_peer_vector("n2", "f", v(n1=2))
    s.collector.round(NOW + DAY // 2 + 0)  # confirmed, but not a day old
    assert old in s.objects()
    s.collector.round(NOW + 2 * DAY)
    assert old not in s.objects() and s.kept.count() == 0


def test_content_a_pending_restore_needs_stays_whatever_the_cap(tmp_path: Path) -> None:
    s = Setup(tmp_path, KeepLimits(0, (1, "bytes"), 30 * 86400, 300))
    wanted = s.file("f", b"wanted", NOW, v(n1=1))
    with s.index.batch():
        s.index.set_state("g", PathState(None, Version((Entry(
            "g", v(n2=1), wanted, 6, writer="n2", hlc=1),))))
    out = s.collector.round(NOW + DAY)
    assert wanted in s.objects() and out.held == 6


def test_an_orphan_object_goes_when_nothing_needs_it(tmp_path: Path) -> None:
    s = Setup(tmp_path, KeepLimits(0, (0, "bytes"), 30 * 86400, 300))
    (s.keep.objects / ("ab" * 32)).write_bytes(b"staged long ago")
    s.collector.round(NOW)
    assert s.objects() == set()


def test_a_tombstone_every_known_peer_acknowledged_goes_and_raises_the_horizon(
        tmp_path: Path) -> None:
    s = Setup(tmp_path, KeepLimits(0, (0, "bytes"), 30 * 86400, 300), live=["n2"])
    stamp = hlc_pack(NOW)
    tomb = Version((Entry("f", v(n1=2), None, writer="n1", hlc=stamp),))
    with s.index.batch():
        s.index.set_state("f", PathState(tomb, None))
        s.index.set_peer_vector("n2", "f", v(n1=1))
    s.collector.round(NOW + DAY)
    assert s.index.state("f").disk == tomb  # n2 has not acknowledged it
    s.index.set_peer_vector("n2", "f", v(n1=2))
    s.collector.round(NOW + DAY)
    assert s.index.state("f").disk is None and s.index.peer_vector("n2", "f") is None
    assert s.horizon == stamp and int(s.index.get_meta("horizon")) == stamp


def test_keep_settings_take_durations_sizes_and_percentages() -> None:
    env = {"MESH_KEEP_FOR": "0", "MESH_KEEP_MAX": "5G"}
    c = config.load({"forget_after": "2w"}, env, hostname="n1", default_config_file=NONE)
    assert (c.keep_for, c.keep_max, c.forget_after) == (0.0, (5 * 2.0**30, "bytes"), 14 * 86400.0)
    d = config.AgentConfig(node_id="n1")
    assert (d.keep_for, d.keep_max, d.forget_after) == (7 * 86400.0, (10.0, "%"), 30 * 86400.0)
    assert KeepLimits(0, (10.0, "%"), 1, 1).cap_bytes(1000) == 100
    assert KeepLimits(0, (0.0, "bytes"), 1, 1).cap_bytes(1000) is None
    for bad in ({"keep_for": "7 days"}, {"keep_max": "150%"}, {"keep_max": "-1"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            config.load(bad, {}, hostname="n1", default_config_file=NONE)
