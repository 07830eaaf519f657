"""The agent's process: logging, uvloop when available, signal capture, and start-up
errors as one line for the operator (bad certificate, port in use, unreadable state);
``mesh.engine.node`` is the node it runs."""

from __future__ import annotations

import asyncio
import logging
import signal

from mesh import logs
from mesh.config import AgentConfig
from mesh.engine import gcpolicy
from mesh.engine.loopwatch import LoopWatch
from mesh.engine.node import Node
from mesh.errors import MeshError
from mesh.pki import load_node

LOG = logging.getLogger("mesh.engine.node")


def run_agent(config: AgentConfig) -> int:
    """Run one node until SIGTERM or SIGINT; returns the process exit code."""
    logs.setup(config.node_id, config.log_format, config.log_level)
    try:
        creds = load_node(config.pki_dir, config.node_id)
        node = Node(config, creds)
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
        return runner.run(_main(node))


async def _main(node: Node) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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
