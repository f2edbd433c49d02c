"""The CPUs a process may use: its container's CPU limit, not the node's cores.

PyTorch's CPU kernels (OpenMP) and OpenBLAS start one thread per core they see, and in a container
they see every core of the node. A pod limited to 1 CPU on a 64-core node would run 64 threads on 1
CPU's quota: the kernel throttles the pod, and a forward pass takes several times longer than with
one thread. :func:`fit_threads` reads the limit from the cgroup (v2 ``cpu.max``, v1
``cpu.cfs_quota_us``) and, unless ``OMP_NUM_THREADS`` is set already, sets it to the limit rounded
up. ``import medseg`` calls it, before any module of medseg imports torch or numpy, so every
process that runs medseg code (the CLI, the model server, a pipeline step, a training process)
and the processes it starts (loader workers, process pools) inherit it.
Where no limit is set (this machine, a process outside a container) it does nothing.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

__all__ = ["CGROUP", "cpu_limit", "fit_threads", "usable_cpus"]

#: Where Linux mounts the cgroup file systems.
CGROUP = Path("/sys/fs/cgroup")
#: The cgroup v1 controllers' folders that hold the CPU quota (their names vary by runtime).
_V1_FOLDERS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cpu_limit(root: Path = CGROUP) -> float | None:
    """The cgroup's CPU limit in CPUs (``1.5`` for a pod's ``1500m``), or None when unlimited."""
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        try:
            return None if quota == "max" else int(quota) / int(period or "100000")
        except ValueError:
            return None
    for folder in _V1_FOLDERS:
        v1_quota = _read(root / folder / "cpu.cfs_quota_us")
        v1_period = _read(root / folder / "cpu.cfs_period_us")
        if v1_quota is None or v1_period is None:
            continue
        try:
            q, p = int(v1_quota), int(v1_period)
        except ValueError:
            return None
        return q / p if q > 0 and p > 0 else None
    return None


def _fit(cores: int, limit: float | None) -> int:
    return cores if limit is None else max(1, min(cores, math.ceil(limit)))


def usable_cpus(root: Path = CGROUP) -> int:
    """The CPUs this process may keep busy: its affinity, capped by the cgroup's limit."""
    return _fit(len(os.sched_getaffinity(0)), cpu_limit(root))


def fit_threads(root: Path = CGROUP, environ: MutableMapping[str, str] | None = None) -> int | None:
    """Set ``OMP_NUM_THREADS`` to :func:`usable_cpus` when a CPU limit holds fewer than the cores.

    Leaves a value the user set alone. When torch is already imported its thread count is set
    too (the variable is read when torch starts).

    Args:
        root: The cgroup mount.
        environ: The environment to change (this process's by default).

    Returns:
        The thread count set, or None when nothing changed.
    """
    environ = os.environ if environ is None else environ
    if "OMP_NUM_THREADS" in environ:
        return None
    cores = len(os.sched_getaffinity(0))
    threads = _fit(cores, cpu_limit(root))
    if threads >= cores:  # no limit, or none below the cores
        return None
    environ["OMP_NUM_THREADS"] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None and environ is os.environ:
        torch.set_num_threads(threads)
    return threads
