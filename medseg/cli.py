"""The ``medseg`` command line.

Each command parses its options and calls one library function; expected failures
(:class:`~medseg.errors.MedsegError`) print one clear line and exit 1, without a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from medseg.config import MedsegConfig
from medseg.errors import MedsegError
from medseg.kube import DEFAULT_RELEASE

app = typer.Typer(help="medseg: 3D medical image segmentation MLOps.", no_args_is_help=True)
datasets_app = typer.Typer(help="Inspect stored datasets.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
models_app = typer.Typer(help="Inspect the model registry.", no_args_is_help=True)
app.add_typer(models_app, name="models")
pipeline_app = typer.Typer(help="The Kubeflow pipeline: compile, run locally, submit.")
app.add_typer(pipeline_app, name="pipeline")
console = Console(soft_wrap=True)
err_console = Console(stderr=True)

P = ParamSpec("P")
R = TypeVar("R")

StoreOpt = Annotated[
    str,
    typer.Option(
        envvar="MEDSEG_STORE", help="Root of the platform's store: s3://BUCKET or a folder."
    ),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="medseg config YAML (defaults otherwise).")
]


def _handles_errors(fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except MedsegError as exc:
            _fail(str(exc))
        except OSError as exc:  # the user's files and folders: missing, a file not a folder…
            _fail(f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc))

    return wrapper


def _fail(message: str) -> NoReturn:
    """One line on stderr, exit status 1."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _config(path: Path | None) -> MedsegConfig:
    return MedsegConfig.load(path) if path else MedsegConfig()


@app.command()
@_handles_errors
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the cases into.")],
    layout: Annotated[str, typer.Option(help="brats2021, brats2023 or msd.")] = "brats2021",
    cases: Annotated[int, typer.Option(min=1, help="Number of cases.")] = 8,
    shape: Annotated[
        tuple[int, int, int], typer.Option(help="Volume shape; 240 240 155 is full BraTS size.")
    ] = (96, 96, 64),
    seed: Annotated[int, typer.Option(help="Dataset seed.")] = 0,
    fmt: Annotated[
        str,
        typer.Option(
            "--format", help="nifti, or dicom (MR studies; labels in --layout's convention)."
        ),
    ] = "nifti",
) -> None:
    """Write deterministic synthetic BraTS-like cases in a public layout, or as DICOM studies."""
    from medseg.synth import write_dataset, write_dicom_dataset

    if layout not in ("brats2021", "brats2023", "msd"):
        raise MedsegError(f"unknown layout {layout!r}: use brats2021, brats2023 or msd")
    if fmt not in ("nifti", "dicom"):
        raise MedsegError(f"unknown format {fmt!r}: use nifti or dicom")
    if fmt == "dicom":
        ids = write_dicom_dataset(out, cases, shape, seed, convention=layout)
        console.print(f"wrote {len(ids)} DICOM studies ({layout} labels) of shape {shape} to {out}")
    else:
        ids = write_dataset(out, layout, cases, shape, seed)
        console.print(f"wrote {len(ids)} {layout} cases of shape {shape} to {out}")


@app.command()
@_handles_errors
def ingest(
    source: Annotated[str, typer.Argument(help="Dataset folder or s3:// prefix.")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset name.")],
    store: StoreOpt = "s3://medseg",
    labels: Annotated[
        str | None, typer.Option(help="Label convention override: brats2021, brats2023, msd.")
    ] = None,
    strict: Annotated[bool, typer.Option(help="Fail if any case is invalid.")] = False,
    workers: Annotated[int, typer.Option(min=1, help="Validation processes.")] = 1,
    config: ConfigOpt = None,
) -> None:
    """Validate raw cases, quarantine bad ones, and store a versioned dataset."""
    from medseg.ingest import ingest as run_ingest

    cfg = _config(config)
    result = run_ingest(
        source, dataset, store, labels=labels, split=cfg.split, strict=strict, workers=workers
    )
    m = result.manifest
    verb = "stored" if result.created else "already stored (no-op)"
    console.print(
        f"dataset [bold]{result.ref}[/] {verb}: layout {m.layout}, labels {m.convention}, "
        f"{len(m.cases)} valid cases ({len(m.split_ids('train'))} train, "
        f"{len(m.split_ids('validation'))} validation), {result.uploaded} files uploaded"
    )
    if m.quarantined:
        table = Table(title=f"{len(m.quarantined)} quarantined cases")
        table.add_column("case")
        table.add_column("file")
        table.add_column("reason")
        for q in m.quarantined:
            table.add_row(q.case_id, q.file or "", q.reason)
        console.print(table)
    console.print(f"manifest: {result.ref.manifest_uri}")


@app.command()
@_handles_errors
def preprocess(
    dataset: Annotated[
        str, typer.Option("--dataset", "-d", help="NAME, NAME@latest or NAME@VERSION.")
    ],
    store: StoreOpt = "s3://medseg",
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = max(
        1, min(4, os.cpu_count() or 1)
    ),
    config: ConfigOpt = None,
) -> None:
    """Run the static preprocessing once per case and cache the result in the store."""
    from medseg.preprocess import preprocess as run_preprocess

    result = run_preprocess(dataset, store, _config(config).data, workers=workers)
    n = len(result.index["cases"])
    if result.processed:
        console.print(f"preprocessed {result.processed} of {n} cases into {result.prefix}")
    else:
        console.print(f"all {n} cases already preprocessed (no-op): {result.prefix}")


@app.command("train")
@_handles_errors
def train_cmd(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="NAME[@VERSION], preprocessed.")],
    run_id: Annotated[str, typer.Option(help="Run id; the same id resumes the run.")],
    store: StoreOpt = "s3://medseg",
    config: ConfigOpt = None,
    nproc_per_node: Annotated[
        int, typer.Option(min=1, help="Processes; above 1, torchrun starts them (gloo on CPU).")
    ] = 1,
    max_restarts: Annotated[
        int, typer.Option(min=0, help="torchrun restarts after a failure.")
    ] = 3,
) -> None:
    """Train SegResNet on a preprocessed dataset (resumes the run if it has checkpoints)."""
    import subprocess
    import sys

    from medseg.names import check_name

    check_name(run_id, "run id")

    if nproc_per_node > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc_per_node),
            "--max-restarts",
            str(max_restarts),
            "-m",
            "medseg.train",
            "--dataset",
            dataset,
            "--run-id",
            run_id,
            "--store",
            store,
        ]
        if config:
            cmd += ["--config", str(config)]
        rc = subprocess.call(cmd)
        if rc:
            raise MedsegError(f"training run {run_id} failed (torchrun exit code {rc})")
        return
    from medseg.train import train

    result = train(dataset, store, run_id, _config(config))
    best = result.best
    console.print(
        f"run {run_id}: {len(result.history)} epochs (resumed after {result.resumed_from}), "
        f"best mean Dice {best.get('dice_mean', float('nan')):.3f} at epoch {best.get('epoch')}; "
        f"model in {result.run_prefix}/model/"
    )


@app.command("evaluate")
@_handles_errors
def evaluate_cmd(
    model: Annotated[
        str, typer.Option(help="Run id, NAME@VERSION from the registry, or a model URI.")
    ],
    store: StoreOpt = "s3://medseg",
    dataset: Annotated[
        str | None, typer.Option(help="NAME@VERSION; default: the model's training dataset.")
    ] = None,
    split: Annotated[str, typer.Option(help="validation, train or all.")] = "validation",
    threshold: Annotated[
        float | None, typer.Option(help="Quality gate on the mean Dice over TC/WT/ET.")
    ] = None,
    enforce: Annotated[bool, typer.Option(help="Exit with status 3 when the gate fails.")] = False,
    out: Annotated[str | None, typer.Option(help="Output prefix; default: RUN/eval.")] = None,
    predictions: Annotated[
        str | None,
        typer.Option(help="Output of `medseg predict` for the split; default: predict it now."),
    ] = None,
) -> None:
    """Score the served label maps of a split (Dice, HD95 in mm), report, optional gate."""
    from medseg.evaluate import evaluate
    from medseg.storage import Storage

    storage = Storage()
    uri = _model_uri(storage, store, model)
    result = evaluate(
        uri,
        dataset=dataset,
        store=store if dataset else None,
        split=split,
        threshold=threshold,
        out=out,
        storage=storage,
        predictions=predictions,
    )
    table = Table(title=f"{result.dataset} · {split} · {len(result.cases)} cases")
    for col in ("region", "Dice", "HD95 (mm)"):
        table.add_column(col, justify="right")
    for region in result.dice:
        table.add_row(region, f"{result.dice[region]:.4f}", f"{result.hd95[region]:.2f}")
    table.add_row("mean", f"{result.dice_mean:.4f}", "")
    console.print(table)
    console.print(f"metric: {result.definition}", highlight=False)
    if result.missing:
        console.print(f"no prediction (scored as empty): {', '.join(result.missing)}")
    console.print(f"report: {result.out}/report.html")
    if threshold is not None:
        verdict = "passed" if result.passed else "FAILED"
        console.print(f"quality gate (mean Dice ≥ {threshold}): {verdict}")
        if enforce and not result.passed:
            raise typer.Exit(3)


def _model_uri(storage: Any, store: str, model: str) -> str:
    """A run id, a registered NAME@VERSION, or a model URI, to the model's prefix."""
    from medseg.register import resolve_model
    from medseg.storage import is_s3, join

    if is_s3(model) or Path(model).is_dir():
        return model
    if "@" in model:
        return resolve_model(storage, store, model)
    return join(store, "runs", model, "model")


@app.command()
@_handles_errors
def serve(
    model: Annotated[
        str, typer.Option(help="Run id, NAME@VERSION from the registry, or a model folder/URI.")
    ],
    store: StoreOpt = "s3://medseg",
    name: Annotated[str, typer.Option(help="Model name in the URL.")] = "medseg",
    http_port: Annotated[int, typer.Option(help="REST port.")] = 8080,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8081,
    host: Annotated[
        str | None,
        typer.Option(
            help="Interface for REST and gRPC (default: MEDSEG_SERVER_HOST, else 127.0.0.1)."
        ),
    ] = None,
    max_request_mb: Annotated[
        int | None,
        typer.Option(
            help="Largest request, MiB (default: MEDSEG_SERVER_MAX_REQUEST_MB, else 256)."
        ),
    ] = None,
    max_concurrency: Annotated[
        int | None, typer.Option(help="Cases segmented at once (default: 1).")
    ] = None,
) -> None:
    """Serve a model with kserve's ModelServer (Open Inference Protocol v2, REST and gRPC).

    It listens on loopback unless --host (or MEDSEG_SERVER_HOST) says otherwise; every other
    limit is a MEDSEG_SERVER_* variable (medseg.settings.ServerLimits).
    """
    from medseg.storage import Storage

    uri = _model_uri(Storage(), store, model)
    from model_server.server import serve as run_server

    argv = ["--model_dir", uri, "--model_name", name]
    argv += ["--http_port", str(http_port), "--grpc_port", str(grpc_port)]
    for flag, value in (
        ("--host", host),
        ("--max_request_mb", max_request_mb),
        ("--max_concurrency", max_concurrency),
    ):
        if value is not None:
            argv += [flag, str(value)]
    run_server(argv)


@app.command("deploy")
@_handles_errors
def deploy_cmd(
    model: Annotated[str, typer.Argument(help="Registered model: s3://BUCKET/models/NAME/vN.")],
    image: Annotated[
        str | None, typer.Option(help="The model server image (default: the chart's).")
    ] = None,
    name: Annotated[str, typer.Option(help="InferenceService (and model) name.")] = (
        "brats-segresnet"
    ),
    namespace: Annotated[str, typer.Option(help="The chart's release namespace.")] = "medseg",
    release: Annotated[str, typer.Option(help="The chart's release (names its objects).")] = (
        "medseg"
    ),
    mode: Annotated[str, typer.Option(help="Knative or Standard.")] = "Knative",
    min_replicas: Annotated[int, typer.Option(help="Fewest replicas.")] = 1,
    max_replicas: Annotated[int, typer.Option(help="Most replicas.")] = 3,
    scale_metric: Annotated[
        str | None, typer.Option(help="concurrency/rps (Knative), cpu/memory (Standard).")
    ] = None,
    scale_target: Annotated[int | None, typer.Option(help="Target per replica.")] = None,
    cpu: Annotated[str | None, typer.Option(help="CPU request per replica (chart: 2).")] = None,
    memory: Annotated[
        str | None, typer.Option(help="Memory request per replica (chart: 8Gi).")
    ] = None,
    cpu_limit: Annotated[str | None, typer.Option(help="CPU limit per replica (chart: 4).")] = None,
    memory_limit: Annotated[
        str | None, typer.Option(help="Memory limit per replica (default: the request).")
    ] = None,
    gpus: Annotated[int, typer.Option(help="GPUs per replica.")] = 0,
    timeout: Annotated[int, typer.Option(help="Seconds to wait for Ready.")] = 900,
    recreate: Annotated[
        bool, typer.Option(help="Delete and recreate the service to change its mode.")
    ] = False,
) -> None:
    """Create or patch the KServe InferenceService of a registered model; wait until Ready."""
    from medseg.deploy import deploy_model
    from medseg.kube import Release

    url = deploy_model(
        model, name, Release(release, namespace), timeout=timeout, deployment_mode=mode,
        scale_metric=scale_metric, scale_target=scale_target, recreate=recreate, image=image,
        min_replicas=min_replicas, max_replicas=max_replicas, cpu=cpu, memory=memory,
        cpu_limit=cpu_limit, memory_limit=memory_limit, gpus=gpus,
    )  # fmt: skip
    console.print(f"InferenceService {namespace}/{name} is Ready: {url}")


@app.command()
@_handles_errors
def predict(
    paths: Annotated[
        list[str] | None,
        typer.Argument(
            help="A folder or s3:// prefix of cases (any public layout), one case folder, one "
            "4D NIfTI, or four 3D files."
        ),
    ] = None,
    dataset: Annotated[
        str | None, typer.Option("--dataset", "-d", help="NAME@VERSION: predict a split of it.")
    ] = None,
    split: Annotated[str, typer.Option(help="validation, train or all (with --dataset).")] = (
        "validation"
    ),
    model: Annotated[
        str | None,
        typer.Option(
            help="Local model: run id, NAME@VERSION or model URI. With --url: the model's name "
            "on the server (default medseg)."
        ),
    ] = None,
    store: StoreOpt = "s3://medseg",
    url: Annotated[
        str | None,
        typer.Option(
            help="Ask a model server instead: http://HOST:PORT, or HOST:PORT with --grpc."
        ),
    ] = None,
    grpc: Annotated[bool, typer.Option("--grpc", help="Use gRPC (with --url).")] = False,
    out: Annotated[
        str | None,
        typer.Option(
            help="Local model: output folder or s3:// prefix (default for --dataset: "
            "runs/RUN/predictions/…; else ./predictions). With --url: the mask file "
            "(default mask.nii.gz)."
        ),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(help="Label convention of the maps (default: the source's, else brats2021)."),
    ] = None,
    channels: Annotated[
        str | None, typer.Option(help="Channel order of the files, e.g. flair,t1,t1gd,t2.")
    ] = None,
    tensor: Annotated[
        str | None, typer.Option(help="With --url: FP16 or FP32, send a raw tensor decoded here.")
    ] = None,
    prefetch: Annotated[int, typer.Option(min=1, help="Cases read ahead of the compute.")] = 2,
) -> None:
    """Segment cases: a dataset split, a folder/prefix or one case, with one loaded model.

    Writes one label map per case (original grid and affine) and a volumes table (CSV, JSON);
    a case that cannot be read is listed with its reason, the others are written, and the exit
    status is 2. With --url, one case is sent to a model server instead.
    """
    order = channels.split(",") if channels else None
    if url is not None:
        _predict_remote(paths or [], url, grpc, model or "medseg", out, labels, order, tensor)
        return
    from medseg.predict import predict as run_predict
    from medseg.storage import Storage

    if model is None:
        raise MedsegError("give --model (a run id, NAME@VERSION or model URI) or --url")
    if dataset is None and not paths:
        raise MedsegError("nothing to predict: give --dataset NAME@VERSION, a folder or files")
    storage = Storage()
    uri = _model_uri(storage, store, model)
    result = run_predict(
        uri,
        out if out is not None or dataset else "predictions",
        dataset=dataset,
        split=split,
        store=store,
        paths=paths or [],
        channels=order,
        labels=labels,
        storage=storage,
        prefetch=prefetch,
        on_case=lambda case, failure: console.print(
            f"{case}: " + ("[green]ok[/]" if failure is None else f"[red]failed[/]: {failure}"),
            highlight=False,
        ),
    )
    table = Table(title=f"tumour volumes (mL) · {len(result.cases)} cases")
    for col in ("case", "TC", "WT", "ET"):
        table.add_column(col, justify="right")
    for row in result.cases:
        vols = row["volumes_ml"]
        table.add_row(row["case_id"], *(f"{vols[r]:.2f}" for r in ("TC", "WT", "ET")))
    console.print(table)
    console.print(
        f"{len(result.cases)} label maps, volumes.csv and volumes.json in {result.out} "
        f"({result.seconds:.1f} s)"
    )
    if result.failed:
        failed = Table(title=f"{len(result.failed)} cases not predicted")
        for col in ("case", "file", "reason"):
            failed.add_column(col)
        for f in result.failed:
            failed.add_row(f.case_id, f.file or "", f.reason)
        err_console.print(failed)
        raise typer.Exit(2)


def _predict_remote(
    paths: list[str],
    url: str,
    grpc: bool,
    model: str,
    out: str | None,
    labels: str | None,
    channels: list[str] | None,
    tensor: str | None,
) -> None:
    """``medseg predict --url``: one case to a model server; write the mask, print volumes."""
    from medseg.client import predict as send

    result = send(
        url,
        [Path(p) for p in paths],
        grpc=grpc,
        model=model,
        label_convention=labels or "brats2021",
        channels=channels,
        tensor=tensor,
    )
    mask = Path(out or "mask.nii.gz")
    mask.write_bytes(result.mask)
    table = Table(title=f"tumour volumes ({'gRPC' if grpc else 'REST'})")
    table.add_column("region")
    table.add_column("mL", justify="right")
    for region, ml in result.volumes_ml.items():
        table.add_row(region, f"{ml:.2f}")
    console.print(table)
    console.print(
        f"mask ({result.label_convention} labels): {mask}; latency {result.latency_s:.3f} s "
        f"(server compute {result.compute_ms} ms)"
    )


@app.command("register")
@_handles_errors
def register_cmd(
    run_id: Annotated[str, typer.Option(help="Finished training run.")],
    name: Annotated[str, typer.Option(help="Model name in the registry.")],
    store: StoreOpt = "s3://medseg",
) -> None:
    """Register a run's model as the next version of NAME, with its model card."""
    from medseg.register import register
    from medseg.storage import Storage

    card = register(Storage(), store, run_id, name)
    console.print(f"registered {card['name']}@{card['version']} from run {run_id}")


@models_app.command("list")
@_handles_errors
def models_list(store: StoreOpt = "s3://medseg") -> None:
    """List registered model versions."""
    from medseg.register import list_models
    from medseg.storage import Storage

    table = Table()
    for col in ("model", "version", "run", "dataset", "mean Dice", "created"):
        table.add_column(col)
    for c in list_models(Storage(), store):
        dice = c["metrics"].get("dice_mean")
        table.add_row(
            c["name"],
            c["version"],
            c["run_id"],
            f"{c['dataset']['name']}@{c['dataset']['version']}",
            "" if dice is None else f"{dice:.3f}",
            c["created_at"][:19],
        )
    console.print(table)


@datasets_app.command("list")
@_handles_errors
def datasets_list(store: StoreOpt = "s3://medseg") -> None:
    """List stored dataset versions."""
    from medseg.manifest import Manifest
    from medseg.storage import Storage, join

    storage = Storage()
    table = Table()
    for col in ("dataset", "version", "layout", "cases", "quarantined", "created"):
        table.add_column(col)
    for obj in storage.list(join(store, "datasets")):
        if obj.uri.endswith("/manifest.json"):
            m = Manifest.model_validate(storage.get_json(obj.uri))
            table.add_row(
                m.name,
                m.version,
                m.layout,
                str(len(m.cases)),
                str(len(m.quarantined)),
                m.created_at[:19],
            )
    console.print(table)


def _pipeline_arguments(
    source: str,
    store: str,
    config: Path | None,
    epochs: int,
    workers: int,
    launcher: str,
    threshold: float,
    model_name: str,
    deploy_target: str,
    extra: list[str] | None,
) -> dict[str, Any]:
    args: dict[str, Any] = {
        "source": source,
        "store": store,
        "epochs": epochs,
        "workers": workers,
        "launcher": launcher,
        "dice_threshold": threshold,
        "model_name": model_name,
        "deploy_target": deploy_target,
    }
    if config is not None:
        args["config_yaml"] = _config(config).to_yaml()
    for item in extra or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise MedsegError(f"--param takes KEY=VALUE, got {item!r}")
        args[key] = int(value) if value.lstrip("-").isdigit() else value
    return args


PipelineSource = Annotated[str, typer.Option(help="Raw dataset folder (or s3:// prefix).")]
EpochsOpt = Annotated[int, typer.Option(help="Overrides train.epochs when above 0.")]
ThresholdOpt = Annotated[float, typer.Option(help="Quality gate on the validation mean Dice.")]
ModelNameOpt = Annotated[str, typer.Option(help="Registry name.")]
PipelineParams = Annotated[
    list[str] | None, typer.Option("--param", help="Any other pipeline parameter, KEY=VALUE.")
]


@pipeline_app.command("compile")
@_handles_errors
def pipeline_compile(
    out: Annotated[Path, typer.Option("--out", "-o", help="IR YAML to write.")] = Path(
        "medseg-pipeline.yaml"
    ),
) -> None:
    """Compile the pipeline to KFP IR YAML."""
    from medseg.pipeline_cli import compile_pipeline

    console.print(f"compiled pipeline: {compile_pipeline(out)}")


@pipeline_app.command("upload")
@_handles_errors
def pipeline_upload(
    host: Annotated[str, typer.Option(help="KFP API endpoint, e.g. http://ml-pipeline:8888.")],
    name: Annotated[str, typer.Option(help="Pipeline name on the backend.")] = "medseg-brats",
    version: Annotated[str, typer.Option(help="Version name when the pipeline exists.")] = (
        "0.1.0"
    ),
) -> None:
    """Compile and upload the pipeline to a Kubeflow Pipelines backend (the chart's Job)."""
    from medseg.pipeline_cli import upload

    uploaded = upload(host, name, version, Path("/tmp/medseg-pipeline.yaml"))
    console.print(f"uploaded pipeline {name} ({uploaded}) to {host}")


@pipeline_app.command("run")
@_handles_errors
def pipeline_run(
    source: PipelineSource,
    local: Annotated[bool, typer.Option("--local", help="Run through kfp.local.")] = False,
    store: StoreOpt = "s3://medseg",
    config: ConfigOpt = None,
    epochs: EpochsOpt = 0,
    workers: Annotated[int, typer.Option(help="Training processes.")] = 2,
    launcher: Annotated[str, typer.Option(help="local or pytorchjob.")] = "local",
    threshold: ThresholdOpt = 0.8,
    model_name: ModelNameOpt = "brats-segresnet",
    root: Annotated[Path, typer.Option(help="kfp.local pipeline root.")] = Path(
        ".medseg/kfp-local"
    ),
    param: PipelineParams = None,
) -> None:
    """Run the whole pipeline on this machine through kfp.local."""
    if not local:
        raise MedsegError("only --local runs here; use `medseg pipeline submit` for a cluster")
    from medseg.pipeline_cli import run_local

    args = _pipeline_arguments(
        source, store, config, epochs, workers, launcher, threshold, model_name, "local", param
    )
    run_local(args, root)
    console.print(f"pipeline finished; local outputs under {root}")


@pipeline_app.command("submit")
@_handles_errors
def pipeline_submit(
    source: PipelineSource,
    host: Annotated[str, typer.Option(help="KFP API endpoint, e.g. http://ml-pipeline:8888.")],
    store: StoreOpt = "s3://medseg",
    config: ConfigOpt = None,
    epochs: EpochsOpt = 0,
    workers: Annotated[int, typer.Option(help="PyTorchJob pods.")] = 2,
    launcher: Annotated[str, typer.Option(help="local or pytorchjob.")] = "pytorchjob",
    threshold: ThresholdOpt = 0.8,
    model_name: ModelNameOpt = "brats-segresnet",
    experiment: Annotated[str, typer.Option(help="KFP experiment.")] = "medseg",
    namespace: Annotated[
        str, typer.Option(help="Namespace of the Helm release: the run, its jobs and services.")
    ] = DEFAULT_RELEASE.namespace,
    release: Annotated[
        str, typer.Option(help="The chart's release (names its ServiceAccount, Secret, ConfigMap).")
    ] = DEFAULT_RELEASE.name,
    service_account: Annotated[
        str | None,
        typer.Option(
            help="The run's ServiceAccount if the chart's pipeline.serviceAccount is set."
        ),
    ] = None,
    param: PipelineParams = None,
) -> None:
    """Compile and start the pipeline on a Kubeflow Pipelines backend."""
    from medseg.kube import Release
    from medseg.pipeline_cli import submit

    args = _pipeline_arguments(
        source, store, config, epochs, workers, launcher, threshold, model_name, "kserve", param
    )
    package = Path(".medseg/medseg-pipeline.yaml")
    names = Release(release, namespace)
    run_id = submit(host, args, experiment, package, names, service_account)
    console.print(
        f"submitted run {run_id} to {host} (namespace {namespace}, "
        f"service account {service_account or names.pipeline_service_account})"
    )


@app.command()
@_handles_errors
def minio(
    data_dir: Annotated[Path, typer.Option(help="Where objects are kept.")] = Path(
        ".medseg/minio-data"
    ),
    port: Annotated[int, typer.Option(help="API port on 127.0.0.1 (0: a free one).")] = 9000,
    bucket: Annotated[str, typer.Option(help="Bucket to create.")] = "medseg",
) -> None:
    """Run a local MinIO server on 127.0.0.1 until interrupted.

    Generated credentials and the endpoint are written to the local env file (.medseg/minio.env,
    or MEDSEG_ENV_FILE) that every other medseg command reads.
    """
    # The handler comes first: a SIGTERM right after start-up must still stop MinIO cleanly.
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    server = _start_local_minio(data_dir, port or None, bucket)
    console.print(f"MinIO on {server.endpoint}, bucket s3://{bucket}; Ctrl-C stops it")
    with contextlib.suppress(KeyboardInterrupt):
        server.run_until(lambda: bool(stop))  # exits non-zero if MinIO dies


def _start_local_minio(data_dir: Path, port: int | None, bucket: str) -> Any:
    """Start MinIO, write the env file, create the bucket; returns the running server."""
    from medseg.minio_server import start_local
    from medseg.settings import env_file_path

    server = start_local(data_dir, port, bucket, env_file_path())
    os.environ.update(server.env())
    return server


@app.command()
@_handles_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="Scratch folder for the demo.")] = Path(
        ".medseg/demo"
    ),
    cases: Annotated[int, typer.Option(min=4, help="Synthetic cases to generate.")] = 20,
    epochs: Annotated[int, typer.Option(help="Override the demo's training epochs.")] = 0,
    source: Annotated[
        Path | None,
        typer.Option(
            help="Your own BraTS 2021/2023+ or MSD Task01 folder instead of synthetic data."
        ),
    ] = None,
    config: ConfigOpt = None,
    threshold: ThresholdOpt = 0.8,
) -> None:
    """The main job: the whole platform end to end on this machine (see medseg.demo)."""
    import shutil

    from medseg.demo import run_demo

    started = time.perf_counter()
    cfg = _config(config) if config else None
    if source is not None:
        from medseg.layouts import detect_layout

        detect_layout(source)  # a wrong folder fails now, not after MinIO started
    shutil.rmtree(workdir / "minio-data", ignore_errors=True)  # a fresh store every run
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MEDSEG_ENV_FILE", str(workdir / "minio.env"))
    os.environ.setdefault("MEDSEG_CACHE_DIR", str(workdir / "cache"))
    console.rule("medseg demo")
    server = _start_local_minio(workdir / "minio-data", None, "medseg")
    try:
        console.print(f"MinIO on {server.endpoint}, bucket s3://medseg", highlight=False)
        result = run_demo(workdir, "s3://medseg", cases, source, epochs, console, cfg, threshold)
    finally:
        server.stop()
    table = Table(title=f"results: model {result.model_uri}")
    for col in ("region", "validation Dice", f"Dice on {result.case_id}", "volume (mL)"):
        table.add_column(col, justify="right")
    for region in result.dice_case:
        table.add_row(
            region,
            f"{result.dice_validation[region]:.4f}",
            f"{result.dice_case[region]:.4f}",
            f"{result.volumes_ml[region]:.2f}",
        )
    mean = sum(result.dice_validation.values()) / len(result.dice_validation)
    table.add_row("mean", f"{mean:.4f}", "", "")
    console.print(table)
    console.print(
        f"latency of {result.case_id} end to end: REST {result.latency_rest_s:.2f} s, "
        f"gRPC {result.latency_grpc_s:.2f} s (server compute {result.compute_ms} ms)",
        highlight=False,
    )
    console.print(
        f"report {result.report} · overlay {result.overlay} · mask {result.mask}\n"
        f"full log: {result.log}\n"
        f"demo finished in {time.perf_counter() - started:.0f} s",
        highlight=False,
    )


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
