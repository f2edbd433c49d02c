"""This machine: ``minio`` (a local object store), ``mlflow`` (a tracking server), ``demo``."""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from medseg.apps.demo import DEMOS, DemoOptions, run_local_demo
from medseg.apps.minio_server import start_and_export
from medseg.apps.mlflow_server import DEFAULT_DB, DEFAULT_PORT, MlflowServer
from medseg.cli.common import ConfigOpt, app, console, fail, handles_errors, load_config
from medseg.core.settings import DEFAULT_BUCKET, DEFAULT_PORTS, StorageSettings
from medseg.core.storage import Storage

DataDirOpt = Annotated[Path, typer.Option(help="Where objects are kept.")]
PortOpt = Annotated[int, typer.Option(help="API port on 127.0.0.1 (0: a free one).")]
WorkdirOpt = Annotated[Path, typer.Option(help="Scratch folder for the demo.")]
DemoEpochs = Annotated[
    int, typer.Option(min=0, help="Override the demo's training epochs (0: the demo's own).")
]
DemoSource = Annotated[
    Path | None,
    typer.Option(help="Your own BraTS 2021/2023+ or MSD Task01 folder instead of synthetic data."),
]


@app.command()
@handles_errors
def minio(
    data_dir: DataDirOpt = Path(".medseg/minio-data"),
    port: PortOpt = DEFAULT_PORTS.minio,
    bucket: Annotated[str, typer.Option(help="Bucket to create.")] = DEFAULT_BUCKET,
) -> None:
    """Run a local MinIO server on 127.0.0.1 until interrupted.

    Generated credentials and the endpoint are written to the local env file (.medseg/minio.env,
    or MEDSEG_ENV_FILE) that every other medseg command reads.
    """
    # The handler comes first: a SIGTERM right after start-up must still stop MinIO cleanly.
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    server = start_and_export(data_dir, port or None, bucket)
    console.print(f"MinIO on {server.endpoint}, bucket s3://{bucket}; Ctrl-C stops it")
    with contextlib.suppress(KeyboardInterrupt):
        server.run_until(lambda: bool(stop))  # exits non-zero if MinIO dies


@app.command()
@handles_errors
def mlflow(
    db: Annotated[Path, typer.Option(help="SQLite database of runs and models.")] = DEFAULT_DB,
    port: PortOpt = DEFAULT_PORT,
    bucket: Annotated[
        str, typer.Option(help="The platform's bucket; artifacts go to s3://BUCKET/mlflow.")
    ] = DEFAULT_BUCKET,
) -> None:
    """Run an MLflow tracking server on 127.0.0.1 until interrupted.

    Artifacts go to the object store of the environment (or the local env file that
    `medseg minio` writes), through the server: clients need only MLFLOW_TRACKING_URI.
    """
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    settings = StorageSettings.from_env()
    Storage(settings).ensure_bucket(f"s3://{bucket}")
    server = MlflowServer(bucket, settings, db, port or None).start()
    console.print(
        f"MLflow on {server.uri} (artifacts {server.artifacts}); "
        f"export MLFLOW_TRACKING_URI={server.uri}; Ctrl-C stops it",
        highlight=False,
    )
    with contextlib.suppress(KeyboardInterrupt):
        server.run_until(lambda: bool(stop))


@app.command()
@handles_errors
def demo(
    workdir: WorkdirOpt = Path(".medseg/demo"),
    task: Annotated[
        str, typer.Option(help="brats (segmentation) or skin-lesion (classification).")
    ] = "brats",
    cases: Annotated[
        int | None, typer.Option(min=4, help="Synthetic cases (images); default: the task's.")
    ] = None,
    epochs: DemoEpochs = 0,
    source: DemoSource = None,
    config: ConfigOpt = None,
    threshold: Annotated[
        float | None,
        typer.Option(help="Quality gate on the task's metric; default: the demo's (0.8, 0.7)."),
    ] = None,
) -> None:
    """The main job: the whole platform end to end on this machine (see medseg.apps.demo)."""
    from pipelines.medseg_pipeline import medseg_pipeline

    if task not in DEMOS:
        fail(f"unknown task {task!r}: use {' or '.join(DEMOS)}")
    started = time.perf_counter()
    cfg = load_config(config) if config else None
    options = DemoOptions(workdir, task, cases, source, epochs, cfg, threshold)
    result = run_local_demo(medseg_pipeline, options, console)
    (_print_classifier_demo if task == "skin-lesion" else _print_segmenter_demo)(result)
    console.print(
        f"latency of {result.case_id} end to end: REST {result.latency_rest_s:.2f} s, "
        f"gRPC {result.latency_grpc_s:.2f} s (server compute {result.compute_ms} ms)",
        highlight=False,
    )
    files = [f"report {result.report}"]
    files += [f"overlay {result.overlay}"] if result.overlay else []
    files += [f"mask {result.mask}"] if result.mask else []
    console.print(f"{' · '.join(files)}\nfull log: {result.log}", highlight=False)
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s", highlight=False)


def _print_segmenter_demo(result: Any) -> None:
    """A segmentation demo's scores (a :class:`~medseg.apps.demo.DemoResult`): Dice and volumes."""
    validation = result.evaluation["dice"]
    table = Table(title=f"results: model {result.model_uri}")
    for col in ("region", "validation Dice", f"Dice on {result.case_id}", "volume (mL)"):
        table.add_column(col, justify="right")
    for region in result.dice_case:
        table.add_row(
            region,
            f"{validation[region]:.4f}",
            f"{result.dice_case[region]:.4f}",
            f"{result.volumes_ml[region]:.2f}",
        )
    table.add_row("mean", f"{sum(validation.values()) / len(validation):.4f}", "", "")
    console.print(table)


def _print_classifier_demo(result: Any) -> None:
    """A classification demo's scores: macro AUC, balanced accuracy, AUC per class; the answer."""
    ev = result.evaluation
    table = Table(title=f"results: model {result.model_uri} (held-out lesions)")
    for col in ("class", "validation ROC AUC", "sensitivity", "specificity"):
        table.add_column(col, justify="right")
    for c, auc, sens, spec in zip(
        ev["classes"], ev["auc"], ev["sensitivity"], ev["specificity"], strict=True
    ):
        table.add_row(c, f"{auc:.4f}", f"{sens:.4f}", f"{spec:.4f}")
    table.add_row("macro", f"{ev['macro_auc']:.4f}", "", "")
    console.print(table)
    console.print(
        f"balanced accuracy {ev['balanced_accuracy']:.4f} · accuracy {ev['accuracy']:.4f} · "
        f"gate macro AUC ≥ {ev['gate']['threshold']}: "
        f"{'passed' if ev['gate']['passed'] else 'not passed'}",
        highlight=False,
    )
    console.print(
        f"served {result.case_id} (truly {result.truth}): {result.answer}", highlight=False
    )
