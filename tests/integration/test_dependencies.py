"""Every import is a declared dependency: ``make deps`` (deptry, also part of ``make lint``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_imports_match_declared_dependencies() -> None:
    # Before orjson, httpx, grpcio, fastapi and kubernetes were declared, deptry reported them as
    # DEP003 (imported, but only present as someone else's dependency).
    done = subprocess.run(
        ["make", "-s", "deps"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert out.count("No dependency issues found") == 2, out
