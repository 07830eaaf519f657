"""The agent's collector settings."""

from __future__ import annotations

import gc

from mesh.engine import gcpolicy


def test_tune_freezes_the_start_and_makes_passes_rarer() -> None:
    before = gc.get_threshold()
    try:
        gcpolicy.tune()
        assert gc.get_freeze_count() > 0
        young, _, old = gc.get_threshold()
        assert young >= 10 * before[0] and old > before[2]
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
