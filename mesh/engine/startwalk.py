"""The start-up walk, begun before the rest of the agent (issue 16).

A restart on unchanged files is healthy once the walk has found nothing changed; the
walk runs in a process of its own (``mesh.adapters.fs.walker``), so it need not wait
for the agent to import the broker and the rest of the node, nor for the broker, the
tunnel, the gate, the control socket and the own link to come up. It begins as soon
as the watcher is open: every folder watched before it is walked, so a change made
during or after the walk is an event, and one made before it is found by the walk.
The agent goes on (imports, servers) once the walk's process runs: the watcher's
listing of every folder, in a worker thread, would compete with them for the GIL.

Not begun early when a push was cut short by the last stop: what that push staged
lands first (``DataPlane.startup``), and the walk comes after it, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from mesh.adapters.fs.reconcile import Reconciled
from mesh.adapters.fs.walker import open_watcher
from mesh.adapters.fs.watcher import Watcher
from mesh.engine.keep import KeepArea


class StartWalk:
    """Open the watcher and walk, in a task of its own; ``take`` hands both over."""

    def __init__(self, walk: Callable[[], Awaitable[Reconciled]], keep: KeepArea,
                 watcher: Callable[[], Watcher]) -> None:
        self._walk = walk
        self.keep = keep
        self._watcher = watcher
        self._task: asyncio.Task[tuple[Watcher, Reconciled | None]] | None = None
        self._taken = False
        self._begun = asyncio.Event()  # the walk runs, or will not be made early

    def begin(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._open_and_walk(), name="start-up walk")

    async def walking(self) -> None:
        """Until the watcher is open and the walk has begun (or either failed, or the
        walk is left to ``startup``): what fails is ``take``'s to raise."""
        self.begin()
        await self._begun.wait()

    async def take(self) -> tuple[Watcher, Reconciled | None]:
        """The open watcher (the caller closes it) and the walk, or None when
        ``DataPlane.startup`` is to walk (after the landing of a cut-short push)."""
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
            if self.keep.unfinished:
                return watcher, None
            walking = asyncio.ensure_future(self._walk())
        except BaseException:
            watcher.close()
            raise
        finally:
            # Set before the walk's first step runs, the waiter resumes after it: once
            # the walk's process is started (its first suspension).
            self._begun.set()
        try:
            return watcher, await walking
        except BaseException:
            walking.cancel()
            await asyncio.wait([walking])
            watcher.close()
            raise
