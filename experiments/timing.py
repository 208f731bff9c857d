"""Timing helper shared by the benchmarks."""

from __future__ import annotations

import time
from typing import Callable


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time in seconds of `repeats` calls of `fn` (which must block), after one warm-up call
    (compilation)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best
