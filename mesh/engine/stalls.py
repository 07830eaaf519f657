"""What holds a node's health down, and for how long (issue 13, ``mesh.core.stall``): content
waited for that does not come, queues to a peer that do not move, catch-ups that do not
end. Past ``after_s`` each is *stalled*: reported in the status, logged once when it
starts and once when it stops, and no longer counted against health."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from mesh.core.stall import NO_HOLDER, QueueWatch

LOG = logging.getLogger("mesh.engine.node")


class Waits(Protocol):
    """What ``Stalls`` asks of the content waits (the agent's
    ``mesh.store.waits.ContentWaitTable``, which its owner updates; or
    ``mesh.core.stall.ContentWaits``)."""

    def delivered(self, peer: str, now: float) -> None: ...

    def stalled(self, now: float, holders: Callable[[str], Iterable[str]]
                ) -> tuple[dict[str, int], int]: ...


class Stalls:
    def __init__(self, after_s: float, waits: Waits) -> None:
        self.after_s = after_s
        self.waits = waits
        self.queues = QueueWatch(after_s)
        self._logged: set[str] = set()

    def doc(self, now: float, holders: Callable[[str], list[str]],
            reachable: Callable[[str], bool], resyncs: Mapping[str, float]) -> dict[str, Any]:
        """The status's ``stalled``: ``holders`` names the peers that announced what a path
        waits for, ``reachable`` whether a peer's tunnel can be reached, ``resyncs`` when
        each running catch-up began (monotonic)."""
        content, paths = self.waits.stalled(now, holders)
        queues = {}
        for peer, q in self.queues.stalled(now).items():
            why = ("pushes to it do not get through" if reachable(peer)
                   else "its hello advertises no tunnel, or its link is down")
            queues[peer] = {"paths": q.paths, "for_s": round(now - q.since), "why": why}
        catch_ups = {peer: round(now - started) for peer, started in resyncs.items()
                     if now - started >= self.after_s}
        return {"after_s": self.after_s, "content": content, "content_paths": paths,
                "queues": queues, "catch_ups": catch_ups}

    def log(self, stalled: dict[str, Any]) -> None:
        """One line when a peer starts holding health down past the bound, one when it
        stops."""
        now: set[str] = set()
        for peer, n in stalled["content"].items():
            key = f"content:{peer}"
            now.add(key)
            if key not in self._logged:
                who = "no peer holds it" if peer == NO_HOLDER else f"{peer} announced it"
                LOG.warning("content of %d paths has not come for %.0f s (%s and delivered "
                            "none): stalled, no longer counted against health", n,
                            stalled["after_s"], who)
        for peer, q in stalled["queues"].items():
            key = f"queue:{peer}"
            now.add(key)
            if key not in self._logged:
                LOG.warning("%d paths queued for %s have not moved for %d s (%s): stalled, "
                            "no longer counted against health", q["paths"], peer, q["for_s"],
                            q["why"])
        for peer, seconds in stalled["catch_ups"].items():
            key = f"catch-up:{peer}"
            now.add(key)
            if key not in self._logged:
                LOG.warning("the catch-up with %s has run for %d s: stalled, no longer "
                            "counted against health", peer, seconds)
        for key in sorted(self._logged - now):
            kind, _, peer = key.partition(":")
            what = {"content": "content from", "queue": "the queue to"}.get(kind, "catch-up with")
            LOG.info("%s %s: no longer stalled", what, peer or "no peer")
        self._logged = now
