"""Timing helper shared by the experiments/ benchmarks."""

from __future__ import annotations

import time
from typing import Callable


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time in seconds of `fn()` (which must block until its result is ready) over `repeats`
    calls, after one warm-up call that also compiles."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best
