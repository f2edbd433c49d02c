"""Distributed training: the same entrypoint under ``torchrun`` and in a PyTorchJob pod.

Reads the standard torch distributed environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), uses gloo on CPU and NCCL on GPU, trains MONAI SegResNet on the
cached preprocessed cases with Dice loss, Adam and a cosine (or constant) schedule, validates by
sliding-window inference with Dice per region all-reduced across ranks, and checkpoints every
epoch (rank 0, atomically). On start it resumes from the run's newest good checkpoint, so a
preempted or killed worker (``torchrun --max-restarts``, PyTorchJob ``restartPolicy: OnFailure``)
costs at most one epoch.

Run prefix layout::

    STORE/runs/RUN_ID/checkpoints/…      see medseg.training.checkpoint
    STORE/runs/RUN_ID/metrics.jsonl      one JSON object per epoch
    STORE/runs/RUN_ID/tensorboard/…      TensorBoard event files (``tensorboard --logdir``)
    STORE/runs/RUN_ID/mlflow.json        the run's MLflow run, when tracked (registry.tracking)
    STORE/runs/RUN_ID/model/model.pt     best weights (state dict)
    STORE/runs/RUN_ID/model/model.yaml   the full config the server rebuilds everything from
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
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

from medseg.artifact.files import CONFIG_FILE, run_model_uri, write_lineage, write_model
from medseg.config import MedsegConfig, TrainConfig
from medseg.core.errors import DatasetError, MedsegError
from medseg.core.names import check_name
from medseg.core.settings import DEFAULT_STORE, StorageSettings, TrackingSettings, TrainTelemetry
from medseg.core.storage import Storage, join
from medseg.data.dataset import PreprocessedDataset
from medseg.data.manifest import DatasetRef
from medseg.data.preprocess import preprocessed_prefix
from medseg.data.transforms import train_transforms
from medseg.inference.infer import Segmenter
from medseg.inference.precision import autocast, memory_format
from medseg.io.report import curves_png
from medseg.registry.tracking import RunTracker, flatten, run_tags
from medseg.tasks import Task, task_of
from medseg.training.checkpoint import CheckpointStore
from medseg.training.telemetry import TrainTextfile

__all__ = [
    "DistributedWeightedSampler",
    "TrainResult",
    "Trainer",
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
    textfile (:mod:`medseg.training.telemetry`).
    """

    def __init__(self, storage: Storage, run_prefix: str, run_id: str, regions: Sequence[str]):
        import tempfile

        from torch.utils.tensorboard import SummaryWriter

        self.storage, self.prefix = storage, join(run_prefix, "tensorboard")
        self.dir = Path(tempfile.mkdtemp(prefix="medseg-tb-"))
        self.writer = SummaryWriter(log_dir=str(self.dir))
        textfile = TrainTelemetry().metrics_textfile
        self.textfile = None
        if textfile is not None:
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
    """Rank 0's :class:`~medseg.registry.tracking.RunTracker` (None without MLFLOW_TRACKING_URI)."""
    settings = TrackingSettings()
    if not settings.uri:
        return None

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
) -> tuple[DataLoader, EpochKeys]:
    """The training split's DataLoader (random chain in its workers) and its sampler.

    Args:
        prefix: The preprocessed prefix (see :func:`medseg.data.preprocess.preprocessed_prefix`).
        t: Training config (batch size, workers, ROI, seed).
        settings: Storage settings of the store holding ``prefix``.
        rank: This process's rank.
        world: Number of ranks; each rank's sampler yields its share of the cases.
        cfg: The full config, whose task may bring its own random chain and a weighted
            sampler (:meth:`medseg.tasks.Task.sampling_weights`); without it, the shared 3D
            chain and uniform shuffling.

    Returns:
        The loader, and its sampler (call ``set_epoch`` before each epoch). The sampler yields
        ``(epoch, draw, index)``: each draw's random chain is seeded by the run's seed, the
        epoch and the draw's place in it, so a resumed run draws what the uninterrupted one
        would have.
    """
    task = task_of(cfg) if cfg is not None else None
    own = task.train_transforms(t, t.seed) if task is not None else None
    chain = own or train_transforms(t, t.seed)
    train_ds = PreprocessedDataset(prefix, "train", transform=chain, settings=settings, seed=t.seed)
    if task is None or cfg is None:
        sampler: DistributedSampler[Any] | DistributedWeightedSampler = DistributedSampler(
            train_ds, num_replicas=world, rank=rank, shuffle=True, seed=t.seed
        )
    else:
        classes = _training_classes(train_ds, task)
        sampler = _sampler(train_ds, task, cfg, classes, rank, world)
    keyed = EpochKeys(sampler, rank, world)
    loader = DataLoader(
        train_ds,
        batch_size=t.batch_size,
        sampler=keyed,
        num_workers=t.num_workers,
        persistent_workers=t.num_workers > 0,
        # Its own generator: starting the workers then draws nothing from the global one, whose
        # per-epoch seed drives dropout (a resumed process starts its workers an epoch later).
        generator=torch.Generator().manual_seed(t.seed),
    )
    return loader, keyed


class EpochKeys(Sampler[tuple[int, int, int]]):
    """An index sampler's draws as ``(epoch, draw, index)`` (see :class:`PreprocessedDataset`).

    ``draw`` is the draw's place in the epoch's order over every rank: rank ``r``'s ``k``-th
    draw is ``r + k * world``, as both samplers deal the epoch's draws out (every ``world``-th
    from ``rank``). A case drawn twice in an epoch (the weighted sampler draws with
    replacement) is augmented twice, differently.
    """

    def __init__(
        self, inner: DistributedSampler[Any] | DistributedWeightedSampler, rank: int, world: int
    ):
        self.inner, self.epoch, self.rank, self.world = inner, 0, rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return ((self.epoch, self.rank + k * self.world, i) for k, i in enumerate(self.inner))


class Trainer:
    """One rank's training of one run, as a loop over hooks (nnU-Net's ``nnUNetTrainer``).

    :meth:`run` calls :meth:`on_train_start` (dataset, process group, loaders, network, resume,
    telemetry), then per epoch :meth:`train_step` on each batch, :meth:`validation_step` on the
    epochs that validate, and :meth:`on_epoch_end` (best weights, checkpoint, telemetry), and
    last :meth:`on_train_end` (the model artifact, see :mod:`medseg.artifact.files`). The task
    (:func:`medseg.tasks.task_of`) supplies the network, the loss and the validation metrics; a
    subclass changes one hook, not the loop. :func:`train` runs the plain one.

    Attributes:
        spec: The dataset, ``NAME[@VERSION]``.
        store: Root URI of the store.
        run_id: The run; rerunning the same id resumes it.
        cfg: The full configuration.
        storage: The store's storage.
        rank: This process's rank (``RANK``); ``world`` ranks in all (``WORLD_SIZE``).
        run_prefix: ``STORE/runs/RUN_ID``.
        task: The config's task.
        result: What the run produced so far (history, where it resumed from).
    """

    def __init__(
        self,
        spec: str,
        store: str,
        run_id: str,
        cfg: MedsegConfig,
        storage: Storage | None = None,
    ) -> None:
        check_name(run_id, "run id")
        self.spec, self.store, self.run_id, self.cfg = spec, store, run_id, cfg
        self.storage = storage or Storage()
        self.rank, self.world, self.local_rank = _dist_env()
        self.run_prefix = join(store, "runs", run_id)
        self.task = task_of(cfg)
        self.result = TrainResult(
            self.run_prefix, resumed_from=0, gate_metric=self.task.gate_metric
        )
        self.best_state: dict[str, torch.Tensor] | None = None
        self.board: _Board | None = None
        self.tracker: Any = None

    def run(self) -> TrainResult:
        """Train (or resume) the run: the hooks in their order.

        Raises:
            DatasetError: If the dataset is missing or not preprocessed with ``cfg.data``.
            NonFiniteLoss: If the loss becomes NaN or Inf (the epoch and batch are named).
        """
        self.on_train_start()
        try:
            for epoch in range(self.result.resumed_from, self.cfg.train.epochs):
                record = self.train_epoch(epoch)
                if (
                    epoch + 1
                ) % self.cfg.train.val_every == 0 or epoch + 1 == self.cfg.train.epochs:
                    record.update(self.validation_step())
                self.on_epoch_end(epoch, record)
        except BaseException as exc:
            if self.tracker is not None:
                self.tracker.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            self.progress.stop()
            if self.board is not None:
                self.board.close()
        self.on_train_end()
        return self.result

    def on_train_start(self) -> None:
        """Resolve the dataset, join the process group, build loaders and network, resume."""
        self.ref = DatasetRef.resolve(self.storage, self.store, self.spec)
        self.prefix = preprocessed_prefix(self.ref, self.cfg.data)
        if not self.storage.exists(join(self.prefix, "index.json")):
            raise DatasetError(
                f"dataset {self.ref} is not preprocessed for this config (no "
                f"{self.prefix}/index.json): run `medseg preprocess --dataset {self.ref}` with "
                "the same config first"
            )
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{self.local_rank}" if cuda else "cpu")
        if self.world > 1 and not dist.is_initialized():
            _init_process_group("nccl" if cuda else "gloo", self.rank, self.world)
        torch.manual_seed(self.cfg.train.seed)  # identical initial weights on every rank
        self.loader, self.sampler = train_loader(
            self.prefix, self.cfg.train, self.storage.settings, self.rank, self.world, self.cfg
        )
        self.val_ds = PreprocessedDataset(self.prefix, "validation", settings=self.storage.settings)
        self._build_model(cuda)
        self._resume()
        if self.rank == 0:
            names = self.task.outputs.names
            self.board = _Board(self.storage, self.run_prefix, self.run_id, names)
            self.tracker = _tracker(self.storage, self.run_prefix, self.run_id, self.cfg, self.ref)
        self.progress = _progress(self.rank)
        self.progress.start()

    def _build_model(self, cuda: bool) -> None:
        """The network (DDP-wrapped across ranks), the task's loss, optimiser and schedule."""
        t = self.cfg.train
        assert isinstance(self.loader.dataset, PreprocessedDataset)
        classes = _training_classes(self.loader.dataset, self.task)
        self.layout = memory_format(t.channels_last, self.task.inputs.spatial_dims)
        net = self.task.build_network(self.cfg.model).to(self.device)
        self.net = net.to(memory_format=self.layout)
        if t.channels_last and self.world > 1:
            # A 1x1x1 kernel's channels-last and contiguous strides name the same order in memory;
            # autograd hands its gradient back contiguous and DDP copies those few numbers into its
            # bucket, warning that the strides differ. Nothing else is affected.
            warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides")
        self.model: torch.nn.Module = (
            DistributedDataParallel(self.net, device_ids=[self.local_rank] if cuda else None)
            if self.world > 1
            else self.net
        )
        counts = None if classes is None else _class_counts(classes, self.task)
        self.loss_fn = self.task.loss(self.cfg.task, counts).to(self.device)
        self.optimizer = torch.optim.Adam(
            self.net.parameters(), lr=t.lr, weight_decay=t.weight_decay
        )
        self.scheduler: torch.optim.lr_scheduler.LRScheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=t.epochs)
            if t.lr_schedule == "cosine"
            else torch.optim.lr_scheduler.ConstantLR(self.optimizer, factor=1.0)
        )
        self.forward: Any = torch.compile(self.model) if t.compile else self.model
        # bfloat16 has float32's range: only float16 needs its loss scaled.
        fp16 = cuda and t.amp and t.amp_dtype == "float16"
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)

    def _resume(self) -> None:
        """Load the run's newest good checkpoint, if any: weights, optimiser, history."""
        self.checkpoints = CheckpointStore(self.storage, self.run_prefix)
        loaded = self.checkpoints.load_latest(map_location=self.device)
        if loaded is None:
            return
        epoch, state = loaded
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.best_state = state["best_model"]
        self.result.history = json.loads(state["history"])
        self.result.resumed_from = epoch
        if self.rank == 0:
            for key, reason in self.checkpoints.skipped:
                print(f"[medseg.train] skipped checkpoint {key}: {reason}", file=sys.stderr)
            print(f"[medseg.train] resuming {self.run_id} after epoch {epoch}", file=sys.stderr)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over this rank's share of the training split (:meth:`train_step` per batch).

        Returns:
            The epoch's record: mean loss over all ranks, learning rate, samples.
        """
        t = self.cfg.train
        self.epoch_started = time.perf_counter()
        self.sampler.set_epoch(epoch)
        torch.manual_seed(t.seed + 1000 * epoch + self.rank)  # dropout; same after a resume
        self.model.train()
        loss_sum = torch.zeros(2, dtype=torch.float64)
        batches = self.progress.add_task(f"epoch {epoch + 1}/{t.epochs}", total=len(self.loader))
        step_started = time.perf_counter()
        for step, batch in enumerate(self.loader):
            step_loss, samples = self.train_step(epoch, step, batch)
            loss_sum += torch.tensor([step_loss * samples, samples], dtype=torch.float64)
            if self.rank == 0:  # its own samples, times the ranks
                now = time.perf_counter()
                rate = samples * self.world / max(now - step_started, 1e-9)
                self._log_step(epoch * len(self.loader) + step + 1, step_loss, rate)
                step_started = now
            self.progress.advance(batches)
        self.progress.remove_task(batches)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        if self.world > 1:
            dist.all_reduce(loss_sum)
        return {
            "epoch": epoch + 1,
            "loss": float(loss_sum[0] / max(float(loss_sum[1]), 1.0)),
            "lr": lr,
            "samples": int(loss_sum[1]),
        }

    def train_step(self, epoch: int, step: int, batch: dict[str, Any]) -> tuple[float, int]:
        """One optimiser step on ``batch`` with the task's loss.

        Returns:
            The batch's loss and its number of samples.

        Raises:
            NonFiniteLoss: If the loss is NaN or Inf.
        """
        t = self.cfg.train
        image = batch["image"].to(self.device, memory_format=self.layout)
        label = batch["label"].to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, t.amp, t.amp_dtype):
            loss = self.loss_fn(self.forward(image), label)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(
                f"run {self.run_id}: loss is {loss.item()} at epoch {epoch + 1}, batch {step} "
                f"(rank {self.rank}); lower the learning rate or check the data"
            )
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item(), len(image)

    def _log_step(self, step: int, loss: float, rate: float) -> None:
        """A step's loss and throughput to TensorBoard (and MLflow), on rank 0."""
        assert self.board is not None
        self.board.step(step, loss, rate)
        if self.tracker is not None:
            self.tracker.log_metrics({"step/loss": loss, "step/samples_per_second": rate}, step)

    def validation_step(self) -> dict[str, float]:
        """The task's validation metrics over the whole split, the same on every rank."""
        task, t = self.task, self.cfg.train
        if task.outputs.kind == "classes":
            return _validate_classes(
                self.net, self.val_ds, task, self.device, self.rank, self.world, t.batch_size
            )
        scores = _validate(self.net, self.val_ds, self.cfg, self.device, self.rank, self.world)
        return task.validation_record(scores)

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        """Time the epoch, keep the best weights, checkpoint and log (rank 0), wait for all."""
        record["epoch_seconds"] = time.perf_counter() - self.epoch_started
        record["samples_per_second"] = record["samples"] / record["epoch_seconds"]
        gate = self.task.gate_metric
        best_before = self.result.best.get(gate, -1.0)
        self.result.history.append(record)
        if record.get(gate, -1.0) > best_before or self.best_state is None:
            self.best_state = {
                k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()
            }
        if self.rank == 0:
            self.checkpoints.save(
                epoch + 1,
                {
                    "model": self.net.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "best_model": self.best_state,
                    "history": json.dumps(self.result.history),
                    "torch_rng": torch.get_rng_state(),
                },
            )
            self._log_epoch(record)
        if self.world > 1:
            dist.barrier()  # nobody starts the next epoch before its checkpoint exists

    def _log_epoch(self, record: dict[str, Any]) -> None:
        """The epoch's record to TensorBoard, MLflow, ``metrics.jsonl`` and the log."""
        assert self.board is not None
        self.board.log(record)
        if self.tracker is not None:
            self.tracker.log_metrics(
                {k: v for k, v in record.items() if k != "epoch"}, record["epoch"]
            )
        self.storage.put_bytes(
            join(self.run_prefix, "metrics.jsonl"),
            "".join(json.dumps(h) + "\n" for h in self.result.history).encode(),
        )
        print(epoch_log_line(record), file=sys.stderr, flush=True)

    def on_train_end(self) -> None:
        """Write the model artifact (rank 0: best weights, config, lineage) and leave the group."""
        if self.rank == 0:
            self._write_model()
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()

    def _write_model(self) -> None:
        """The run's model (:func:`medseg.artifact.files.write_model`), its lineage written last."""
        assert self.best_state is not None
        cfg, uri = self.cfg, run_model_uri(self.run_prefix)
        files = write_model(self.storage, uri, self.best_state, cfg)
        facts: dict[str, Any] = {
            "run_id": self.run_id,
            "dataset": {"store": self.store, "name": self.ref.name, "version": self.ref.version},
            "preprocessing": cfg.data.fingerprint(),
            "best": self.result.best,
            "epochs": len(self.result.history),
        }
        if self.tracker is not None:
            self.tracker.log_artifact(CONFIG_FILE, cfg.to_yaml().encode())
            self.tracker.log_artifact("curves.png", curves_png(self.result.history))
            self.tracker.close()
            if self.tracker.mlflow_run_id is not None:
                facts["mlflow"] = {
                    "tracking_uri": self.tracker.settings.uri,
                    "run_id": self.tracker.mlflow_run_id,
                }
        if os.environ.get("KFP_RUN_ID"):  # set by whoever runs training under a KFP run
            facts["kfp_run_id"] = os.environ["KFP_RUN_ID"]
        write_lineage(self.storage, uri, files, facts)


def train(
    spec: str, store: str, run_id: str, cfg: MedsegConfig, storage: Storage | None = None
) -> TrainResult:
    """Train (or resume) run ``run_id`` on dataset ``spec``; call once per rank.

    Runs a :class:`Trainer`; subclass it to change one of its hooks.

    Args:
        spec: ``NAME``, ``NAME@latest`` or ``NAME@VERSION``, preprocessed with ``cfg.data``.
        store: Root URI of the store.
        run_id: Run identifier; rerunning the same id resumes it.
        cfg: The full configuration.
        storage: Storage to use; from the environment when omitted.

    Returns:
        The run prefix, where it resumed from, and the per-epoch history.

    Raises:
        InvalidName: If ``run_id`` breaks the naming rule of :mod:`medseg.core.names`.
        DatasetError: If the dataset is missing or not preprocessed with ``cfg.data``.
        NonFiniteLoss: If the loss becomes NaN or Inf (the epoch and batch are named).
    """
    return Trainer(spec, store, run_id, cfg, storage).run()


def main(argv: list[str] | None = None) -> None:
    """``python -m medseg.training.train --dataset N@V --run-id ID [--config F] [--store S]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="medseg.training.train", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--store", default=os.environ.get("MEDSEG_STORE", DEFAULT_STORE))
    parser.add_argument("--config", help="YAML config: a local path or an s3:// URI.")
    args = parser.parse_args(argv)
    try:
        cfg = MedsegConfig.read(args.config) if args.config else MedsegConfig()
        train(args.dataset, args.store, args.run_id, cfg)
    except MedsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
