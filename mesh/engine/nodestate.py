"""What a node opens first: its folders, the keep area, the index (migrated, the
bounds' purge done once), this run's epoch, and the scanner over the data folder.

Light to import on purpose: the agent opens it, and begins the start-up walk over
it (``mesh.engine.startwalk``), before it imports the broker and the rest of the
node (``mesh.engine.node``), a third of a second of a restart (issue 16). The walk
reads the index only after the purge, which makes the paths it forgets be scanned
again: a walk begun before it could call such a path unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.adapters.fs.scanner import Scanner
from mesh.config import AgentConfig
from mesh.core import admit
from mesh.engine.bounds import purge_once
from mesh.engine.keep import KeepArea
from mesh.store.index import Index
from mesh.store.statcache import StatCache


@dataclass
class NodeState:
    keep: KeepArea
    index: Index
    epoch: int  # of this run: one more than the last run's
    limits: admit.Limits
    scanner: Scanner

    @classmethod
    def open(cls, config: AgentConfig) -> NodeState:
        """Open (and make, the first time) what ``config`` names; ``MeshError`` if the
        state cannot be read."""
        config.state_dir.mkdir(parents=True, exist_ok=True)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        keep = KeepArea(config.data_dir)
        index = Index(config.state_db, keep=keep.has)
        try:
            epoch = int(index.get_meta("epoch", 0)) + 1
            index.set_meta("epoch", epoch)
            limits = admit.Limits(max_skew_ms=round(config.max_clock_skew * 1000))
            purge_once(index, config.node_id, limits)
        except BaseException:
            index.close()
            raise
        return cls(keep, index, epoch, limits,
                   Scanner(config.data_dir, cache=StatCache(index.db)))
