"""``medseg pipeline compile | run --local | submit``: the Kubeflow pipeline from the CLI.

The pipeline itself lives in :mod:`pipelines.medseg_pipeline`; this module only compiles it to
IR YAML, runs it through ``kfp.local`` (SubprocessRunner: every step a subprocess of this Python,
with this process's environment), or uploads and starts it on a KFP backend.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

__all__ = ["compile_pipeline", "run_local", "submit", "upload"]


def compile_pipeline(out: Path) -> Path:
    """Write the pipeline's IR YAML to ``out``."""
    from kfp import compiler

    from pipelines.medseg_pipeline import medseg_pipeline

    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(medseg_pipeline, str(out))
    return out


def run_local(arguments: dict[str, Any], pipeline_root: Path) -> Path:
    """Run the pipeline end to end through ``kfp.local``; returns the local pipeline root.

    Object-store settings come from this process's environment (``S3_ENDPOINT``, …), which
    every step inherits.
    """
    import kfp.local

    from pipelines.medseg_pipeline import medseg_pipeline

    pipeline_root.mkdir(parents=True, exist_ok=True)
    kfp.local.init(
        runner=kfp.local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        raise_on_error=True,
    )
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with warnings.catch_warnings():
        # The steps' base_image is the project image, which kfp.local does not use.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        medseg_pipeline(**arguments)
    return pipeline_root


def submit(host: str, arguments: dict[str, Any], experiment: str, package: Path) -> str:
    """Upload-free run on a KFP backend (the compiled package is sent with the run)."""
    import kfp

    compile_pipeline(package)
    client = kfp.Client(host=host)
    run = client.create_run_from_pipeline_package(
        str(package), arguments=arguments, experiment_name=experiment
    )
    return str(run.run_id)


def upload(host: str, name: str, version: str, package: Path) -> str:
    """Upload the compiled pipeline to a KFP backend as ``name`` (a new version if it exists)."""
    import kfp

    compile_pipeline(package)
    client = kfp.Client(host=host)
    existing = client.get_pipeline_id(name)
    if existing is None:
        return str(client.upload_pipeline(str(package), pipeline_name=name).pipeline_id)
    result = client.upload_pipeline_version(
        str(package), pipeline_version_name=version, pipeline_id=existing
    )
    return str(result.pipeline_version_id)
