"""The start-up walk, begun before the agent's servers start (issue 16).

A restart on unchanged files is healthy once the walk has found nothing changed; the
walk runs in a process of its own (``mesh.adapters.fs.walker``), so it need not wait
for the broker, the tunnel, the gate, the control socket and the own link to come up
first (a third of a second at 100,000 files). It begins as soon as the watcher is
open: every folder watched before it is walked, so a change made during or after the
walk is an event, and one made before it is found by the walk. The servers start once
the watcher is open, not before: the watcher's listing of every folder, in a worker
thread, took twice as long beside the servers' start (the GIL), and the walk waited.

Not begun early when a push was cut short by the last stop: what that push staged
lands first (``DataPlane.startup``), and the walk comes after it, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from mesh.adapters.fs.reconcile import Reconciled
from mesh.adapters.fs.walker import open_watcher
from mesh.adapters.fs.watcher import Watcher
from mesh.engine.dataplane import DataPlane


class StartWalk:
    """Open the watcher and walk, in a task of its own; ``take`` hands both over."""

    def __init__(self, data: DataPlane, watcher: Callable[[], Watcher]) -> None:
        self.data = data
        self._watcher = watcher
        self._task: asyncio.Task[tuple[Watcher, Reconciled | None]] | None = None
        self._taken = False
        self._opened = asyncio.Event()  # set when the watcher is open, or failed to open

    def begin(self) -> None:
        self._task = asyncio.create_task(self._open_and_walk(), name="start-up walk")

    async def watching(self) -> None:
        """Until the watcher is open (a failure to open it is ``take``'s to raise)."""
        await self._opened.wait()

    async def take(self) -> tuple[Watcher, Reconciled | None]:
        """The open watcher (the caller closes it) and the walk, or None when
        ``DataPlane.startup`` is to walk (after the landing of a cut-short push)."""
        if self._task is None:
            self.begin()
        assert self._task is not None
        self._taken = True
        return await self._task

    async def abandon(self) -> None:
        """The agent stops before it took the walk: stop the walk's process and close
        the watcher."""
        if self._task is None or self._taken:
            return
        self._task.cancel()
        await asyncio.wait([self._task])
        if not self._task.cancelled() and self._task.exception() is None:
            self._task.result()[0].close()  # it had ended before the cancel

    async def _open_and_walk(self) -> tuple[Watcher, Reconciled | None]:
        watcher = self._watcher()
        try:
            await open_watcher(watcher)  # cancelled, it closes the watcher
        finally:
            self._opened.set()
        if self.data.keep.unfinished:
            return watcher, None
        try:
            return watcher, await self.data.walk()
        except BaseException:
            watcher.close()
            raise
