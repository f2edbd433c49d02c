"""The test cluster's script and its command-line tools, shared by the cluster test modules.

``CL`` is ``scripts/cluster.py`` loaded once (its ports, paths and ``up``/``down``); ``kubectl``,
``helm`` and ``eventually`` talk to the control plane it runs. :func:`load_script` loads any
script of ``scripts/`` (they are programs, not a package).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "cluster.py"


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as the module ``medseg_<name>`` (loaded once per test run)."""
    module_name = f"medseg_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


CL = load_script("cluster")


def kubectl(
    *args: str, stdin: str | None = None, kubeconfig: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``kubectl`` against the test cluster (admin unless another kubeconfig is given)."""
    cmd = [str(CL.BIN / "kubectl"), "--kubeconfig", str(kubeconfig or CL.KUBECONFIG), *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=180)


def kubectl_json(*args: str) -> Any:
    """``kubectl … -o json``, parsed (the command must succeed)."""
    done = kubectl(*args, "-o", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    """``helm`` against the test cluster."""
    cmd = [str(CL.BIN / "helm"), "--kubeconfig", str(CL.KUBECONFIG), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def eventually(check: Callable[[], Any], timeout: float = 90, what: str = "") -> Any:
    """Poll ``check`` until it returns something truthy (the controllers work asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:.0f} s: {what}")
        time.sleep(1)
