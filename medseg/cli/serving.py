"""Serving commands: ``serve``, ``deploy``, ``predict`` (a local model, or a model server)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from medseg.cli.common import (
    CollectOpt,
    ShardOpt,
    ShardsOpt,
    StoreOpt,
    app,
    console,
    err_console,
    failures_table,
    handles_errors,
    print_shard,
    shard_mode,
)
from medseg.core.errors import MedsegError
from medseg.core.settings import (
    DEFAULT_MODEL_NAME,
    DEFAULT_PORTS,
    DEFAULT_SERVED_NAME,
    DEFAULT_STORE,
    ServerArgs,
)
from medseg.core.storage import Storage
from medseg.platform.deploy import deploy_model
from medseg.platform.kube import DEFAULT_RELEASE, Release
from medseg.registry.register import model_uri

ServeModel = Annotated[
    str, typer.Option(help="Run id, NAME@VERSION from the registry, or a model folder/URI.")
]
HostOpt = Annotated[
    str | None,
    typer.Option(help="Interface for REST and gRPC (default: MEDSEG_SERVER_HOST, else 127.0.0.1)."),
]
MaxRequestOpt = Annotated[
    int | None,
    typer.Option(help="Largest request, MiB (default: MEDSEG_SERVER_MAX_REQUEST_MB, else 256)."),
]
ConcurrencyOpt = Annotated[int | None, typer.Option(help="Cases segmented at once (default: 1).")]


@app.command()
@handles_errors
def serve(
    model: ServeModel,
    store: StoreOpt = DEFAULT_STORE,
    name: Annotated[str, typer.Option(help="Model name in the URL.")] = DEFAULT_SERVED_NAME,
    http_port: Annotated[int, typer.Option(help="REST port.")] = DEFAULT_PORTS.http,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = DEFAULT_PORTS.grpc,
    host: HostOpt = None,
    max_request_mb: MaxRequestOpt = None,
    max_concurrency: ConcurrencyOpt = None,
) -> None:
    """Serve a model with kserve's ModelServer (Open Inference Protocol v2, REST and gRPC).

    It listens on loopback unless --host (or MEDSEG_SERVER_HOST) says otherwise; every other
    limit is a MEDSEG_SERVER_* variable (medseg.core.settings.ServerLimits).
    """
    from model_server.server import serve as run_server

    uri = model_uri(Storage(), store, model)
    args = ServerArgs(uri, name, http_port, grpc_port, host, max_request_mb, max_concurrency)
    run_server(args.argv())


RegisteredModel = Annotated[
    str, typer.Argument(help="Registered model: s3://BUCKET/models/NAME/vN.")
]
ImageOpt = Annotated[
    str | None, typer.Option(help="The model server image (default: the chart's).")
]
IsvcName = Annotated[str, typer.Option(help="InferenceService (and model) name.")]
NamespaceOpt = Annotated[str, typer.Option(help="The chart's release namespace.")]
ReleaseOpt = Annotated[str, typer.Option(help="The chart's release (names its objects).")]
ModeOpt = Annotated[str, typer.Option(help="Knative or Standard.")]
ScaleMetricOpt = Annotated[
    str | None, typer.Option(help="concurrency/rps (Knative), cpu/memory (Standard).")
]
RecreateOpt = Annotated[
    bool, typer.Option(help="Delete and recreate the service to change its mode.")
]


@app.command("deploy")
@handles_errors
def deploy_cmd(
    model: RegisteredModel,
    image: ImageOpt = None,
    name: IsvcName = DEFAULT_MODEL_NAME,
    namespace: NamespaceOpt = DEFAULT_RELEASE.namespace,
    release: ReleaseOpt = DEFAULT_RELEASE.name,
    mode: ModeOpt = "Knative",
    min_replicas: Annotated[int, typer.Option(help="Fewest replicas.")] = 1,
    max_replicas: Annotated[int, typer.Option(help="Most replicas.")] = 3,
    scale_metric: ScaleMetricOpt = None,
    scale_target: Annotated[int | None, typer.Option(help="Target per replica.")] = None,
    cpu: Annotated[str | None, typer.Option(help="CPU request per replica (chart: 2).")] = None,
    memory: Annotated[str | None, typer.Option(help="Memory request (chart: 8Gi).")] = None,
    cpu_limit: Annotated[str | None, typer.Option(help="CPU limit (chart: 4).")] = None,
    memory_limit: Annotated[str | None, typer.Option(help="Memory limit (the request).")] = None,
    gpus: Annotated[int, typer.Option(help="GPUs per replica.")] = 0,
    timeout: Annotated[int, typer.Option(help="Seconds to wait for Ready.")] = 900,
    recreate: RecreateOpt = False,
) -> None:
    """Create or patch the KServe InferenceService of a registered model; wait until Ready."""
    url = deploy_model(
        model, name, Release(release, namespace), timeout=timeout, deployment_mode=mode,
        scale_metric=scale_metric, scale_target=scale_target, recreate=recreate, image=image,
        min_replicas=min_replicas, max_replicas=max_replicas, cpu=cpu, memory=memory,
        cpu_limit=cpu_limit, memory_limit=memory_limit, gpus=gpus,
    )  # fmt: skip
    console.print(f"InferenceService {namespace}/{name} is Ready: {url}")


Paths = Annotated[
    list[str] | None,
    typer.Argument(
        help="A folder or s3:// prefix of cases (any public layout), one case folder, one "
        "4D NIfTI, four 3D files, or DICOM: one study (folder, zip, prefix) or a folder of "
        "studies (each gets a SEG, a volumes report and a JSON sidecar too)."
    ),
]
PredictDataset = Annotated[
    str | None, typer.Option("--dataset", "-d", help="NAME@VERSION: predict a split of it.")
]
SplitOpt = Annotated[str, typer.Option(help="validation, train or all (with --dataset).")]
PredictModel = Annotated[
    str | None,
    typer.Option(
        help="Local model: run id, NAME@VERSION or model URI. With --url: the model's name "
        "on the server (default medseg)."
    ),
]
UrlOpt = Annotated[
    str | None,
    typer.Option(help="Ask a model server instead: http://HOST:PORT, or HOST:PORT with --grpc."),
]
GrpcOpt = Annotated[bool, typer.Option("--grpc", help="Use gRPC (with --url).")]
PredictOut = Annotated[
    str | None,
    typer.Option(
        help="Local model: output folder or s3:// prefix (default for --dataset: "
        "runs/RUN/predictions/…; else ./predictions). With --url: the mask file "
        "(default mask.nii.gz)."
    ),
]
LabelsOpt = Annotated[
    str | None,
    typer.Option(help="Label convention of the maps (default: the source's, else brats2021)."),
]
ChannelsOpt = Annotated[
    str | None, typer.Option(help="Channel order of the files, e.g. flair,t1,t1gd,t2.")
]
TensorOpt = Annotated[
    str | None, typer.Option(help="With --url: FP16 or FP32, send a raw tensor decoded here.")
]
PrefetchOpt = Annotated[int, typer.Option(min=1, help="Cases read ahead of the compute.")]


@app.command()
@handles_errors
def predict(
    paths: Paths = None,
    dataset: PredictDataset = None,
    split: SplitOpt = "validation",
    model: PredictModel = None,
    store: StoreOpt = DEFAULT_STORE,
    url: UrlOpt = None,
    grpc: GrpcOpt = False,
    out: PredictOut = None,
    labels: LabelsOpt = None,
    channels: ChannelsOpt = None,
    tensor: TensorOpt = None,
    prefetch: PrefetchOpt = 2,
    shards: ShardsOpt = 1,
    shard: ShardOpt = None,
    collect: CollectOpt = False,
) -> None:
    """Segment cases: a dataset split, a folder/prefix or one case, with one loaded model.

    Writes one label map per case (original grid and affine) and a volumes table (CSV, JSON);
    a case that cannot be read is listed with its reason, the others are written, and the exit
    status is 2. With --url, one case is sent to a model server instead. A dataset split can
    run as --shards K: --shard I on each machine, then --collect writes the tables.
    """
    mode = shard_mode(shards, shard, collect)
    if mode != "whole" and (model is None or dataset is None or paths or url is not None):
        raise MedsegError("--shards predicts a dataset split: give --model and --dataset only")
    if mode == "shard":
        assert model is not None and dataset is not None and shard is not None
        _predict_shard(model, store, dataset, split, out, labels, prefetch, shards, shard)
        return
    order = channels.split(",") if channels else None
    if url is not None:
        _predict_remote(
            paths or [], url, grpc, model or DEFAULT_SERVED_NAME, out, labels, order, tensor
        )
        return
    if model is None:
        raise MedsegError("give --model (a run id, NAME@VERSION or model URI) or --url")
    if dataset is None and not paths:
        raise MedsegError("nothing to predict: give --dataset NAME@VERSION, a folder or files")
    if mode == "collect":
        assert model is not None and dataset is not None
        result = _collect_shards(model, store, dataset, split, out, labels, shards)
    else:
        out = out if out is not None or dataset else "predictions"
        result = _predict_local(
            model, store, out, dataset, split, paths or [], order, labels, prefetch
        )
    _print_predictions(result)
    if result.failed:
        raise typer.Exit(2)


def _predict_shard(
    model: str,
    store: str,
    dataset: str,
    split: str,
    out: str | None,
    labels: str | None,
    prefetch: int,
    shards: int,
    shard: int,
) -> None:
    """``medseg predict --shards K --shard I``: one shard's cases, and the collect to run next."""
    from medseg.platform.shards import predict_shard

    storage = Storage()
    uri = model_uri(storage, store, model)
    done = predict_shard(uri, dataset, split, store, shard, shards, out, storage, labels, prefetch)
    print_shard(done, f"medseg predict -d {dataset} --model {model} --split {split}")
    for failure in done.failed:
        _print_case(failure.case_id, failure.reason)
    if done.failed:
        raise typer.Exit(2)


def _collect_shards(
    model: str,
    store: str,
    dataset: str,
    split: str,
    out: str | None,
    labels: str | None,
    shards: int,
) -> Any:
    """``medseg predict --shards K --collect``: the tables from the shards' records."""
    from medseg.platform.shards import collect_predictions

    storage = Storage()
    uri = model_uri(storage, store, model)
    return collect_predictions(uri, dataset, split, store, shards, out, storage, labels)


def _predict_local(
    model: str,
    store: str,
    out: str | None,
    dataset: str | None,
    split: str,
    paths: list[str],
    channels: list[str] | None,
    labels: str | None,
    prefetch: int,
) -> Any:
    """``medseg predict`` with a model loaded here (a ``PredictResult``)."""
    from medseg.inference.predict import predict as run_predict

    storage = Storage()
    return run_predict(
        model_uri(storage, store, model),
        out,
        dataset=dataset,
        split=split,
        store=store,
        paths=paths,
        channels=channels,
        labels=labels,
        storage=storage,
        prefetch=prefetch,
        on_case=_print_case,
    )


def _print_case(case: str, failure: str | None) -> None:
    ok = "[green]ok[/]" if failure is None else f"[red]failed[/]: {failure}"
    console.print(f"{case}: {ok}", highlight=False)


def _print_predictions(result: Any) -> None:
    """Volumes per case, where they are written, and the cases not predicted (on stderr)."""
    if result.cases and "probabilities" in result.cases[0]:
        _print_classes(result)
        return
    table = Table(title=f"tumour volumes (mL) · {len(result.cases)} cases")
    regions = list(result.cases[0]["volumes_ml"]) if result.cases else []
    for col in ("case", *regions):
        table.add_column(col, justify="right")
    for row in result.cases:
        vols = row["volumes_ml"]
        table.add_row(row["case_id"], *(f"{vols[r]:.2f}" for r in regions))
    _print_written(table, result, "label maps, volumes.csv and volumes.json", "cases")


def _print_classes(result: Any) -> None:
    """A classifier's answers: each image's class and its probability."""
    table = Table(title=f"predicted classes · {len(result.cases)} images")
    for col in ("image", "class", "probability"):
        table.add_column(col, justify="right")
    for row in result.cases:
        table.add_row(row["case_id"], row["label"], f"{row['probability']:.1%}")
    _print_written(table, result, "images, predictions.csv and predictions.json", "images")


def _print_written(table: Table, result: Any, written: str, items: str) -> None:
    """A prediction run's table, what it wrote where, and what it did not predict (stderr)."""
    console.print(table)
    console.print(f"{len(result.cases)} {written} in {result.out} ({result.seconds:.1f} s)")
    if result.failed:
        title = f"{len(result.failed)} {items} not predicted"
        err_console.print(failures_table(title, result.failed))


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
    from medseg.serving.client import predict as send

    result = send(
        url,
        [Path(p) for p in paths],
        grpc=grpc,
        model=model,
        label_convention=labels,
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
