"""The agent process's start (``mesh.engine.agent``): "caught up after start in X s"
counts from the process's start, imports included, now that the node is built after
the start-up walk began (issue 16)."""

from __future__ import annotations

import subprocess
import sys
import time

TICK = 0.01  # the kernel records a process's start in clock ticks (100 a second)

CHILD = """
import time
first = time.monotonic()
from mesh.engine.agent import process_age
print(process_age(), time.monotonic() - first)
"""


def test_a_process_s_age_covers_what_it_did_and_no_more_than_its_life() -> None:
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          check=True, timeout=60)
    lived = time.monotonic() - began
    age, since_first_line = map(float, done.stdout.split())
    assert since_first_line <= age + TICK
    assert age <= lived + TICK
