"""Child processes for the event loop, started the cheap way.

uvloop starts a child with libuv's ``fork``, which copies the whole agent's page tables:
6 ms of CPU per child, measured in an agent-sized process, where ``subprocess.Popen``
(``vfork`` and ``exec``) takes 1 ms. The agent starts two per push (rsync at the sender,
its daemon at the receiver), so the pushes start with ``Popen`` here. A thread per child
waits for its exit (``waitpid`` on that child alone: nobody else's children are reaped,
and no signal handler is needed); a pidfd in the loop would be lighter, but uvloop
refuses to poll an fd number it polled before until a later turn of its loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL


class Child:
    """A child in a process group of its own (``start``), with its stderr readable from
    the loop when it was started with ``stderr=PIPE``."""

    def __init__(self, popen: subprocess.Popen[bytes], exited: asyncio.Future[int]) -> None:
        self._popen = popen
        self._exited = exited
        self.stderr: asyncio.StreamReader | None = None
        self._stderr_transport: asyncio.BaseTransport | None = None

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def kill_group(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal the child's process group (it leads it), unless it was reaped: its id
        may be another's by then."""
        if not self._exited.done():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._popen.pid, sig)

    async def feed(self, data: bytes) -> None:
        """Write ``data`` to the child's stdin (started with ``stdin=PIPE``), then close
        it. In a worker thread: a pipe's write blocks, and the child may read slowly."""
        stdin = self._popen.stdin
        assert stdin is not None
        loop = asyncio.get_running_loop()

        def write() -> None:
            with contextlib.suppress(BrokenPipeError), stdin:
                stdin.write(data)

        await loop.run_in_executor(None, write)

    def close(self) -> None:
        """Done with the child's stderr (uvloop leaves a pipe at its end open)."""
        if self._stderr_transport is not None:
            self._stderr_transport.close()


async def start(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    stdin: int | None = DEVNULL,
    stdout: int | None = DEVNULL,
    stderr: int | None = PIPE,
    pass_fds: Sequence[int] = (),
) -> Child:
    """Start ``argv`` in a new session (its own process group). ``stdin``/``stdout`` are
    ``PIPE``, ``DEVNULL`` or a file descriptor the child gets a copy of; ``stderr`` is
    ``PIPE`` (read it from ``Child.stderr``) or ``DEVNULL``. ``OSError`` if it cannot."""
    loop = asyncio.get_running_loop()
    # Popen in the loop on purpose: vfork and exec return in about a millisecond, and
    # waiting is done through the pidfd below, never by blocking.
    popen = subprocess.Popen(  # noqa: ASYNC220
        list(argv), stdin=stdin, stdout=stdout, stderr=stderr, env=dict(env),
        pass_fds=tuple(pass_fds), start_new_session=True, close_fds=True,
    )  # fmt: skip
    exited: asyncio.Future[int] = loop.create_future()

    def done(code: int) -> None:
        if not exited.done():
            exited.set_result(code)

    def wait() -> None:
        code = popen.wait()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(done, code)

    threading.Thread(target=wait, name=f"wait-{popen.pid}", daemon=True).start()
    child = Child(popen, exited)
    if popen.stderr is not None:
        child.stderr = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(child.stderr)
        try:
            child._stderr_transport, _ = await loop.connect_read_pipe(lambda: protocol,
                                                                      popen.stderr)
        except BaseException:
            child.kill_group()
            await asyncio.shield(exited)
            raise
    return child
