"""Distributed training: the same entrypoint under ``torchrun`` and in a PyTorchJob pod.

Reads the standard torch distributed environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), uses gloo on CPU and NCCL on GPU, trains MONAI SegResNet on the
cached preprocessed cases with Dice loss, Adam and a cosine schedule, validates by sliding-window
inference with Dice per region all-reduced across ranks, and checkpoints every epoch (rank 0,
atomically). On start it resumes from the run's newest good checkpoint, so a preempted or killed
worker (``torchrun --max-restarts``, PyTorchJob ``restartPolicy: OnFailure``) costs at most one
epoch.

Run prefix layout::

    STORE/runs/RUN_ID/checkpoints/…      see medseg.checkpoint
    STORE/runs/RUN_ID/metrics.jsonl      one JSON object per epoch
    STORE/runs/RUN_ID/tensorboard/…      TensorBoard event files (``tensorboard --logdir``)
    STORE/runs/RUN_ID/mlflow.json        the run's MLflow run, when tracked (medseg.tracking)
    STORE/runs/RUN_ID/model/model.pt     best weights (state dict)
    STORE/runs/RUN_ID/model/model.yaml   the full config the server rebuilds everything from
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.data import DataLoader
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, Sampler

from medseg.checkpoint import CheckpointStore
from medseg.config import MedsegConfig, TrainConfig
from medseg.dataset import PreprocessedDataset
from medseg.errors import DatasetError, MedsegError
from medseg.infer import Segmenter
from medseg.manifest import DatasetRef
from medseg.names import check_name
from medseg.precision import autocast, memory_format
from medseg.preprocess import preprocessed_prefix
from medseg.settings import DEFAULT_STORE, StorageSettings
from medseg.storage import Storage, is_s3, join
from medseg.tasks import Task, task_of
from medseg.transforms import train_transforms

__all__ = [
    "DistributedWeightedSampler",
    "TrainResult",
    "epoch_log_line",
    "parse_epoch_log_line",
    "train",
    "train_loader",
]


class NonFiniteLoss(MedsegError):
    """The loss became NaN or Inf."""


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        run_prefix: ``STORE/runs/RUN_ID``.
        resumed_from: Epoch of the checkpoint this process resumed from (0: fresh).
        history: One metrics record per epoch, resumed epochs included.
        gate_metric: The task's quality-gate metric (BraTS: ``dice_mean``), which picks the
            best record.
    """

    run_prefix: str
    resumed_from: int
    gate_metric: str
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best(self) -> dict[str, Any]:
        """The record with the best validation :attr:`gate_metric` (BraTS: mean Dice)."""
        key = self.gate_metric
        scored = [h for h in self.history if h.get(key) is not None]
        return max(scored, key=lambda h: h[key]) if scored else {}


class _Board:
    """TensorBoard scalars, written locally by rank 0 and mirrored to ``RUN/tensorboard/``.

    With ``MEDSEG_TRAIN_METRICS_TEXTFILE`` set, the same progress also goes to a Prometheus
    textfile (:mod:`medseg.train_telemetry`).
    """

    def __init__(self, storage: Storage, run_prefix: str, run_id: str, regions: Sequence[str]):
        import tempfile

        from torch.utils.tensorboard import SummaryWriter

        from medseg.settings import TrainTelemetry

        self.storage, self.prefix = storage, join(run_prefix, "tensorboard")
        self.dir = Path(tempfile.mkdtemp(prefix="medseg-tb-"))
        self.writer = SummaryWriter(log_dir=str(self.dir))
        textfile = TrainTelemetry().metrics_textfile
        self.textfile = None
        if textfile is not None:
            from medseg.train_telemetry import TrainTextfile

            self.textfile = TrainTextfile(textfile, run_id, regions)

    def step(self, step: int, loss: float, samples_per_second: float) -> None:
        """Progress within an epoch: ``step/loss`` and ``step/samples_per_second`` per step.

        Written locally at once; mirrored with the epoch's :meth:`log`.
        """
        self.writer.add_scalar("step/loss", loss, step)
        self.writer.add_scalar("step/samples_per_second", samples_per_second, step)
        if self.textfile is not None:
            self.textfile.on_step(step, loss, samples_per_second)

    def log(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "epoch" and isinstance(value, int | float):
                self.writer.add_scalar(key, value, record["epoch"])
        self.writer.flush()
        if self.textfile is not None:
            self.textfile.on_epoch(record)
        for path in self.dir.iterdir():
            self.storage.put_file(join(self.prefix, path.name), path)

    def close(self) -> None:
        import shutil

        self.writer.close()
        shutil.rmtree(self.dir, ignore_errors=True)


#: Start of the one line rank 0 prints per epoch (``medseg demo`` follows training by it).
EPOCH_LOG = "[medseg.train] epoch "


def epoch_log_line(record: dict[str, Any]) -> str:
    """The log line of one epoch's record: :data:`EPOCH_LOG` and the record as JSON."""
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
    return EPOCH_LOG + json.dumps(shown)


def parse_epoch_log_line(line: str) -> dict[str, Any] | None:
    """The record of an :func:`epoch_log_line` found in ``line``, or None."""
    at = line.find(EPOCH_LOG)
    if at < 0:
        return None
    try:
        record = json.loads(line[at + len(EPOCH_LOG) :])
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _progress(rank: int) -> Any:
    """A rich progress bar on rank 0 when stderr is a terminal (logs get one line per epoch)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=rank != 0 or not console.is_terminal,
        transient=True,
    )


def _init_process_group(backend: str, rank: int, world: int) -> None:
    """``init_process_group`` from the env; under torchrun, in a namespace of its own per restart.

    torchrun's workers share the agent's TCPStore, which outlives a worker-group restart. Its
    default process-group keys (gloo's listening addresses among them) are the same in every
    round, so after a restart a rank may read the address of a peer killed in the previous
    round and fail with ``connectFullMesh … Connection refused`` (seen here in one of two runs
    that SIGKILLed a worker). Prefixing the keys with ``TORCHELASTIC_RESTART_COUNT`` keeps each
    round to its own.
    """
    from datetime import timedelta

    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restart is not None:
        agent_store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world,
            is_master=False,
            timeout=timedelta(minutes=10),
        )
        store = dist.PrefixStore(f"medseg/restart_{restart}", agent_store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    else:
        dist.init_process_group(backend)


def _dist_env() -> tuple[int, int, int]:
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def _tracker(
    storage: Storage, run_prefix: str, run_id: str, cfg: MedsegConfig, ref: DatasetRef
) -> Any:
    """Rank 0's :class:`medseg.tracking.RunTracker`, or None without ``MLFLOW_TRACKING_URI``."""
    from medseg.settings import TrackingSettings

    settings = TrackingSettings()
    if not settings.uri:
        return None
    from medseg.tracking import RunTracker, flatten, run_tags

    tags = run_tags(run_id, f"{ref.name}@{ref.version}", cfg.data.fingerprint())
    params = flatten(cfg.model_dump(mode="json"))
    return RunTracker(settings, storage, run_prefix, run_id, params, tags)


def _training_classes(data: PreprocessedDataset, task: Task) -> list[int] | None:
    """The class index of each training case of a classification task (from the index).

    Raises:
        DatasetError: If a case's index entry has no class the task knows (an index written
            before classes were recorded: preprocess again).
    """
    if task.outputs.kind != "classes":
        return None
    names = task.outputs.names
    bad = [c["case_id"] for c in data.cases if c.get("label") not in names]
    if bad:
        raise DatasetError(
            f"{data.prefix}: no class of task {task.name} in the index for case(s) "
            f"{', '.join(bad[:5])}; run `medseg preprocess` again"
        )
    return [names.index(c["label"]) for c in data.cases]


def _class_counts(classes: Sequence[int], task: Task) -> list[int]:
    counts = [0] * len(task.outputs.names)
    for y in classes:
        counts[y] += 1
    return counts


def _sampler(
    data: PreprocessedDataset,
    task: Task,
    cfg: MedsegConfig,
    classes: Sequence[int] | None,
    rank: int,
    world: int,
) -> DistributedSampler[Any] | DistributedWeightedSampler:
    """The task's weighted sampler when it asks for one, else shuffling without replacement."""
    weights = None if classes is None else task.sampling_weights(cfg.task, classes)
    if weights is not None:
        return DistributedWeightedSampler(weights, world, rank, cfg.train.seed)
    return DistributedSampler(
        data, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed
    )


class DistributedWeightedSampler(Sampler[int]):
    """Weighted sampling with replacement, split across the ranks of a DDP job.

    Every rank draws the same ``len(weights)`` (rounded up to a multiple of ``world``)
    indices from a generator seeded by ``seed`` and the epoch (:meth:`set_epoch`), and takes
    every ``world``-th from its ``rank``: the ranks see disjoint draws of one epoch, the same
    after a resume.
    """

    def __init__(self, weights: Sequence[float], world: int, rank: int, seed: int):
        if not weights or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("sampling weights must be non-negative with a positive sum")
        self.weights = torch.tensor(list(weights), dtype=torch.float64)
        self.world, self.rank, self.seed, self.epoch = world, rank, seed, 0
        self.per_rank = -(-len(weights) // world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, self.per_rank * self.world, True, generator=g)
        return iter(drawn[self.rank :: self.world].tolist())


def _validate_classes(
    model: torch.nn.Module,
    data: PreprocessedDataset,
    task: Task,
    device: torch.device,
    rank: int,
    world: int,
    batch: int,
) -> dict[str, float]:
    """The task's record over the whole validation split (AUC needs every case at once).

    Each rank scores every world-th case; the probabilities are gathered to every rank.
    """
    model.eval()
    rows: list[tuple[int, list[float], int]] = []
    mine = list(range(rank, len(data), world))
    with torch.no_grad():
        for start in range(0, len(mine), batch):
            items = [data[i] for i in mine[start : start + batch]]
            images = torch.stack([it["image"].float() for it in items]).to(device)
            logits = model(images)
            for i, it, row in zip(mine[start:], items, logits, strict=False):
                probs = task.activate(row).cpu().tolist()
                rows.append((i, probs, int(it["label"].reshape(-1)[0])))
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    rows.sort()
    probabilities = np.array([r[1] for r in rows], dtype=np.float64)
    return task.validation_metrics(probabilities, np.array([r[2] for r in rows], dtype=np.int64))


def _validate(
    model: torch.nn.Module,
    data: PreprocessedDataset,
    cfg: MedsegConfig,
    device: torch.device,
    rank: int,
    world: int,
) -> list[float]:
    """The task's score per output (BraTS: Dice per region) over the validation split.

    Each rank takes every world-th case; the sums are all-reduced.
    """
    task = task_of(cfg)
    outputs = len(task.outputs.names)
    sums = torch.zeros(outputs + 1, dtype=torch.float64)
    model.eval()
    segmenter = Segmenter(cfg, model, device)
    for i in range(rank, len(data), world):
        item = data[i]
        pred = segmenter.segment(item["image"])
        sums[:outputs] += task.validation_scores(pred, item["label"]).double()
        sums[-1] += 1
    if world > 1:
        dist.all_reduce(sums)
    n = max(float(sums[-1]), 1.0)
    return [float(s) / n for s in sums[:outputs]]


def train_loader(
    prefix: str,
    t: TrainConfig,
    settings: StorageSettings,
    rank: int = 0,
    world: int = 1,
    cfg: MedsegConfig | None = None,
) -> tuple[DataLoader, DistributedSampler[Any] | DistributedWeightedSampler]:
    """The training split's DataLoader (random chain in its workers) and its sampler.

    Args:
        prefix: The preprocessed prefix (see :func:`medseg.preprocess.preprocessed_prefix`).
        t: Training config (batch size, workers, ROI, seed).
        settings: Storage settings of the store holding ``prefix``.
        rank: This process's rank.
        world: Number of ranks; each rank's sampler yields its share of the cases.
        cfg: The full config, whose task may bring its own random chain and a weighted
            sampler (:meth:`medseg.tasks.Task.sampling_weights`); without it, the shared 3D
            chain and uniform shuffling.

    Returns:
        The loader, and its sampler (call ``set_epoch`` before each epoch).
    """
    task = task_of(cfg) if cfg is not None else None
    own = task.train_transforms(t, t.seed + rank) if task is not None else None
    chain = own or train_transforms(t, t.seed + rank)
    train_ds = PreprocessedDataset(prefix, "train", transform=chain, settings=settings)
    if task is None or cfg is None:
        sampler: DistributedSampler[Any] | DistributedWeightedSampler = DistributedSampler(
            train_ds, num_replicas=world, rank=rank, shuffle=True, seed=t.seed
        )
    else:
        classes = _training_classes(train_ds, task)
        sampler = _sampler(train_ds, task, cfg, classes, rank, world)
    loader = DataLoader(
        train_ds,
        batch_size=t.batch_size,
        sampler=sampler,
        num_workers=t.num_workers,
        persistent_workers=t.num_workers > 0,
    )
    return loader, sampler


def train(
    spec: str, store: str, run_id: str, cfg: MedsegConfig, storage: Storage | None = None
) -> TrainResult:
    """Train (or resume) run ``run_id`` on dataset ``spec``; call once per rank.

    Args:
        spec: ``NAME``, ``NAME@latest`` or ``NAME@VERSION``, preprocessed with ``cfg.data``.
        store: Root URI of the store.
        run_id: Run identifier; rerunning the same id resumes it.
        cfg: The full configuration.
        storage: Storage to use; from the environment when omitted.

    Returns:
        The run prefix, where it resumed from, and the per-epoch history.

    Raises:
        InvalidName: If ``run_id`` breaks the naming rule of :mod:`medseg.names`.
        DatasetError: If the dataset is missing or not preprocessed with ``cfg.data``.
        NonFiniteLoss: If the loss becomes NaN or Inf (the epoch and batch are named).
    """
    check_name(run_id, "run id")
    storage = storage or Storage()
    rank, world, local_rank = _dist_env()
    ref = DatasetRef.resolve(storage, store, spec)
    prefix = preprocessed_prefix(ref, cfg.data)
    if not storage.exists(join(prefix, "index.json")):
        raise DatasetError(
            f"dataset {ref} is not preprocessed for this config (no {prefix}/index.json): "
            f"run `medseg preprocess --dataset {ref}` with the same config first"
        )
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if world > 1 and not dist.is_initialized():
        _init_process_group("nccl" if cuda else "gloo", rank, world)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

    t = cfg.train
    task = task_of(cfg)
    loader, sampler = train_loader(prefix, t, storage.settings, rank, world, cfg)
    val_ds = PreprocessedDataset(prefix, "validation", settings=storage.settings)
    assert isinstance(loader.dataset, PreprocessedDataset)
    classes = _training_classes(loader.dataset, task)
    layout = memory_format(t.channels_last)
    net = task.build_network(cfg.model).to(device).to(memory_format=layout)
    model: torch.nn.Module = (
        DistributedDataParallel(net, device_ids=[local_rank] if cuda else None)
        if world > 1
        else net
    )
    counts = None if classes is None else _class_counts(classes, task)
    loss_fn = task.loss(cfg.task, counts).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs)
    # bfloat16 has float32's range: only float16 needs its loss scaled.
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and t.amp and t.amp_dtype == "float16")

    run_prefix = join(store, "runs", run_id)
    checkpoints = CheckpointStore(storage, run_prefix)
    result = TrainResult(run_prefix, resumed_from=0, gate_metric=task.gate_metric)
    best_state: dict[str, torch.Tensor] | None = None
    loaded = checkpoints.load_latest(map_location=device)
    if loaded is not None:
        epoch, state = loaded
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        best_state = state["best_model"]
        result.history = json.loads(state["history"])
        result.resumed_from = epoch
        if rank == 0:
            for key, reason in checkpoints.skipped:
                print(f"[medseg.train] skipped checkpoint {key}: {reason}", file=sys.stderr)
            print(f"[medseg.train] resuming {run_id} after epoch {epoch}", file=sys.stderr)

    board = _Board(storage, run_prefix, run_id, task.outputs.names) if rank == 0 else None
    tracker = _tracker(storage, run_prefix, run_id, cfg, ref) if rank == 0 else None
    progress = _progress(rank)
    progress.start()
    try:
        for epoch in range(result.resumed_from, t.epochs):
            started = time.perf_counter()
            sampler.set_epoch(epoch)
            torch.manual_seed(t.seed + 1000 * epoch + rank)  # dropout; same after a resume
            model.train()
            loss_sum = torch.zeros(2, dtype=torch.float64)
            batches = progress.add_task(f"epoch {epoch + 1}/{t.epochs}", total=len(loader))
            step_started = time.perf_counter()
            for step, batch in enumerate(loader):
                image = batch["image"].to(device, memory_format=layout)
                label = batch["label"].to(device)
                optimizer.zero_grad(set_to_none=True)
                with autocast(device, t.amp, t.amp_dtype):
                    loss = loss_fn(model(image), label)
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(
                        f"run {run_id}: loss is {loss.item()} at epoch {epoch + 1}, batch {step} "
                        f"(rank {rank}); lower the learning rate or check the data"
                    )
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                step_loss = loss.item()
                loss_sum += torch.tensor([step_loss * len(image), len(image)], dtype=torch.float64)
                if board is not None:  # rank 0: its own samples, times the ranks
                    now = time.perf_counter()
                    rate = len(image) * world / max(now - step_started, 1e-9)
                    board.step(epoch * len(loader) + step + 1, step_loss, rate)
                    if tracker is not None:
                        tracker.log_metrics(
                            {"step/loss": step_loss, "step/samples_per_second": rate},
                            epoch * len(loader) + step + 1,
                        )
                    step_started = now
                progress.advance(batches)
            progress.remove_task(batches)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            if world > 1:
                dist.all_reduce(loss_sum)
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "loss": float(loss_sum[0] / max(float(loss_sum[1]), 1.0)),
                "lr": lr,
                "samples": int(loss_sum[1]),
            }
            if (epoch + 1) % t.val_every == 0 or epoch + 1 == t.epochs:
                if task.outputs.kind == "classes":
                    record.update(
                        _validate_classes(net, val_ds, task, device, rank, world, t.batch_size)
                    )
                else:
                    scores = _validate(net, val_ds, cfg, device, rank, world)
                    record.update(task.validation_record(scores))
            record["epoch_seconds"] = time.perf_counter() - started
            record["samples_per_second"] = record["samples"] / record["epoch_seconds"]
            best_before = result.best.get(task.gate_metric, -1.0)
            result.history.append(record)
            if record.get(task.gate_metric, -1.0) > best_before or best_state is None:
                best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            if rank == 0:
                checkpoints.save(
                    epoch + 1,
                    {
                        "model": net.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "best_model": best_state,
                        "history": json.dumps(result.history),
                        "torch_rng": torch.get_rng_state(),
                    },
                )
                assert board is not None
                board.log(record)
                if tracker is not None:
                    tracker.log_metrics(
                        {k: v for k, v in record.items() if k != "epoch"}, record["epoch"]
                    )
                storage.put_bytes(
                    join(run_prefix, "metrics.jsonl"),
                    "".join(json.dumps(h) + "\n" for h in result.history).encode(),
                )
                print(epoch_log_line(record), file=sys.stderr, flush=True)
            if world > 1:
                dist.barrier()  # nobody starts the next epoch before its checkpoint exists
    except BaseException as exc:
        if tracker is not None:
            tracker.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        progress.stop()
        if board is not None:
            board.close()

    if rank == 0:
        import io

        buf = io.BytesIO()
        torch.save(best_state, buf)
        weights = storage.put_bytes(join(run_prefix, "model", "model.pt"), buf.getvalue())
        config = storage.put_bytes(join(run_prefix, "model", "model.yaml"), cfg.to_yaml().encode())
        mlflow_run = None
        if tracker is not None:
            from medseg.report import curves_png

            tracker.log_artifact("model.yaml", cfg.to_yaml().encode())
            tracker.log_artifact("curves.png", curves_png(result.history))
            tracker.close()
            if tracker.mlflow_run_id is not None:
                mlflow_run = {"tracking_uri": tracker.settings.uri, "run_id": tracker.mlflow_run_id}
        lineage = {
            "files": {"model.pt": weights.sha256, "model.yaml": config.sha256},
            "run_id": run_id,
            "dataset": {"store": store, "name": ref.name, "version": ref.version},
            "preprocessing": cfg.data.fingerprint(),
            "best": result.best,
            "epochs": len(result.history),
        }
        if mlflow_run is not None:
            lineage["mlflow"] = mlflow_run
        if os.environ.get("KFP_RUN_ID"):  # set by whoever runs training under a KFP run
            lineage["kfp_run_id"] = os.environ["KFP_RUN_ID"]
        storage.put_json(join(run_prefix, "model", "lineage.json"), lineage)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> None:
    """``python -m medseg.train --dataset NAME@VERSION --run-id ID [--config F] [--store S]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="medseg.train", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--store", default=os.environ.get("MEDSEG_STORE", DEFAULT_STORE))
    parser.add_argument("--config", help="YAML config: a local path or an s3:// URI.")
    args = parser.parse_args(argv)
    try:
        cfg = MedsegConfig()
        if args.config and is_s3(args.config):
            cfg = MedsegConfig.from_yaml(Storage().get_bytes(args.config), f"config {args.config}")
        elif args.config:
            cfg = MedsegConfig.load(args.config)
        train(args.dataset, args.store, args.run_id, cfg)
    except MedsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
