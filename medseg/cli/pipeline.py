"""``medseg pipeline compile | upload | run --local | submit``: the Kubeflow pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from medseg.cli.common import (
    ConfigOpt,
    StoreOpt,
    ThresholdOpt,
    app,
    console,
    handles_errors,
    load_config,
)
from medseg.core.errors import MedsegError
from medseg.core.settings import DEFAULT_MODEL_NAME, DEFAULT_STORE
from medseg.platform.kube import DEFAULT_RELEASE, Release
from medseg.platform.pipeline_params import pipeline_arguments
from medseg.platform.pipeline_runner import compile_pipeline, run_local, submit, upload

pipeline_app = typer.Typer(help="The Kubeflow pipeline: compile, run locally, submit.")
app.add_typer(pipeline_app, name="pipeline")

PipelineSource = Annotated[str, typer.Option(help="Raw dataset folder (or s3:// prefix).")]
EpochsOpt = Annotated[int, typer.Option(help="Overrides train.epochs when above 0.")]
ModelNameOpt = Annotated[str, typer.Option(help="Registry name.")]
LauncherOpt = Annotated[str, typer.Option(help="local or pytorchjob.")]
PipelineParams = Annotated[
    list[str] | None,
    typer.Option(
        "--param",
        help="Any other pipeline parameter: KEY=VALUE, or GROUP.FIELD=VALUE for a field of the "
        "training, cluster or deployment group (e.g. training.epochs=2, deployment.mode=Standard).",
    ),
]
HostOpt = Annotated[str, typer.Option(help="KFP API endpoint, e.g. http://ml-pipeline:8888.")]
NamespaceOpt = Annotated[
    str, typer.Option(help="Namespace of the Helm release: the run, its jobs and services.")
]
ReleaseOpt = Annotated[
    str, typer.Option(help="The chart's release (names its ServiceAccount, Secret, ConfigMap).")
]
ServiceAccountOpt = Annotated[
    str | None,
    typer.Option(help="The run's ServiceAccount if the chart's pipeline.serviceAccount is set."),
]


def _params(
    source: str,
    store: str,
    threshold: float,
    model_name: str,
    target: str,
    epochs: int,
    workers: int,
    launcher: str,
) -> dict[str, Any]:
    """The pipeline parameters the run and submit options set (``--param`` may override)."""
    return {
        "source": source,
        "store": store,
        "threshold": threshold,
        "model_name": model_name,
        "deployment": {"target": target},
        "training": {"epochs": epochs, "workers": workers, "launcher": launcher},
    }


@pipeline_app.command("compile")
@handles_errors
def pipeline_compile(
    out: Annotated[Path, typer.Option("--out", "-o", help="IR YAML to write.")] = Path(
        "medseg-pipeline.yaml"
    ),
) -> None:
    """Compile the pipeline to KFP IR YAML."""
    from pipelines.medseg_pipeline import medseg_pipeline

    console.print(f"compiled pipeline: {compile_pipeline(medseg_pipeline, out)}")


@pipeline_app.command("upload")
@handles_errors
def pipeline_upload(
    host: HostOpt,
    name: Annotated[str, typer.Option(help="Pipeline name on the backend.")] = "medseg-brats",
    version: Annotated[str, typer.Option(help="Version name when the pipeline exists.")] = (
        "0.1.0"
    ),
) -> None:
    """Compile and upload the pipeline to a Kubeflow Pipelines backend (the chart's Job)."""
    from pipelines.medseg_pipeline import medseg_pipeline

    uploaded = upload(medseg_pipeline, host, name, version, Path("/tmp/medseg-pipeline.yaml"))
    console.print(f"uploaded pipeline {name} ({uploaded}) to {host}")


@pipeline_app.command("run")
@handles_errors
def pipeline_run(
    source: PipelineSource,
    local: Annotated[bool, typer.Option("--local", help="Run through kfp.local.")] = False,
    store: StoreOpt = DEFAULT_STORE,
    config: ConfigOpt = None,
    epochs: EpochsOpt = 0,
    workers: Annotated[int, typer.Option(help="Training processes.")] = 2,
    launcher: LauncherOpt = "local",
    threshold: ThresholdOpt = 0.8,
    model_name: ModelNameOpt = DEFAULT_MODEL_NAME,
    root: Annotated[Path, typer.Option(help="kfp.local pipeline root.")] = Path(
        ".medseg/kfp-local"
    ),
    param: PipelineParams = None,
) -> None:
    """Run the whole pipeline on this machine through kfp.local."""
    if not local:
        raise MedsegError("only --local runs here; use `medseg pipeline submit` for a cluster")
    from pipelines.medseg_pipeline import medseg_pipeline

    params = _params(source, store, threshold, model_name, "local", epochs, workers, launcher)
    cfg = load_config(config) if config else None
    args = pipeline_arguments(params, cfg, param or [])
    run_local(medseg_pipeline, args, root)
    console.print(f"pipeline finished; local outputs under {root}")


@pipeline_app.command("submit")
@handles_errors
def pipeline_submit(
    source: PipelineSource,
    host: HostOpt,
    store: StoreOpt = DEFAULT_STORE,
    config: ConfigOpt = None,
    epochs: EpochsOpt = 0,
    workers: Annotated[int, typer.Option(help="PyTorchJob pods.")] = 2,
    launcher: LauncherOpt = "pytorchjob",
    threshold: ThresholdOpt = 0.8,
    model_name: ModelNameOpt = DEFAULT_MODEL_NAME,
    experiment: Annotated[str, typer.Option(help="KFP experiment.")] = "medseg",
    namespace: NamespaceOpt = DEFAULT_RELEASE.namespace,
    release: ReleaseOpt = DEFAULT_RELEASE.name,
    service_account: ServiceAccountOpt = None,
    param: PipelineParams = None,
) -> None:
    """Compile and start the pipeline on a Kubeflow Pipelines backend."""
    from pipelines.medseg_pipeline import medseg_pipeline

    params = _params(source, store, threshold, model_name, "kserve", epochs, workers, launcher)
    params["cluster"] = {"namespace": namespace, "release": release}
    cfg = load_config(config) if config else None
    args = pipeline_arguments(params, cfg, param or [])
    package = Path(".medseg/medseg-pipeline.yaml")
    names = Release(args["cluster"]["release"], args["cluster"]["namespace"])
    run_id = submit(medseg_pipeline, host, args, experiment, package, names, service_account)
    console.print(
        f"submitted run {run_id} to {host} (namespace {names.namespace}, "
        f"service account {service_account or names.pipeline_service_account})"
    )
