"""Run ``python -m loadtest run`` as the CI would, bounded by a subprocess timeout."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).absolute().parents[2]
RUN_S = 540


def run_profile(tmp_path: Path, *args: str) -> tuple[int, str]:
    """The harness's exit status and output; its report goes to ``tmp_path / report``."""
    argv = [sys.executable, "-m", "loadtest", "run", *args,
            "--report", str(tmp_path / "report"), "--work", str(tmp_path / "work"),
            "--no-progress"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=RUN_S)
    except subprocess.TimeoutExpired:
        # SIGINT: the harness stops its nodes on the way out; then the group, by its id.
        os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc.returncode, out.decode(errors="replace")
