"""The container's CPU limit read from the cgroup, and the thread count set from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medseg.core.cpus import cpu_limit, fit_threads, usable_cpus

CORES = len(os.sched_getaffinity(0))


def _v2(root: Path, text: str) -> Path:
    (root / "cpu.max").write_text(text + "\n")
    return root


def _v1(root: Path, quota: int, period: int = 100000, folder: str = "cpu,cpuacct") -> Path:
    (root / folder).mkdir()
    (root / folder / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (root / folder / "cpu.cfs_period_us").write_text(f"{period}\n")
    return root


def test_the_limit_is_read_from_cgroup_v2_and_v1(tmp_path: Path) -> None:
    cases = {
        "v2-1500m": (_v2, "150000 100000", 1.5),
        "v2-none": (_v2, "max 100000", None),
        "v2-garbled": (_v2, "lots", None),
    }
    for name, (make, text, want) in cases.items():
        root = tmp_path / name
        root.mkdir()
        assert cpu_limit(make(root, text)) == want, name
    root = tmp_path / "v1"
    root.mkdir()
    assert cpu_limit(_v1(root, 50000)) == 0.5
    root = tmp_path / "v1-none"
    root.mkdir()
    assert cpu_limit(_v1(root, -1, folder="cpu")) is None
    assert cpu_limit(tmp_path / "no-cgroup") is None


def test_threads_follow_a_limit_below_the_cores(tmp_path: Path) -> None:
    one = _v2(tmp_path, "100000 100000")
    assert usable_cpus(one) == 1
    env: dict[str, str] = {}
    assert fit_threads(one, env) == (1 if CORES > 1 else None)
    assert env == ({"OMP_NUM_THREADS": "1"} if CORES > 1 else {})
    # A value the user set is theirs.
    mine = {"OMP_NUM_THREADS": "3"}
    assert fit_threads(one, mine) is None and mine == {"OMP_NUM_THREADS": "3"}
    # A limit at or above the cores changes nothing.
    (tmp_path / "cpu.max").write_text(f"{(CORES + 2) * 100000} 100000\n")
    assert usable_cpus(tmp_path) == CORES
    untouched: dict[str, str] = {}
    assert fit_threads(tmp_path, untouched) is None and untouched == {}


@pytest.mark.skipif(CORES < 2, reason="a 1-CPU limit is below the cores only with 2 or more")
def test_torch_already_imported_gets_the_thread_count(tmp_path: Path) -> None:
    one = _v2(tmp_path, "100000 100000")
    code = (
        "import os, sys, torch\n"
        "from pathlib import Path\n"
        "from medseg.core.cpus import fit_threads\n"
        f"print(fit_threads(Path({str(one)!r})), os.environ['OMP_NUM_THREADS'], "
        "torch.get_num_threads())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1", "1"]
