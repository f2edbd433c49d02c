"""The benchmarks' one timer: the median wall time of repeated calls.

Imported by the scripts in this folder as ``from _timing import median_time`` (a script's own
folder is first on ``sys.path`` when run as ``python benchmarks/NAME.py``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` (each timed with ``perf_counter``)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
