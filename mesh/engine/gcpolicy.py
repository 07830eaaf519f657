"""The agent's garbage-collector settings (issue 3: manifest latency and throughput).

CPython's collector runs a young pass every 700 allocations and now and then a
full pass over every tracked object: the modules, amqtt, the caches. Nearly all
of the agent's garbage is freed by reference counting (manifests, entries and
SQLite rows do not form cycles), so those passes find little and cost a lot. In
bench/mqtt_mesh.py (three nodes in one process) they took about 15 % of the CPU
while 100,000 paths went through, with 15-25 ms full passes on an idle machine
and up to 300 ms on a loaded one: the tail of the manifest latency.

``tune()`` freezes what exists at start (imports, configuration: it never
becomes garbage and is never scanned again) and makes the passes rarer, so each
young pass looks at up to 10,000 objects (a few ms at most) and a full pass
comes a hundred times less often. Cycles are still collected, later.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000  # allocations between young passes (CPython: 700)
MIDDLE_THRESHOLD = 10  # young passes per middle pass (CPython: 10)
OLD_THRESHOLD = 100  # middle passes per full pass (CPython: 10)


def tune() -> None:
    """Call once the process has started (imports done, state loaded)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, OLD_THRESHOLD)
