"""What lsyncd runs as rsync: ``python -m mesh.gatecall`` (the wrapper script of
``mesh.adapters.lsyncd``; ``mesh gate`` is the same for people), see ``mesh.gate``.

lsyncd starts it once per batch and peer on every node, also for each file a peer pushed
here, which this node may not pass on; and the agent pushes its own writes itself. So the
usual answer is "nothing may go", and it must cost little: this module asks the agent with
the standard library and msgpack only, and imports the push machinery (asyncio, TLS) only
for a grant that allows something. The unix connection stays open while that push runs:
the agent counts the granted paths as on their way until it closes.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Mapping
from typing import Any, BinaryIO

from mesh.adapters.lsyncd_call import CallError, parse_rsync_call, paths_from_patterns
from mesh.frames import FrameError, encode_frame, recv_frame

LOG = logging.getLogger("mesh.gate")

VERSION = 1
EXIT_USAGE = 1  # lsyncd's "die": a command line the gate does not understand is a bug
EXIT_RETRY = 10  # rsync's "socket I/O error", which lsyncd 2.2.3 retries ("again")
MAX_PATHS_BYTES = 32 * 1024 * 1024
MAX_HEADER_BYTES = 4 * 1024 * 1024  # a push's announcement (mesh.adapters.tunnel)
MAX_REPLY_BYTES = MAX_PATHS_BYTES + MAX_HEADER_BYTES + 4096
ASK_TIMEOUT_S = 30.0


class _Unavailable(Exception):
    pass


def run_gate(argv: list[str], stdin: BinaryIO, environ: Mapping[str, str]) -> int:
    """``mesh gate``: lsyncd's rsync binary. Returns the exit status for lsyncd."""
    try:
        call = parse_rsync_call(argv)
        missing = [k for k in ("MESH_GATE_SOCKET", "MESH_DATA_DIR") if not environ.get(k)]
        if missing:
            raise CallError(f"{', '.join(missing)} not set")
        if os.path.realpath(call.source) != os.path.realpath(environ["MESH_DATA_DIR"]):
            raise CallError(f"source {call.source} is not the data dir "
                            f"{environ['MESH_DATA_DIR']}")
    except CallError as err:
        LOG.error("%s", err)
        return EXIT_USAGE
    data = stdin.read(MAX_PATHS_BYTES + 1)
    if len(data) > MAX_PATHS_BYTES:
        LOG.error("more than %d bytes of patterns on stdin", MAX_PATHS_BYTES)
        return EXIT_USAGE
    paths = paths_from_patterns(data)
    if not paths:
        return 0
    where = f"agent at {environ['MESH_GATE_SOCKET']}"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as agent:
            reply = _ask(agent, environ["MESH_GATE_SOCKET"], call.peer, paths)
            if _allows_nothing(reply):
                LOG.info("0 of %d path(s) may go to %s", len(paths), call.peer)
                LOG.debug("held back: %s", paths)
                return 0
            from mesh import gate  # the push machinery, only for a push

            return gate.push_granted(reply, call.peer, paths, environ)  # holding `agent`
    except _Unavailable as err:
        LOG.error("%s: %s", where, err)
        return EXIT_RETRY


def _ask(agent: socket.socket, path: str, peer: str, paths: list[str]) -> Any:
    agent.settimeout(ASK_TIMEOUT_S)
    try:
        agent.connect(path)
        agent.sendall(encode_frame({"v": VERSION, "target": peer, "paths": "\0".join(paths)}))
        return recv_frame(agent, MAX_REPLY_BYTES)
    except TimeoutError:
        raise _Unavailable(f"no answer within {ASK_TIMEOUT_S:g} s") from None
    except OSError as err:
        raise _Unavailable(err.strerror or str(err)) from None
    except FrameError as err:
        raise _Unavailable(str(err)) from None


def _allows_nothing(reply: Any) -> bool:
    """A well-formed grant of no path; anything else goes to ``mesh.gate``'s strict check."""
    grant = reply.get("grant") if isinstance(reply, dict) and reply.get("v") == VERSION else None
    return isinstance(grant, dict) and grant.get("allowed") == ""


def main() -> int:
    level = os.environ.get("MESH_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(stream=sys.stderr, level=level, format="mesh gate: %(message)s")
    return run_gate(sys.argv[1:], sys.stdin.buffer, os.environ)


if __name__ == "__main__":
    sys.exit(main())
