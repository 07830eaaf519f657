"""A child process spoken to in JSON lines (the probes, the proxies).

Requests carry an ``id``; the line that carries it back is the answer. Lines
without one are events, handed to ``on_event``. The child runs in a session
of its own and is stopped by its group id (``loadtest.procs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtest import procs

LINE_LIMIT = 256 << 20  # a snapshot of a large tree is one line
REQUEST_S = 120.0


class ChildError(Exception):
    """The child failed, exited, or did not answer in time."""


class JsonChild:
    def __init__(self, name: str, on_event: Callable[[dict[str, Any]], None] | None = None
                 ) -> None:
        self.name = name
        self.on_event = on_event or (lambda doc: None)
        self.proc: asyncio.subprocess.Process | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.exited = asyncio.Event()

    async def start(self, argv: list[str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=err, start_new_session=True, limit=LINE_LIMIT)
        procs.SESSIONS.add(self.proc.pid)
        self._reader = asyncio.create_task(self._read(), name=f"{self.name} reader")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                doc = json.loads(line)
                fut = self._pending.pop(doc["id"], None) if "id" in doc else None
                if fut is not None:
                    if not fut.done():
                        fut.set_result(doc)
                elif "id" not in doc:
                    self.on_event(doc)
        finally:
            self.exited.set()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ChildError(f"{self.name} exited"))
            self._pending.clear()

    async def request(self, doc: dict[str, Any], within: float = REQUEST_S) -> dict[str, Any]:
        if self.proc is None or self.proc.stdin is None or self.exited.is_set():
            raise ChildError(f"{self.name} is not running")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self.proc.stdin.write(json.dumps({**doc, "id": rid}).encode() + b"\n")
        try:
            await self.proc.stdin.drain()
            return await asyncio.wait_for(fut, within)
        except (TimeoutError, ConnectionError) as err:
            raise ChildError(f"{self.name}: {doc.get('op')} got no answer: {err!r}") from None
        finally:
            self._pending.pop(rid, None)

    async def close(self, grace: float = 5.0) -> None:
        """End of input, then the group's SIGTERM and SIGKILL if it lingers."""
        proc = self.proc
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError, RuntimeError):
                proc.stdin.close()
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                procs.signal_group(proc.pid, sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), grace)
                break
        procs.signal_group(proc.pid, signal.SIGKILL)
        procs.SESSIONS.discard(proc.pid)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
