"""The main job (``medseg demo`` = ``make run``): the whole platform on one machine.

1. a real MinIO on 127.0.0.1, and a real MLflow tracking server beside it (its artifacts in
   MinIO): training, evaluation and registration are tracked there;
2. synthetic BraTS 2021 cases (or the user's own folder in any layout ingest accepts);
3. the Kubeflow pipeline end to end through ``kfp.local``: ingest → preprocess → train (two
   torchrun processes, gloo) → evaluate (HTML report) → quality gate → register → deploy
   (recorded as the ``medseg serve`` command);
4. the registered model served by kserve's ModelServer (REST and gRPC on loopback);
5. a held-out validation case sent over REST and over gRPC: Dice per region against its ground
   truth (in the dataset's own label convention), tumour volumes in mL, latencies; the HTML
   report and an overlay PNG saved locally.

The terminal gets one line per step with its time and a progress bar for training; everything
the steps print (kfp.local's executor logs, training, the model server) goes to ``demo.log``.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TimeElapsedColumn
from rich.text import Text

from medseg.config import MedsegConfig
from medseg.errors import MedsegError
from medseg.manifest import Manifest
from medseg.pipeline_runner import Pipeline
from medseg.settings import DEFAULT_BUCKET, DEFAULT_STORE, ServerArgs
from medseg.tasks.brats import CHANNELS

__all__ = [
    "DEMO_CONFIG",
    "DemoConsole",
    "DemoResult",
    "HeldOutCase",
    "held_out_case",
    "run_demo",
    "run_local_demo",
    "score_mask",
    "send_case",
    "tracked_summary",
]

#: Settings for the synthetic demo: small volumes and a light SegResNet, so that two CPU cores
#: train a model that really learned the task within the demo's time budget. Batches of 2, not 1:
#: for a batch of one small volume PyTorch's CPU conv3d leaves oneDNN for its slow reference
#: path (measured 0.93 s per step at batch 1 against 0.35 s at batch 2 for this model and ROI).
DEMO_CONFIG: dict[str, Any] = {
    "model": {"init_filters": 8},
    "train": {
        # 60, not 40: at 40 epochs one seed of three stopped at 0.73 mean Dice on the served label
        # maps; at 60 all three give >= 0.90 (benchmarks/demo_seeds.py, issue 13).
        "epochs": 60,
        "lr": 3e-3,
        "batch_size": 2,
        "num_workers": 0,
        "roi_size": [48, 48, 40],
        "val_every": 5,
    },
    "infer": {"roi_size": [48, 48, 40], "sw_batch_size": 4},
}
DEMO_SHAPE = (64, 64, 48)
#: The model's name in the registry and on the server.
DEMO_MODEL = "demo-segresnet"


@dataclass(frozen=True)
class HeldOutCase:
    """A validation case of a dataset, as the files of its source folder.

    Attributes:
        case_id: The case.
        files: What a client sends: four 3D files, or one 4D file (MSD).
        channels: The channel order of ``files`` (of the 4D file's last axis for MSD).
        label: Its ground-truth label map.
        convention: The dataset's label convention (from the manifest).
    """

    case_id: str
    files: list[Path]
    channels: list[str]
    label: Path
    convention: str


def held_out_case(manifest: Manifest, source: Path) -> HeldOutCase:
    """The first validation case of ``manifest``, found in ``source`` as ingest found it.

    Args:
        manifest: The dataset version (its layout, convention and split).
        source: The folder the dataset was ingested from.

    Raises:
        MedsegError: If the dataset has no validation case, or the case's files are gone.
    """
    from medseg.layouts import discover_cases

    ids = manifest.split_ids("validation")
    if not ids:
        raise MedsegError(
            f"dataset {manifest.name}@{manifest.version} has no validation case: "
            "give more cases or a larger split.val_fraction"
        )
    case_id = ids[0]
    raw = {c.case_id: c for c in discover_cases(source, manifest.layout)}.get(case_id)
    if raw is None:
        raise MedsegError(
            f"validation case {case_id} not found in {source} ({manifest.layout} layout)"
        )
    missing = [f"{role} ({name})" for role, name in raw.missing.items()]
    if missing or raw.label is None:
        raise MedsegError(f"validation case {case_id} in {source}: missing {', '.join(missing)}")
    if raw.image4d is not None:
        order = sorted(raw.channel_index, key=raw.channel_index.__getitem__)
        return HeldOutCase(case_id, [raw.image4d], order, raw.label, manifest.convention)
    files = [raw.channels[c] for c in CHANNELS]
    return HeldOutCase(case_id, files, list(CHANNELS), raw.label, manifest.convention)


def send_case(url: str, case: HeldOutCase, model: str, grpc: bool = False) -> Any:
    """Send the case to a model server; the mask comes back in the case's convention.

    Returns:
        The :class:`medseg.client.Prediction`.
    """
    from medseg.client import predict

    return predict(
        url,
        case.files,
        grpc=grpc,
        model=model,
        label_convention=case.convention,
        channels=case.channels,
    )


def score_mask(mask: bytes, case: HeldOutCase) -> Any:
    """Dice and HD95 of a returned mask (NIfTI bytes) against the case's ground truth.

    Both label maps are read in the case's own convention and turned into TC/WT/ET regions.

    Returns:
        The :class:`medseg.evaluate.CaseScore`.

    Raises:
        MedsegError: If the mask is not on the ground truth's grid.
    """
    import nibabel as nib
    import torch

    from medseg.evaluate import score_case
    from medseg.labels import get_convention

    raw = gzip.decompress(mask) if mask[:2] == b"\x1f\x8b" else mask
    pred = np.asarray(nib.Nifti1Image.from_bytes(raw).dataobj)
    truth_img: Any = nib.load(str(case.label))
    truth = np.rint(np.asarray(truth_img.dataobj)).astype(np.int64)
    if pred.shape != truth.shape:
        raise MedsegError(
            f"case {case.case_id}: mask shape {pred.shape} differs from {case.label.name} "
            f"shape {truth.shape}"
        )
    conv = get_convention(case.convention)
    return score_case(
        case.case_id,
        torch.as_tensor(conv.to_regions(pred.astype(np.int64))),
        torch.as_tensor(conv.to_regions(truth)),
        tuple(float(z) for z in truth_img.header.get_zooms()[:3]),
    )


#: The pipeline's data-parallel helper steps (medseg.shards), shown on the line of the step they
#: serve (a count of shards) unless they fail; ``None``: not shown.
_FOLDED = {
    "shards": None,
    "preprocess-shard": "preprocess",
    "predict-shard": "predict",
    "clean-shard": None,
}


class DemoConsole:
    """What a person sees of the demo: one line per step with its time, a bar for training.

    Every line shown is also written to ``log``, the file that holds everything else (see
    :func:`medseg.pipeline_runner.run_local`'s ``sink``). It receives the pipeline's
    :class:`~medseg.pipeline_runner.StepEvents`.
    """

    def __init__(self, console: Console, log: TextIO, epochs: int):
        """Show on ``console``'s output (as it is now: stdout is redirected later) and log."""
        self.console = Console(file=console.file, width=console.width, soft_wrap=True)
        self.log = log
        self.epochs = epochs
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._last: dict[str, Any] = {}
        self._shards: dict[str, int] = {}

    def say(self, text: str) -> None:
        """One line (rich markup) on the terminal and in the log."""
        self.console.print(text, highlight=False)
        self.log.write(Text.from_markup(text).plain + "\n")
        self.log.flush()

    def done(self, what: str, seconds: float, detail: str = "", ok: bool = True) -> None:
        """The line of a finished step."""
        mark = "[green]✓[/]" if ok else "[bold red]✗[/]"
        self.say(f"{mark} {what:<10} {seconds:6.1f} s  {detail}".rstrip())

    def step_started(self, step: str) -> None:
        if step == "train" and self.console.is_terminal:
            self._last = {}
            self._bar = Progress(
                "  train epochs",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
                # stdout is the pipeline log while the pipeline runs: never take it over.
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._task = self._bar.add_task("train", total=self.epochs)
            self._bar.start()

    def step_line(self, step: str, line: str) -> None:
        from medseg.train import parse_epoch_log_line

        record = parse_epoch_log_line(line) if step == "train" else None
        if record is not None:
            self._last.update(record)
            if self._bar is not None and self._task is not None:
                self._bar.update(self._task, completed=record["epoch"])

    def step_finished(self, step: str, seconds: float, ok: bool) -> None:
        detail = ""
        if step in _FOLDED and ok:
            target = _FOLDED[step]
            if target is not None:
                self._shards[target] = self._shards.get(target, 0) + 1
            return
        if step in self._shards:
            n = self._shards.pop(step)
            detail = f"{n} shard{'s' if n > 1 else ''}"
        if step == "train":
            self._task = None
            if self._bar is not None:
                self._bar.stop()
                self._bar = None
            if "epoch" in self._last:
                detail = f"{self._last['epoch']} epochs"
            if "dice_mean" in self._last:
                detail += f", validation mean Dice {self._last['dice_mean']:.3f}"
        self.done(step, seconds, detail, ok)


@dataclass
class DemoResult:
    """What the demo measured."""

    model_uri: str
    dice_validation: dict[str, float]
    case_id: str
    dice_case: dict[str, float]
    volumes_ml: dict[str, float]
    latency_rest_s: float
    latency_grpc_s: float
    compute_ms: int | None
    report: Path
    overlay: Path
    mask: Path
    log: Path
    seconds: float
    tracking: str = ""


def run_demo(
    pipeline: Pipeline,
    workdir: Path,
    store: str,
    cases: int,
    source: Path | None,
    epochs: int,
    console: Console,
    config: MedsegConfig | None = None,
    threshold: float = 0.8,
) -> DemoResult:
    """Run steps 2–5 against the object store in the environment (see the module docstring).

    Args:
        pipeline: The medseg pipeline (:func:`pipelines.medseg_pipeline.medseg_pipeline`,
            given by the caller: the library does not import the pipeline layer).
        workdir: Scratch folder: synthetic data, kfp.local outputs, results, ``demo.log``.
        store: ``s3://BUCKET`` of the platform.
        cases: Synthetic cases to write when ``source`` is None.
        source: A dataset folder in any layout ingest accepts, instead of synthetic data.
        epochs: Overrides the config's ``train.epochs`` when above 0.
        console: Where the short account goes.
        config: The config (default: :data:`DEMO_CONFIG` for synthetic data, else defaults).
        threshold: The pipeline's quality gate on the validation mean Dice.
    """
    from medseg.client import wait_ready
    from medseg.manifest import DatasetRef
    from medseg.minio_server import free_port
    from medseg.pipeline_params import pipeline_arguments
    from medseg.pipeline_runner import run_local
    from medseg.register import list_models
    from medseg.storage import Storage, join
    from medseg.synth import write_dataset

    started = time.perf_counter()
    log_path = workdir / "demo.log"
    with log_path.open("w", buffering=1) as log:
        storage = Storage()
        if source is None:
            source = workdir / "raw"
            if not source.is_dir():
                write_dataset(source, "brats2021", cases, shape=DEMO_SHAPE)
            cfg = config or MedsegConfig.model_validate(DEMO_CONFIG)
            shape = "×".join(map(str, DEMO_SHAPE))
            what = f"{cases} synthetic BraTS 2021 cases of {shape} voxels in {source}"
        else:
            cfg = config or MedsegConfig()
            what = f"your dataset {source}"
        if epochs:
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})
        out = DemoConsole(console, log, cfg.train.epochs)
        out.say(f"data: {what}")
        out.say("the Kubeflow pipeline, through kfp.local:")
        arguments = {
            "source": str(source),
            "dataset_name": "demo",
            "store": store,
            "training": {"workers": 2},
            "dice_threshold": threshold,
            "model_name": DEMO_MODEL,
        }
        run_local(
            pipeline,
            pipeline_arguments(arguments, cfg),
            workdir / "kfp-local",
            sink=log,
            events=out,
            log_name=str(log_path),
        )
        card = list_models(storage, store, DEMO_MODEL)[-1]
        model_uri = join(store, "models", DEMO_MODEL, card["version"])
        tracking = tracked_summary(card)
        if tracking:
            out.say(tracking)
        evaluation = card["evaluation"]
        eval_uri = evaluation["uri"].rsplit("/", 1)[0]

        report = workdir / "report.html"
        report.write_bytes(storage.get_bytes(join(eval_uri, "report.html")))
        overlays = [o.uri for o in storage.list(join(eval_uri, "overlays"))]
        overlay = workdir / "overlay.png"
        overlay.write_bytes(storage.get_bytes(overlays[0]))

        ds = card["dataset"]
        ref = DatasetRef.resolve(storage, store, f"{ds['name']}@{ds['version']}")
        case = held_out_case(ref.load(storage), source)

        t0 = time.perf_counter()
        http_port, grpc_port = free_port(), free_port()
        cmd = ServerArgs(model_uri, DEMO_MODEL, http_port, grpc_port).command()
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        try:
            rest_url = f"http://127.0.0.1:{http_port}"
            wait_ready(rest_url, 600, proc, log_path)  # a loaded machine imports slowly
            out.done("serve", time.perf_counter() - t0, f"kserve ModelServer, REST :{http_port}")
            t0 = time.perf_counter()
            rest = send_case(rest_url, case, DEMO_MODEL)
            grpc = send_case(f"127.0.0.1:{grpc_port}", case, DEMO_MODEL, grpc=True)
            out.done("predict", time.perf_counter() - t0, f"{case.case_id} over REST and gRPC")
        finally:
            proc.terminate()
            proc.wait(30)
        mask_path = workdir / f"{case.case_id}_mask.nii.gz"
        mask_path.write_bytes(rest.mask)
        scores = score_mask(rest.mask, case)
        return DemoResult(
            model_uri=model_uri,
            dice_validation=dict(evaluation["dice"]),
            case_id=case.case_id,
            dice_case=scores.dice,
            volumes_ml=rest.volumes_ml,
            latency_rest_s=rest.latency_s,
            latency_grpc_s=grpc.latency_s,
            compute_ms=rest.compute_ms,
            report=report,
            overlay=overlay,
            mask=mask_path,
            log=log_path,
            seconds=time.perf_counter() - started,
            tracking=tracking,
        )


def tracked_summary(card: dict[str, Any]) -> str:
    """One line on what MLflow holds of a registered version's run ("" when not tracked).

    Read back from the server: the run's epochs, its evaluation, the version and its alias.
    """
    tracked = card.get("mlflow")
    if not tracked:
        return ""
    from medseg.settings import TrackingSettings
    from medseg.tracking import CHAMPION, client

    mlflow = client(TrackingSettings(uri=tracked["tracking_uri"]))
    run_id = tracked["run_id"]
    epochs = len(mlflow.get_metric_history(run_id, "loss")) if run_id else 0
    version = mlflow.get_model_version(tracked["name"], tracked["version"])
    alias = f" ({CHAMPION})" if CHAMPION in (version.aliases or []) else ""
    return (
        f"MLflow {tracked['tracking_uri']}: run {run_id or '—'} ({epochs} epochs logged), "
        f"model {tracked['name']} version {tracked['version']}{alias}"
    )


def run_local_demo(
    pipeline: Pipeline,
    workdir: Path,
    cases: int,
    source: Path | None,
    epochs: int,
    console: Console,
    config: MedsegConfig | None = None,
    threshold: float = 0.8,
) -> DemoResult:
    """The whole demo: a fresh local MinIO (step 1), then :func:`run_demo` of ``pipeline``.

    The env file and the model cache go under ``workdir`` unless ``MEDSEG_ENV_FILE`` and
    ``MEDSEG_CACHE_DIR`` say otherwise. An MLflow server (``workdir/mlflow.db``, artifacts in
    the bucket) starts after MinIO and ``MLFLOW_TRACKING_URI`` points every step at it; both
    stop when the demo ends, however it ends.

    Raises:
        MedsegError: If ``source`` is not a dataset folder (before MinIO starts), or a step fails.
    """
    import shutil

    from medseg.minio_server import start_and_export

    if source is not None:
        from medseg.layouts import detect_layout

        detect_layout(source)  # a wrong folder fails now, not after MinIO started
    shutil.rmtree(workdir / "minio-data", ignore_errors=True)  # a fresh store every run
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MEDSEG_ENV_FILE", str(workdir / "minio.env"))
    os.environ.setdefault("MEDSEG_CACHE_DIR", str(workdir / "cache"))
    console.rule("medseg demo")
    server = start_and_export(workdir / "minio-data", None, DEFAULT_BUCKET)
    tracking = None
    try:
        console.print(f"MinIO on {server.endpoint}, bucket {DEFAULT_STORE}", highlight=False)
        from medseg import mlflow_server

        (workdir / "mlflow.db").unlink(missing_ok=True)  # its artifacts went with the store
        tracking = mlflow_server.start_and_export(DEFAULT_BUCKET, workdir / "mlflow.db")
        console.print(f"MLflow on {tracking.uri}, artifacts {tracking.artifacts}", highlight=False)
        return run_demo(
            pipeline, workdir, DEFAULT_STORE, cases, source, epochs, console, config, threshold
        )
    finally:
        if tracking is not None:
            tracking.stop()
        server.stop()
