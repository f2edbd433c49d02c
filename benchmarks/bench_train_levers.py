"""Training levers: samples/s and time to a validation Dice of 0.90, against the MONAI tutorial.

On the demo's data and model (``medseg.apps.demo.DEMO_CONFIG``: 20 synthetic cases of
``DEMO_SHAPE``, SegResNet with 8 filters, batches of 2, ROI 48×48×40), in one run:

* **(a) samples/s** of the MONAI tutorial loop (``bench_train_throughput.TutorialLoop``: the
  baseline), of medseg's :class:`medseg.training.train.Trainer` with the demo's settings, and of the
  trainer with each lever on its own: foreground-balanced crops (``foreground_crops``), loader
  workers (``num_workers``; pinned memory only matters for copies to a GPU, so on a CPU it is
  not a lever), channels-last 3D, ``torch.compile``, batch size and crop size, the loss
  (``task.loss``: ``dice``, the tutorial's, or ``dice_focal``). The learning rate and its
  schedule do not change a step's cost, so they only enter (b).
* **(b) training seconds to a validation mean Dice of 0.90** for the baseline, medseg's default
  and a combination of levers (``--combo``), plus, with ``--converge-levers``, each lever that
  changes what is learnt. The Dice is the trainer's validation score: on the *preprocessed*
  grid (foreground-cropped, 1 mm), thresholded regions, over the validation split, computed the
  same way for every loop (:func:`medseg.training.train._validate`), every ``--val-every`` epochs,
  its time left out. At the end the fastest run that reached the target is also scored on served
  label maps (``medseg.inference.predict`` + ``medseg.evaluation.evaluate``, original grid).

All loops are stepped in turn, one epoch each per round, so that the load of this shared machine
falls on all of them alike; the load average is printed beside the figures. Samples/s are over
the timed epochs after a warm-up epoch; the spread of the per-round ratios shows how much of a
ratio is the machine's noise.

    python benchmarks/bench_train_levers.py                      # quick mode (< 10 min)
    python benchmarks/bench_train_levers.py --levers compile --epochs 3 --seconds 0
    python benchmarks/bench_train_levers.py --converge-levers --seconds 600
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_train_throughput import TutorialLoop, tutorial_files

from medseg.apps.demo import DEMO_CONFIG, DEMO_SHAPE
from medseg.config import MedsegConfig
from medseg.core.storage import Storage, join
from medseg.data.dataset import PreprocessedDataset
from medseg.data.ingest import ingest
from medseg.data.manifest import DatasetRef
from medseg.data.preprocess import preprocess, preprocessed_prefix
from medseg.data.synth import write_dataset
from medseg.evaluation.evaluate import evaluate
from medseg.inference.infer import load_model
from medseg.inference.predict import predict
from medseg.training.train import Trainer, _validate

#: Each lever on its own: the settings it changes from the demo's, by config section.
LEVERS: dict[str, dict[str, dict[str, Any]]] = {
    "foreground": {"train": {"foreground_crops": 0.5}},
    "workers": {"train": {"num_workers": 2}},
    "channels_last": {"train": {"channels_last": True}},
    "compile": {"train": {"compile": True}},
    "batch4": {"train": {"batch_size": 4}},
    "crop32": {"train": {"roi_size": [32, 32, 32]}},
    "crop64": {"train": {"roi_size": [64, 64, 48]}},
    "constant_lr": {"train": {"lr_schedule": "constant"}},
    "lr6e-3": {"train": {"lr": 6e-3}},
    "dice": {"task": {"loss": "dice"}},
    "dice_focal": {"task": {"loss": "dice_focal"}},
}
#: Levers that change what is learnt (the others only how fast a step runs).
LEARNING = (
    "foreground",
    "batch4",
    "crop32",
    "crop64",
    "constant_lr",
    "lr6e-3",
    "dice",
    "dice_focal",
)
#: Levers that leave a step's cost alone: not timed in (a).
SAME_STEP = ("constant_lr", "lr6e-3")


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) {five:.1f} (5 min) on {os.cpu_count()} cores"


#: The training seed of every loop (``--seed``): initial weights, crops, order.
SEED = [0]


def demo_config() -> MedsegConfig:
    """The demo's config, with the run's training seed."""
    cfg = MedsegConfig.model_validate(DEMO_CONFIG)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": SEED[0]})})


def lever_config(names: list[str]) -> MedsegConfig:
    """The demo's config with the named levers applied (in order)."""
    raw = demo_config().model_dump()
    for name in names:
        for section, settings in LEVERS[name].items():
            raw[section] = {**raw[section], **settings}
    return MedsegConfig.model_validate(raw)


class Loop:
    """One training loop under test, stepped an epoch at a time.

    Attributes:
        name: Shown in the table.
        samples: Samples trained on in the timed epochs.
        seconds: Training seconds of the timed epochs (validation left out).
        epochs: Epochs run.
        reached: Training seconds (all epochs) when validation first reached the target.
    """

    def __init__(self, name: str, target: float) -> None:
        self.name, self.target = name, target
        self.samples, self.seconds, self.epochs = 0, 0.0, 0
        self.total = 0.0
        self.reached: float | None = None
        self.rates: list[float] = []  # samples/s of each timed epoch
        self.dice: list[tuple[int, float, float]] = []  # (epoch, training seconds, dice)

    def run_epoch(self, validate: bool) -> tuple[int, float, float | None]:
        """Train one epoch, then validate if asked: (samples, training seconds, Dice or None)."""
        raise NotImplementedError

    def epoch(self, val_every: int = 0) -> None:
        """Train one epoch (timed unless it is the first); validate when due."""
        due = bool(val_every) and (self.epochs + 1) % val_every == 0
        n, s, dice = self.run_epoch(due)
        self.epochs += 1
        self.total += s
        if self.epochs > 1:
            self.samples, self.seconds = self.samples + n, self.seconds + s
            self.rates.append(n / s)
        if dice is not None:
            self.dice.append((self.epochs, self.total, dice))
            if dice >= self.target and self.reached is None:
                self.reached = self.total

    @property
    def rate(self) -> float:
        return self.samples / self.seconds if self.seconds else float("nan")

    def close(self) -> None:
        """Release what the loop holds."""


class Tutorial(Loop):
    """The MONAI tutorial loop on the training split, scored on the preprocessed validation."""

    def __init__(
        self, files: list[dict[str, Any]], cfg: MedsegConfig, val: Any, target: float = 1.0
    ) -> None:
        super().__init__("tutorial (baseline)", target)
        self.loop, self.cfg, self.val = TutorialLoop(files, cfg), cfg, val

    def run_epoch(self, validate: bool) -> tuple[int, float, float | None]:
        import torch

        n, seconds = self.loop.epoch()
        if not validate:
            return n, seconds, None
        scores = _validate(self.loop.net, self.val, self.cfg, torch.device("cpu"), 0, 1)
        return n, seconds, sum(scores) / len(scores)


class Medseg(Loop):
    """medseg's :class:`Trainer` driven hook by hook (checkpoint every epoch, as ``run``)."""

    def __init__(
        self, name: str, spec: str, store: str, cfg: MedsegConfig, run: str, target: float = 1.0
    ) -> None:
        super().__init__(name, target)
        self.trainer = Trainer(spec, store, run, cfg)
        self.trainer.on_train_start()
        self.checkpoint = False

    def run_epoch(self, validate: bool) -> tuple[int, float, float | None]:
        t = time.perf_counter()
        record = self.trainer.train_epoch(self.epochs)
        seconds = time.perf_counter() - t
        if validate:  # not timed
            record.update(self.trainer.validation_step())
        if self.checkpoint:  # a real run's per-epoch cost: best weights, checkpoint, logs
            t = time.perf_counter()
            self.trainer.on_epoch_end(self.epochs, record)
            seconds += time.perf_counter() - t
        return record["samples"], seconds, record.get("dice_mean")

    def close(self) -> None:
        self.trainer.progress.stop()
        if self.trainer.board is not None:
            self.trainer.board.close()


def interleave(loops: list[Loop], more: Callable[[Loop], bool], val_every: int = 0) -> None:
    """One epoch of each loop per round, while ``more(loop)`` holds for any.

    The order within a round is shuffled (seeded), so that a load pattern of the machine does
    not fall on the same loop every round.
    """
    import random

    order = random.Random(0)
    while True:
        active = [loop for loop in loops if more(loop)]
        if not active:
            return
        order.shuffle(active)
        for loop in active:
            loop.epoch(val_every)


def throughput(
    spec: str, store: str, files: list, val: Any, levers: list[str], epochs: int
) -> None:
    """(a): samples/s of the baseline, medseg and each lever, interleaved."""
    base = demo_config()
    loops: list[Loop] = [Tutorial(files, base, val), Medseg("medseg", spec, store, base, "t-m")]
    for name in levers:
        if name not in SAME_STEP:
            loops.append(Medseg(f"medseg + {name}", spec, store, lever_config([name]), f"t-{name}"))
    print(f"(a) samples/s, {epochs} timed epochs after a warm-up; {_load()}", flush=True)
    started = time.perf_counter()
    interleave(loops, lambda loop: loop.epochs < epochs + 1)
    baseline, medseg = loops[0], loops[1]
    print("  ratios: over all timed epochs; [min-max] of the per-round ratios, the load's noise")
    for loop in loops:
        loop.close()
        per_round = [a / b for a, b in zip(loop.rates, medseg.rates, strict=True)]
        print(
            f"  {loop.name:<26} {loop.rate:6.2f} samples/s  "
            f"{loop.rate / baseline.rate:5.2f}x baseline  {loop.rate / medseg.rate:5.2f}x medseg "
            f"[{min(per_round):.2f}-{max(per_round):.2f}]",
            flush=True,
        )
    print(f"  ({time.perf_counter() - started:.0f} s; now {_load()})", flush=True)


def converge(
    spec: str,
    store: str,
    files: list,
    val: Any,
    runs: dict[str, list[str]],
    seconds: float,
    val_every: int,
    target: float,
) -> Medseg | None:
    """(b): training seconds to a validation mean Dice of ``target``, interleaved.

    Returns:
        The fastest medseg loop that reached the target (its model written), or None.
    """
    base = demo_config()
    loops: list[Loop] = [Tutorial(files, base, val, target)]
    for name, levers in runs.items():
        loop = Medseg(name, spec, store, lever_config(levers), f"c-{len(loops)}", target)
        loop.checkpoint = True
        loops.append(loop)
    epochs = base.train.epochs
    print(
        f"(b) training seconds to validation mean Dice {target} (preprocessed grid, every "
        f"{val_every} epochs, at most {epochs} epochs or {seconds:.0f} s each); {_load()}",
        flush=True,
    )
    interleave(
        loops,
        lambda loop: loop.reached is None and loop.total < seconds and loop.epochs < epochs,
        val_every,
    )
    baseline = loops[0].reached
    for loop in loops:
        loop.close()
        best = max((d for _, _, d in loop.dice), default=float("nan"))
        if loop.reached is None:
            shown = f"not reached in {loop.total:.0f} s / {loop.epochs} epochs (best {best:.3f})"
        else:
            ratio = f"{baseline / loop.reached:.2f}x baseline" if baseline else "baseline: n/a"
            shown = f"{loop.reached:6.1f} s at epoch {loop.epochs} ({ratio})"
        print(f"  {loop.name:<34} {shown}", flush=True)
    print(f"  (now {_load()})", flush=True)
    reached = [loop for loop in loops[1:] if loop.reached is not None]
    if not reached:
        return None
    fastest = min(reached, key=lambda loop: loop.reached or 0.0)
    assert isinstance(fastest, Medseg)
    fastest.trainer.on_train_end()
    return fastest


def score_served(loop: Medseg, store: str, work: Path) -> None:
    """The fastest run's model on served label maps: predict + evaluate, original grid."""
    storage = Storage()
    model_uri = join(loop.trainer.run_prefix, "model")
    seg = load_model(model_uri, storage)
    pred = predict(
        model_uri, str(work / "pred"), dataset=loop.trainer.spec, store=store, segmenter=seg
    )
    result = evaluate(
        model_uri,
        storage=storage,
        segmenter=seg,
        predictions=pred.out,
        out=str(work / "eval"),
        max_overlays=0,
    )
    print(
        f"  served label maps of '{loop.name}' (original grid, {seg.cfg.infer.nesting} nesting): "
        f"mean Dice {result.dice_mean:.3f} "
        + " ".join(f"{k} {v:.3f}" for k, v in result.dice.items()),
        flush=True,
    )


#: What one GPU consumes: NVIDIA DeepLearningExamples, PyTorch/Segmentation/nnUNet/README.md,
#: "Training performance: NVIDIA DGX A100 (8x A100 80GB)": 3D U-Net on BraTS (MSD Task01),
#: 4×128×128×128 patches, batch 4 per GPU, mixed precision, 1 GPU: 9.52 volumes/s.
GPU_SAMPLES_PER_SECOND = 9.52


def feed(n_cases: int, work: Path, batches: int, rois: list[tuple[int, int, int]]) -> None:
    """What the training loader feeds per second at full size (4×240×240×155 cases)."""
    from medseg.config import TrainConfig
    from medseg.training.train import train_loader

    raw, store = work / "raw-full", str(work / "store-full")
    write_dataset(raw, "brats2021", n_cases, shape=(240, 240, 155), seed=7)
    cfg = MedsegConfig.model_validate({"split": {"val_fraction": 0.0}})
    storage = Storage()
    spec = str(ingest(str(raw), "full", store, storage=storage, split=cfg.split).ref)
    preprocess(spec, store, cfg.data, storage=storage, progress=False, workers=2)
    prefix = preprocessed_prefix(DatasetRef.resolve(storage, store, spec), cfg.data)
    print(
        f"(c) loader feed at full size: {n_cases} cases 4x240x240x155, {batches} batches of 1 "
        f"after a warm-up pass; {_load()}",
        flush=True,
    )
    for roi in rois:
        for workers in (0, 2):
            for fg in (0.0, 0.5):
                t = TrainConfig(roi_size=roi, num_workers=workers, foreground_crops=fg)
                loader, _ = train_loader(prefix, t, storage.settings)
                for _ in loader:  # warm-up: cache fill, worker start
                    pass
                n, started = 0, time.perf_counter()
                while n < batches:
                    for batch in loader:
                        n += len(batch["image"])
                rate = n / (time.perf_counter() - started)
                print(
                    f"  ROI {'x'.join(map(str, roi)):<11} workers {workers}  foreground crops "
                    f"{fg:.1f}: {rate:6.2f} samples/s  "
                    f"({rate / GPU_SAMPLES_PER_SECOND:.2f}x one A100's "
                    f"{GPU_SAMPLES_PER_SECOND} samples/s)",
                    flush=True,
                )
                del loader
    print(
        "  GPU figure: NVIDIA DeepLearningExamples nnU-Net README, 1x A100 80GB, 3D, batch 4, "
        "AMP, 128^3 patches (not measured here: no GPU)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--levers",
        nargs="*",
        default=[name for name in LEVERS if name != "compile"],
        choices=list(LEVERS),
        help="(a)'s levers; compile is left out by default (minutes of compiling on a CPU).",
    )
    parser.add_argument("--epochs", type=int, default=2, help="(a): timed epochs per loop.")
    parser.add_argument(
        "--seconds", type=float, default=150, help="(b): training budget per loop; 0 skips (b)."
    )
    parser.add_argument(
        "--combo",
        nargs="*",
        default=["foreground", "constant_lr"],
        choices=list(LEVERS),
        help="(b): the combination of levers raced against the baseline and medseg's default.",
    )
    parser.add_argument(
        "--converge-levers", action="store_true", help="(b): also each learning lever alone."
    )
    parser.add_argument("--val-every", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.90, help="(b): validation mean Dice.")
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument(
        "--seed", type=int, default=0, help="Training seed of every loop (weights, crops, order)."
    )
    parser.add_argument(
        "--full-size", type=int, default=2, help="(c): full-size cases for the feed; 0 skips."
    )
    parser.add_argument("--feed-batches", type=int, default=8)
    parser.add_argument(
        "--feed-roi",
        type=int,
        nargs=3,
        action="append",
        help="(c): crop size (repeatable); default 96 96 64 (medseg's) and 128 128 128.",
    )
    args = parser.parse_args()
    SEED[0] = args.seed
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ["MEDSEG_CACHE_DIR"] = str(tmp / "cache")
        os.environ["MEDSEG_ENV_FILE"] = str(tmp / "none.env")
        store, raw = str(tmp / "store"), tmp / "raw"
        write_dataset(raw, "brats2021", args.cases, shape=DEMO_SHAPE)
        cfg = demo_config()
        storage = Storage()
        spec = str(ingest(str(raw), "demo", store, storage=storage, split=cfg.split).ref)
        preprocess(spec, store, cfg.data, storage=storage, progress=False, workers=2)
        train_ids = set(DatasetRef.resolve(storage, store, spec).load(storage).split_ids("train"))
        files = tutorial_files(raw, train_ids)
        ref = DatasetRef.resolve(storage, store, spec)
        val = PreprocessedDataset(preprocessed_prefix(ref, cfg.data), "validation")
        print(
            f"demo data: {args.cases} cases {list(DEMO_SHAPE)} ({len(files)} train, {len(val)} "
            f"validation), SegResNet init_filters {cfg.model.init_filters}, batch "
            f"{cfg.train.batch_size}, ROI {list(cfg.train.roi_size)}, lr {cfg.train.lr}",
            flush=True,
        )
        if args.levers is not None and args.epochs > 0:
            throughput(spec, store, files, val, args.levers, args.epochs)
        if args.seconds > 0:
            runs = {"medseg (default)": [], "medseg + " + "+".join(args.combo): args.combo}
            if args.converge_levers:
                runs.update({f"medseg + {name}": [name] for name in LEARNING})
            fastest = converge(
                spec, store, files, val, runs, args.seconds, args.val_every, args.target
            )
            if fastest is not None:
                score_served(fastest, store, tmp)
        if args.full_size > 0:
            rois = [tuple(r) for r in args.feed_roi or [(96, 96, 64), (128, 128, 128)]]
            feed(args.full_size, tmp, args.feed_batches, rois)
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
