"""lsyncd as the agent's child: its config, and a supervisor that keeps it running
(docs/DESIGN.md, "Data plane").

lsyncd is the live push path: it watches the data folder, batches changes per peer and
runs the gate (``lsyncd/gate.pl``) as its ``rsync.binary``; the gate hands the batch to
the agent (``mesh.adapters.lsyncd.gate``), which decides and pushes.

What lsyncd 2.2.3 does here (Debian 12 package, checked on this machine, not assumed):

- ``settings { nodaemon = true }`` keeps it in the foreground and logs to stdout;
  ``insist`` and ``statusFile`` are accepted; ``delay = 0`` fires a batch at once, and
  the changes made while it runs go in the next batch (one process per sync at a time).
- ``init = false`` skips the start-up sync, the ``rsync --delete`` of the whole tree that
  lets an empty node wipe its peers. Nothing runs until inotify reports a change.
- With ``default.rsync`` and ``rsync = { binary = B, archive = true }`` it runs::

      B -<flags> -r --delete --ignore-errors --force --from0 --include-from=- --exclude=* \
        SRC/ TARGET

  where ``<flags>`` is ``archive``'s ``p l o g t D`` plus ``s`` (``protect_args``, a
  default of its own), in an order that changes from run to run (Lua table order; seen:
  ``-plogstD``), and writes NUL-separated include patterns on stdin: each changed path
  with a leading ``/``, every parent directory with a trailing ``/``, ``/``; a deleted
  directory also as ``/dir/***``; a move as both names. It escapes ``?``, ``*`` and ``[``
  with a backslash (not ``]``, not ``\\``). Excluded paths produce no call at all.
- Its exit-code table treats 0, 23 and 24 as done, 3, 5, 6, 10-14, 20-22, 30, 35 and 255
  as "again" (the batch is retried after ``delay``), and 1, 2, 4, 25 or any code not in
  the table as fatal: lsyncd exits ("Critical exitcode"). The gate exits 10 when the
  agent cannot be asked, 1 for a command line the agent does not understand (a bug, so
  lsyncd dies and this supervisor restarts it), and 0 otherwise: a push that failed is
  the agent's to retry, not lsyncd's.
- The TARGET is ``<peer node id>::data/``: the agent reads the peer from it; host and port
  come from the agent's links, never from the config.
- Its children inherit its environment: that is how the gate learns the agent's socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import string
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mesh.adapters.lsyncd.call import target_of
from mesh.adapters.rsync import rsyncd
from mesh.errors import ConfigError, LocalProtocolError

LOG = logging.getLogger(__name__)

LSYNCD = "/usr/bin/lsyncd"
# lsyncd/lsyncd.conf.lua.tmpl and lsyncd/gate.pl, linked beside this module (the image
# copies them here: compose/Dockerfile).
TEMPLATE = Path(__file__).with_name("lsyncd.conf.lua.tmpl")
PID_FILE = "lsyncd.pid"  # beside the config: the running lsyncd's pid
GATE = Path(__file__).with_name("gate.pl")


# --- config ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LsyncdSettings:
    """What the rendered config and the gate wrapper script need."""

    data_dir: Path
    gate_socket: Path
    keep_name: str = rsyncd.DEFAULT_KEEP_NAME
    delay: float = 0.0
    pace: float = 0.0  # seconds between the starts of two batches to a peer, at least
    excludes: tuple[str, ...] = ()  # extra lsyncd exclude patterns
    lsyncd: str = LSYNCD
    template: Path = TEMPLATE
    gate: Path = GATE
    stop_timeout: float = 5.0
    # lsyncd 2.2.3 loses a SIGTERM that comes while it starts up (it then runs on until
    # killed; checked here): the supervisor sends it again every ``term_again`` seconds.
    term_again: float = 0.5
    # Peers come one hello after another: a (re)start waits until the set has not changed
    # for ``settle`` seconds (``settle_max`` at most), one restart for them all.
    settle: float = 0.5
    settle_max: float = 3.0
    backoff: tuple[float, float] = (0.5, 30.0)  # first and longest wait before a restart
    stable_after: float = 60.0  # a run this long resets the backoff
    # The paths the agent notes before it changes them (agentwrites): lsyncd passes over
    # their events. None: it asks the gate about them too.
    agent_writes: Path | None = None


def lua_string(value: str) -> str:
    """A Lua string literal of ``value``: printable ASCII as is, every other byte as a
    decimal escape (valid in Lua 5.1 to 5.4)."""
    out = []
    for byte in value.encode("utf-8", "surrogateescape"):
        if byte in b'"\\':
            out.append("\\" + chr(byte))
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def _lua_list(values: Iterable[str]) -> str:
    return "{ " + ", ".join(map(lua_string, values)) + " }"


def render_config(
    settings: LsyncdSettings, peers: Iterable[str], *, gate: Path, status_file: Path
) -> str:
    """The lsyncd config: one sync per peer (lsyncd/lsyncd.conf.lua.tmpl)."""
    targets = [target_of(peer) for peer in sorted(set(peers))]
    excludes = [f"/{settings.keep_name}/", rsyncd.RSYNC_TEMP_GLOB, *settings.excludes]
    template = string.Template(settings.template.read_text())
    return template.substitute(
        source=lua_string(f"{str(settings.data_dir).rstrip('/')}/"),
        gate=lua_string(str(gate)),
        status_file=lua_string(str(status_file)),
        delay=repr(float(settings.delay)),
        pace=repr(float(settings.pace)),
        excludes=_lua_list(excludes),
        targets=_lua_list(targets),
        agent_writes="nil" if settings.agent_writes is None else lua_string(
            str(settings.agent_writes)),
    )


# --- supervisor --------------------------------------------------------------------------------


class LsyncdSupervisor:
    """Run lsyncd with a config for the current peers; restart it when the peers change or
    when it dies (with backoff); stop it, and every process it started, on ``stop``.

    lsyncd runs in a process group of its own, with its gates: signals go to the group
    (the pushes themselves are the agent's children). With no peers, nothing runs.
    """

    def __init__(
        self, config_path: Path, peers: Iterable[str], *, settings: LsyncdSettings
    ) -> None:
        self.config_path = config_path
        self.settings = settings
        self.gate_path = config_path.with_name("mesh-gate.pl")
        self.status_path = config_path.with_name("lsyncd.status")
        # The running lsyncd's pid: an agent killed outright leaves its lsyncd running
        # (its own process group); the next agent of this state dir ends it first.
        self.pid_path = config_path.with_name(PID_FILE)
        self._peers = sorted(set(peers))
        self._changed = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self.starts = 0  # lsyncd processes started so far

    @property
    def pid(self) -> int | None:
        """The running lsyncd's pid (also its process group), or None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def peers(self) -> list[str]:
        return list(self._peers)

    async def start(self) -> None:
        """Start supervising; a config that cannot be rendered fails here, not later."""
        if self._runner is not None:
            raise LocalProtocolError("the lsyncd supervisor is already running")
        self._render()
        self._end_stale()
        self._runner = asyncio.create_task(self._run())

    def update_peers(self, peers: Iterable[str]) -> None:
        new = sorted(set(peers))
        if new != self._peers:
            self._peers = new
            self._changed.set()

    async def stop(self) -> None:
        if self._runner is None:
            return
        self._runner.cancel()
        await asyncio.gather(self._runner, return_exceptions=True)
        self._runner = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = self.settings.backoff[0]
        while True:
            self._changed.clear()
            if not self._peers:
                await self._changed.wait()
                await self._settled()
                continue
            started = loop.time()
            try:
                self._render()
            except ConfigError as err:
                LOG.error("%s", err)
                returncode: int | None = 1
            else:
                returncode = await self._run_once()
            if returncode is None:  # the peers changed: restart once they settle
                backoff = self.settings.backoff[0]
                continue
            if loop.time() - started >= self.settings.stable_after:
                backoff = self.settings.backoff[0]
            LOG.warning("lsyncd ended with status %d; restarting in %.1f s", returncode, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), backoff)
            backoff = min(backoff * 2, self.settings.backoff[1])

    def _end_stale(self) -> None:
        """End an lsyncd that an agent of this state dir started and never stopped (it
        was killed): it would go on calling the gate beside ours."""
        pid = end_stale(self.config_path)
        if pid is not None:
            LOG.warning("lsyncd %d, started by an agent that stopped without ending it, "
                        "was still running: ending it", pid)

    async def _settled(self) -> None:
        """Return once the peers have not changed for ``settle`` seconds, or after
        ``settle_max``."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.settings.settle_max
        while (left := end - loop.time()) > 0:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(self.settings.settle, left))
            except TimeoutError:
                return

    def _render(self) -> None:
        try:
            text = render_config(
                self.settings, self._peers, gate=self.gate_path, status_file=self.status_path
            )
            # A copy of its own, mode 0700: nobody else's to run or to change.
            tmp = self.gate_path.with_name(self.gate_path.name + ".tmp")
            shutil.copyfile(self.settings.gate, tmp)
            tmp.chmod(0o700)
            tmp.replace(self.gate_path)
            self.config_path.write_text(text)
        except (OSError, KeyError, ValueError) as err:  # KeyError: a template placeholder
            raise ConfigError(f"lsyncd config {self.config_path}: {err}") from err

    async def _run_once(self) -> int | None:
        """Run lsyncd until it exits (its status) or the peers change (None)."""
        try:
            proc = await asyncio.create_subprocess_exec(
                self.settings.lsyncd,
                str(self.config_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "MESH_GATE_SOCKET": str(self.settings.gate_socket)},
            )
        except OSError as err:
            LOG.error("cannot start %s: %s", self.settings.lsyncd, err.strerror or err)
            return 127  # as a shell reports a command it cannot run; retried with backoff
        assert proc.stdout is not None
        self._proc = proc
        self.starts += 1
        try:
            self.pid_path.write_text(f"{proc.pid}\n")
        except OSError as err:
            LOG.warning("lsyncd pid file %s: %s", self.pid_path, err)
        LOG.info("lsyncd %d started for %s", proc.pid, ", ".join(self._peers))
        output = asyncio.create_task(_log_lines(proc.stdout))
        exited = asyncio.create_task(proc.wait())
        changed = asyncio.create_task(self._changed.wait())
        try:
            await asyncio.wait({exited, changed}, return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                return proc.returncode
            await self._settled()  # this lsyncd carries on for the peers it has meanwhile
            return None
        finally:
            changed.cancel()
            await self._terminate(proc, exited)
            # the group is gone, so the pipe ends soon; do not wait on it forever
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(output), 1.0)
            output.cancel()
            await asyncio.gather(output, changed, return_exceptions=True)
            self._proc = None
            with contextlib.suppress(OSError):
                self.pid_path.unlink()

    async def _terminate(self, proc: asyncio.subprocess.Process, exited: asyncio.Task[int]) -> None:
        """SIGTERM to the group (again every ``term_again``), SIGKILL after ``stop_timeout``;
        then SIGKILL to the group
        again for a child that outlived lsyncd. Shielded: it runs to the end even when
        ``stop`` cancelled the supervisor."""

        async def terminate() -> None:
            loop = asyncio.get_running_loop()
            end = loop.time() + self.settings.stop_timeout
            while (left := end - loop.time()) > 0:
                _signal_group(proc.pid, signal.SIGTERM)
                done, _ = await asyncio.wait({exited}, timeout=min(self.settings.term_again, left))
                if done:
                    break
            else:
                LOG.warning("lsyncd %d ignored SIGTERM; killing its group", proc.pid)
            _signal_group(proc.pid, signal.SIGKILL)
            await exited

        task = asyncio.create_task(terminate())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await task
            raise


def end_stale(config_path: Path) -> int | None:
    """End the lsyncd named by the pid file beside ``config_path`` if it still runs on
    that config (a supervisor killed with its agent never stopped it): its pid, or None.
    Only a process whose command line names the config: the pid may have been given to
    another since. SIGKILL ends it at once; the wait for it to go is bounded (2 s). The
    pid file is removed."""
    pid_path = config_path.with_name(PID_FILE)
    try:
        pid = int(pid_path.read_text().split()[0])
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    ended = None
    if os.fsencode(config_path) in argv:
        _signal_group(pid, signal.SIGKILL)
        for _ in range(200):
            if _gone(pid):
                break
            time.sleep(0.01)
        ended = pid
    with contextlib.suppress(OSError):
        pid_path.unlink()
    return ended


def _gone(pid: int) -> bool:
    """No process ``pid``, or only its zombie (whose command line reads empty)."""
    try:
        return not Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# lsyncd's per-batch chatter: the paths of each list and its rsync calls. At info they
# would bury what an operator reads the log for.
_CHATTER = re.compile(r"^/|Normal: (Calling rsync|Finished a list)")


def log_level(line: str) -> int:
    """The level an output line of lsyncd (or of the gate it runs, which speaks only
    when the agent refused or could not be asked) is logged at."""
    if "Error:" in line or "Warn:" in line or line.startswith("mesh gate: "):
        return logging.WARNING
    return logging.DEBUG if _CHATTER.search(line) else logging.INFO


async def _log_lines(stream: asyncio.StreamReader) -> None:
    async for raw in stream:
        line = raw.decode("utf-8", "backslashreplace").rstrip()
        if line:
            LOG.log(log_level(line), "lsyncd: %s", line)
