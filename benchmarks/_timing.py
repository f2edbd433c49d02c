"""The benchmarks' one timer (the median wall time of repeated calls), and peak memory.

Imported by the scripts in this folder as ``from _timing import median_time`` (a script's own
folder is first on ``sys.path`` when run as ``python benchmarks/NAME.py``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` (each timed with ``perf_counter``)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mib(pid: int | str = "self") -> float:
    """A process's peak RSS in MiB: the kernel's ``VmHWM`` (exact, no sampling).

    ``resource.getrusage``'s ``ru_maxrss`` would keep the parent's peak across ``exec``.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
