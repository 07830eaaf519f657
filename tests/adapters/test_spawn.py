"""Children started the cheap way (``mesh.adapters.spawn``), on asyncio's loop and on
uvloop's, which the agent runs on."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from mesh.adapters import spawn

ENV = {"PATH": os.environ.get("PATH", os.defpath)}
LOOPS = [asyncio.new_event_loop, uvloop.new_event_loop]


def run(loop_factory: Callable[[], asyncio.AbstractEventLoop],
        main: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(asyncio.wait_for(main, 30))


@pytest.mark.parametrize("loop_factory", LOOPS, ids=["asyncio", "uvloop"])
def test_a_child_gets_its_stdin_and_its_stderr_and_status_come_back(
        loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def main() -> None:
        data = os.urandom(3 << 20)  # more than a pipe holds: the feed must not block the loop
        for _ in range(3):  # pipes and fds reused: uvloop must take them again
            child = await spawn.start(["sh", "-c", "wc -c >&2; exit 7"], env=ENV,
                                      stdin=spawn.PIPE, stderr=spawn.PIPE)
            assert child.stderr is not None
            _, errors = await asyncio.gather(child.feed(data), child.stderr.read())
            assert await child.wait() == 7 and child.returncode == 7
            assert int(errors) == len(data)
            child.close()

    run(loop_factory, main())


@pytest.mark.parametrize("loop_factory", LOOPS, ids=["asyncio", "uvloop"])
def test_killing_the_group_ends_the_child_and_what_it_started(
        loop_factory: Callable[[], asyncio.AbstractEventLoop], tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild"

    async def main() -> None:
        child = await spawn.start(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"],
                                  env=ENV, stderr=spawn.DEVNULL)
        await until(lambda: _read(pidfile) != "", "the grandchild's pid")
        grandchild = int(_read(pidfile))
        child.kill_group()
        assert await child.wait() == -9
        await until(lambda: _gone(grandchild), "the grandchild killed with its group")
        child.kill_group()  # after the end: no error, and no stranger signalled
        child.close()

    run(loop_factory, main())


async def until(condition: Callable[[], bool], what: str, within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, f"no {what} within {within} s"
        await asyncio.sleep(0.01)


def _read(path: Path) -> str:
    return path.read_text().strip() if path.exists() else ""


def _gone(pid: int) -> bool:
    """Ended: no longer in /proc, or a zombie its new parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_command_that_cannot_start_raises() -> None:
    async def main() -> None:
        with pytest.raises(OSError):
            await spawn.start(["/nonexistent/rsync"], env=ENV)

    run(asyncio.new_event_loop, main())
