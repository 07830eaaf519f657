"""The agent's process: logging, uvloop when available, signal capture, and start-up
errors as one line for the operator (bad certificate, port in use, unreadable state);
``mesh.engine.node`` is the node it runs."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

from mesh import logs
from mesh.adapters.fs.walker import against_index
from mesh.adapters.fs.watcher import Watcher
from mesh.config import AgentConfig
from mesh.engine import gcpolicy
from mesh.engine.loopwatch import LoopWatch
from mesh.engine.nodestate import NodeState
from mesh.engine.startwalk import StartWalk
from mesh.errors import MeshError

LOG = logging.getLogger("mesh.engine.node")


def run_agent(config: AgentConfig) -> int:
    """Run one node until SIGTERM or SIGINT; returns the process exit code."""
    logs.setup(config.node_id, config.log_format, config.log_level)
    try:
        state = NodeState.open(config)
    except MeshError as err:
        LOG.error("cannot start: %s", err)
        return 2
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.Runner()
    gcpolicy.tune()  # issue 3: the collector's passes were the latency's tail
    with runner:
        return runner.run(_main(config, state))


def process_age() -> float:
    """Seconds since this process started (its imports included), from the kernel's
    record of its start; 0.0 where that cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        began = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, ticks
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - began)
    except (OSError, ValueError, IndexError):
        return 0.0


async def _main(config: AgentConfig, state: NodeState) -> int:
    stop = asyncio.Event()  # a stop during the start ends the node as it begins to run
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The start-up walk first, in its own process: the node's imports and its
    # servers' start run beside it (mesh.engine.startwalk).
    startwalk = StartWalk(lambda: against_index(state.scanner, state.index), state.keep,
                          lambda: Watcher(config.data_dir, quiet=config.batch_quiet,
                                          cap=config.batch_cap, max_paths=4096))
    await startwalk.walking()
    try:
        # The certificates (cryptography), the broker and the rest: beside the walk.
        from mesh.engine.node import Node
        from mesh.pki import load_node

        creds = load_node(config.pki_dir, config.node_id)
        node = Node(config, creds, state, startwalk, started=time.monotonic() - process_age())
    except BaseException as failed:
        await startwalk.abandon()
        state.index.close()
        if not isinstance(failed, MeshError):
            raise
        LOG.error("cannot start: %s", failed)
        return 2
    failures: list[BaseException] = []
    watch = LoopWatch(loop)  # logs where the loop is, when it is held for seconds
    watch.start()
    try:
        await node.run(stop)
    except* (MeshError, OSError) as group:
        failures = list(group.exceptions)
    finally:
        watch.stop()
    for err in failures:
        LOG.error("%s", err if isinstance(err, MeshError) else f"I/O error: {err}")
    if failures:
        return 1 if stop.is_set() else 2
    return 0
