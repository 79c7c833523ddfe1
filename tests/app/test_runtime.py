"""The process runtime settings: the garbage collector's thresholds, and start-up's objects frozen."""

from __future__ import annotations

import gc

from app.runtime import THRESHOLDS, freeze_start_up_objects, tune_garbage_collector


def test_the_collector_runs_rarely_and_leaves_start_up_objects_alone() -> None:
    before = gc.get_threshold()
    try:
        tune_garbage_collector()
        assert gc.get_threshold() == THRESHOLDS and THRESHOLDS[0] > before[0]
        start_up = [object() for _ in range(10)], {"built": "at start-up"}
        freeze_start_up_objects()
        assert gc.get_freeze_count() >= 2
        # Frozen: a collection no longer tracks them among its generations.
        assert not any(start_up[1] is o for o in gc.get_objects())
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
