"""Timing helpers for the benchmarks: interleaved repeats (background load hits every
contender alike), median with min–max."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, calling them in turn `repeats` times after warm-up."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def timed_pair(baseline: Callable[[], object], ours: Callable[[], object], repeats: int) -> tuple[list[float], list[float]]:
    times = interleaved({"baseline": baseline, "ours": ours}, repeats)
    return times["baseline"], times["ours"]


def median_range(values: list[float], digits: int = 3) -> str:
    """'median (min–max)'."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"
