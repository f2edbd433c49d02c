"""Evaluate a model the way the challenge scores it: the served label maps on the original grid.

Evaluation never scores an intermediate tensor. It scores the label maps that batch prediction
(:mod:`medseg.inference.predict`, through :func:`medseg.inference.infer.segment_case`, the server's
function) wrote for the split's raw cases, against the cases' original ground-truth label maps. It
only scores: its caller runs the prediction first (``medseg evaluate`` without ``--predictions``
does). What it scores:

* regions come from the label maps by the dataset's label convention (BraTS ≤2021: WT = {1,2,4},
  TC = {1,4}, ET = {4}; BraTS 2023+: WT = {1,2,3}, TC = {1,3}, ET = {3}; MSD Task01: WT = {1,2,3},
  TC = {2,3}, ET = {3}; see :mod:`medseg.tasks.labels`);
* Dice per region on the binary region masks, on each case's own voxel grid (the prediction must
  lie on the ground truth's grid);
* HD95 in mm from that grid's voxel spacing, as the BraTS scorer defines it (:func:`hd95`: the
  95th percentile of both directed surface-distance sets pooled, not MONAI's larger of the two
  directed percentiles).

Empty-region conventions (those of the BraTS challenge scorer), stated in every report:

* ground truth and prediction both empty: Dice 1, HD95 0;
* exactly one of them empty: Dice 0, HD95 :data:`HD95_EMPTY` (373.13 mm, the diagonal of the
  240×240×155 mm BraTS volume).

A case without a prediction (its prediction failed) is scored as an empty label map.

Outputs under ``OUT`` (by default the run's ``eval/`` next to its ``model/``): ``metrics.json``
(definition, per case, means, gate), ``cases.csv`` (per case), ``report.html`` (self-contained)
and ``overlays/CASE.png``, all from the same label maps.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from medseg.artifact.files import TrainedOn, trained_on
from medseg.config import MedsegConfig
from medseg.core.errors import MedsegError, ObjectNotFound
from medseg.core.storage import Storage, join
from medseg.data.manifest import CaseEntry, DatasetRef
from medseg.inference.classify import (
    ClassEval,
    evaluate_classes,
    metrics_head,
    passes_gate,
    read_predictions,
)
from medseg.inference.infer import Segmenter, load_model, read_config
from medseg.inference.predict import CaseInput, load_case, model_output_uri
from medseg.io.nifti import Volume, decode
from medseg.io.report import write_report
from medseg.registry.tracking import log_evaluation
from medseg.tasks import CaseScore, Task, default_task, get_convention, task_of
from medseg.tasks.segmentation import HD95_DEFINITION, HD95_EMPTY, hd95

__all__ = [
    "HD95_DEFINITION",
    "HD95_EMPTY",
    "CaseScore",
    "EvalResult",
    "Evaluation",
    "evaluate",
    "hd95",
    "score_case",
    "score_label_maps",
]

_GRID_TOL_MM = 1e-3


class Evaluation(Protocol):
    """What every task's evaluation answers: the gate, the summary scores, where it wrote."""

    model: str
    dataset: str
    split: str
    out: str
    threshold: float | None
    passed: bool
    gate_metric: str
    definition: str

    @property
    def value(self) -> float:
        """The validation value of :attr:`gate_metric`."""
        ...

    def summary(self) -> dict[str, float]:
        """The summary scores by name, as KFP and MLflow log them (the gate metric among them)."""
        ...

    def table(self) -> dict[str, list[str]]:
        """The evaluation's table by column (per case, or per class)."""
        ...

    def to_json(self) -> dict[str, Any]:
        """The ``metrics.json`` document."""
        ...


@dataclass
class EvalResult:
    """What an evaluation measured and where it wrote it.

    ``dice_mean`` is the value of the task's quality-gate metric ``gate_metric``; ``conventions``
    states how the task scores (:meth:`medseg.tasks.Task.metric_conventions`).
    """

    model: str
    dataset: str
    split: str
    cases: list[CaseScore]
    dice: dict[str, float]
    hd95: dict[str, float]
    dice_mean: float
    threshold: float | None
    passed: bool
    out: str = ""
    definition: str = ""
    predictions: str = ""
    missing: list[str] = field(default_factory=list)
    seconds_per_case: float = 0.0
    overlays: list[str] = field(default_factory=list)
    conventions: str = ""
    gate_metric: str = "dice_mean"

    @property
    def value(self) -> float:
        """The validation value of the gate metric (the mean Dice over the regions)."""
        return self.dice_mean

    def summary(self) -> dict[str, float]:
        """``dice_tc``, …, ``hd95_tc_mm``, …, and the gate metric (``dice_mean``)."""
        scores = {f"dice_{r.lower()}": v for r, v in self.dice.items()}
        scores |= {f"hd95_{r.lower()}_mm": v for r, v in self.hd95.items()}
        scores[self.gate_metric] = self.dice_mean
        return scores

    def table(self) -> dict[str, list[str]]:
        """:meth:`cases_csv` by column."""
        rows = list(csv.DictReader(io.StringIO(self.cases_csv())))
        return {key: [row[key] for row in rows] for key in (rows[0] if rows else {})}

    def to_json(self) -> dict[str, Any]:
        """The ``metrics.json`` document."""
        return metrics_head(self) | {
            "conventions": self.conventions,
            "dice": self.dice,
            "hd95": self.hd95,
            "hd95_definition": HD95_DEFINITION,
            "cases": [asdict(c) | {"dice_mean": c.dice_mean} for c in self.cases],
        }

    def cases_csv(self) -> str:
        """The per-case table (``cases.csv``), worst mean Dice first."""
        buf = io.StringIO()
        regions = list(self.dice)
        fields = ["case", "dice_mean"]
        fields += [f"dice_{r}" for r in regions] + [f"hd95_{r}_mm" for r in regions]
        fields += [f"voxels_true_{r}" for r in regions] + [f"voxels_pred_{r}" for r in regions]
        writer = csv.writer(buf)
        writer.writerow(fields)
        for c in self.cases:
            writer.writerow(
                [c.case_id, f"{c.dice_mean:.6f}"]
                + [f"{c.dice[r]:.6f}" for r in regions]
                + [f"{c.hd95[r]:.4f}" for r in regions]
                + [c.voxels_true[r] for r in regions]
                + [c.voxels_pred[r] for r in regions]
            )
        return buf.getvalue()


def score_case(
    case_id: str,
    pred: torch.Tensor,
    truth: torch.Tensor,
    spacing: tuple[float, ...],
    task: Task | None = None,
) -> CaseScore:
    """The task's scores of one case's masks (BraTS: Dice and HD95 per region, TC, WT, ET).

    Args:
        case_id: Names the case.
        pred: Predicted masks ``[n_outputs, ...spatial]``.
        truth: Ground-truth masks on the same grid.
        spacing: Voxel size along each axis of that grid, in mm.
        task: Whose metric; by default the task of a config that names none.
    """
    return (task or default_task()).score_case(case_id, pred, truth, spacing)


def score_label_maps(
    case_id: str,
    pred: np.ndarray,
    pred_convention: str,
    truth: np.ndarray,
    truth_convention: str,
    spacing: tuple[float, ...],
    task: Task | None = None,
) -> CaseScore:
    """Score a predicted label map against a ground-truth one on the same grid.

    The task's outputs (BraTS: TC, WT, ET) are taken from each label map by its own convention;
    see :func:`score_case` for the metrics.
    """
    p = get_convention(pred_convention).to_regions(pred)
    t = get_convention(truth_convention).to_regions(truth)
    return score_case(case_id, torch.from_numpy(p), torch.from_numpy(t), spacing, task)


@dataclass
class _Target:
    """What an evaluation scores against: the dataset split, and the run to log to."""

    ref: DatasetRef
    store: str
    run_id: str | None


def _target(storage: Storage, model_uri: str, dataset: str | None, store: str | None) -> _Target:
    """The dataset (by default the model's training dataset) and the model's training run.

    The run is known only when the dataset is the model's (``dataset`` or ``store`` omitted).
    """
    trained = (
        trained_on(model_uri, storage)
        if dataset is None or store is None
        else TrainedOn("", "", None)
    )
    store = store or trained.store
    ref = DatasetRef.resolve(storage, store, dataset or trained.dataset)
    return _Target(ref, store, trained.run_id)


def _label_volume(storage: Storage, uri: str, what: str) -> Volume:
    try:
        vol = decode(storage.get_bytes(uri), what, dtype=None)
    except ObjectNotFound:
        raise MedsegError(f"{what}: {uri} does not exist") from None
    data = vol.data
    if data.ndim != 3:
        raise MedsegError(f"{what}: {uri} has shape {data.shape}, expected a 3D label map")
    vol.data = (np.rint(data) if data.dtype.kind == "f" else data).astype(np.int16)
    return vol


@dataclass
class _Pair:
    truth: Volume
    pred: np.ndarray
    pred_convention: str


def _load_pair(
    storage: Storage, ref: DatasetRef, entry: CaseEntry, written: _SplitPredictions
) -> _Pair:
    """The case's original ground truth and its served label map (empty when it has none)."""
    label = entry.file("label")
    truth = _label_volume(
        storage, join(ref.prefix, label.key), f"case {entry.case_id} ground truth"
    )
    convention = written.index["label_convention"]
    key = written.keys.get(entry.case_id)
    if key is None:
        return _Pair(truth, np.zeros_like(truth.data), convention)
    where = join(written.uri, key)
    pred = _label_volume(storage, where, f"case {entry.case_id} prediction {key}")
    if pred.data.shape != truth.data.shape or not np.allclose(
        pred.affine, truth.affine, atol=_GRID_TOL_MM
    ):
        raise MedsegError(
            f"case {entry.case_id}: prediction {key} is not on the ground truth's grid "
            f"(shape {list(pred.data.shape)} vs {list(truth.data.shape)}, affine "
            f"{pred.affine.round(3).tolist()} vs {truth.affine.round(3).tolist()})"
        )
    return _Pair(truth, pred.data, convention)


def evaluate(
    model_uri: str,
    predictions: str,
    dataset: str | None = None,
    store: str | None = None,
    split: str = "validation",
    threshold: float | None = None,
    out: str | None = None,
    storage: Storage | None = None,
    max_overlays: int = 6,
    segmenter: Segmenter | None = None,
) -> EvalResult | ClassEval:
    """Score a model's served answers on a dataset split; write metrics, report, pictures.

    Pure scoring: the caller runs ``medseg predict`` (:func:`medseg.inference.predict.predict`)
    first. A segmentation task's label maps are scored here, a classifier's probabilities by
    :func:`medseg.inference.classify.evaluate_classes` (with ``threshold`` on its macro AUC); either
    is logged to its training run's MLflow run.

    Args:
        model_uri: A model artifact (see :mod:`medseg.artifact.files`).
        predictions: Output of ``medseg predict`` for this split (``predictions.json``).
        dataset: ``NAME@VERSION``; by default the dataset the model was trained on.
        store: The store holding ``dataset``; by default the model's training store.
        split: ``validation``, ``train`` or ``all``.
        threshold: Quality gate on the task's gate metric (BraTS: the mean Dice over the
            regions; classifiers: macro ROC AUC); ``None``: no gate.
        out: Where to write; by default ``runs/ID/eval`` (or ``MODEL/eval``).
        storage: Storage to use; from the environment when omitted.
        max_overlays: Overlay images for at most this many cases, the worst first.
        segmenter: An already loaded model (``model_uri`` then only names it).

    Raises:
        MedsegError: If the model, the dataset or the predictions are missing or do not belong
            together, a prediction is not on its ground truth's grid, or the split is empty.
    """
    storage = storage or Storage()
    cfg = segmenter.cfg if segmenter is not None else read_config(model_uri, storage)
    target = _target(storage, model_uri, dataset, store)
    out = out or model_output_uri(model_uri, "eval")
    result: EvalResult | ClassEval
    if task_of(cfg).outputs.kind == "classes":  # the model draws the report's mistakes
        seg = segmenter or load_model(model_uri, storage)
        result = evaluate_classes(
            seg, model_uri, target.ref, split, predictions, out, storage, threshold
        )
    else:
        result = _score_segmentation(
            storage, model_uri, cfg, target, split, predictions, out, threshold, max_overlays
        )
    if target.run_id is not None:
        _track(storage, target.store, target.run_id, result)
    return result


def _score_segmentation(
    storage: Storage,
    model_uri: str,
    cfg: MedsegConfig,
    target: _Target,
    split: str,
    predictions: str,
    out: str,
    threshold: float | None,
    max_overlays: int,
) -> EvalResult:
    """Score the label maps written for the split; write the overlays, tables and report."""
    task = task_of(cfg)
    manifest = target.ref.load(storage)
    entries = [c for c in manifest.cases if split == "all" or c.split == split]
    if not entries:
        raise MedsegError(f"dataset {target.ref} has no cases in split {split!r}")
    written = _SplitPredictions.read(storage, predictions, target.ref, split)
    started = time.perf_counter()
    cases = [
        _score_entry(storage, target.ref, e, written, manifest.convention, task) for e in entries
    ]
    cases.sort(key=lambda c: c.dice_mean)
    result = _result(model_uri, target.ref, split, cases, threshold, task, manifest.convention)
    result.seconds_per_case = (time.perf_counter() - started) / len(entries)
    result.out, result.predictions = out, predictions
    result.missing = sorted(c.case_id for c in entries if c.case_id not in written.keys)
    by_id = {e.case_id: e for e in entries}
    images = {
        c.case_id: _overlay(
            storage, target.ref, by_id[c.case_id], written, manifest.convention, cfg
        )
        for c in cases[:max_overlays]
    }
    _write_outputs(storage, result, images, _history(storage, target))
    return result


def _write_outputs(
    storage: Storage, result: EvalResult, images: dict[str, bytes], history: list[dict[str, Any]]
) -> None:
    """Write the overlays, ``cases.csv``, ``report.html`` and, last, ``metrics.json``."""
    for case_id, png in images.items():
        uri = join(result.out, "overlays", f"{case_id}.png")
        storage.put_bytes(uri, png)
        result.overlays.append(uri)
    storage.put_bytes(join(result.out, "cases.csv"), result.cases_csv().encode())
    page = write_report(result, images, history)
    storage.put_bytes(join(result.out, "report.html"), page.encode())
    storage.put_json(join(result.out, "metrics.json"), result.to_json())


@dataclass
class _SplitPredictions:
    """A split's written predictions: the prefix, its index and each case's label map key."""

    uri: str
    index: dict[str, Any]
    keys: dict[str, str]

    @classmethod
    def read(cls, storage: Storage, uri: str, ref: DatasetRef, split: str) -> _SplitPredictions:
        """The predictions at ``uri``, which must be those of ``ref``'s ``split``.

        Raises:
            MedsegError: If ``uri`` holds no predictions, or those of another split.
        """
        index = read_predictions(storage, uri, str(ref), split)
        return cls(uri, index, {c["case_id"]: c["key"] for c in index["cases"]})


def _score_entry(
    storage: Storage,
    ref: DatasetRef,
    entry: CaseEntry,
    split: _SplitPredictions,
    convention: str,
    task: Task,
) -> CaseScore:
    """One case's scores, from its written label map and its original ground truth."""
    pair = _load_pair(storage, ref, entry, split)
    return score_label_maps(
        entry.case_id,
        pair.pred,
        pair.pred_convention,
        pair.truth.data,
        convention,
        pair.truth.zooms,
        task,
    )


def _result(
    model_uri: str,
    ref: DatasetRef,
    split: str,
    cases: list[CaseScore],
    threshold: float | None,
    task: Task,
    convention: str,
) -> EvalResult:
    """The means over ``cases`` (worst first), the gate, and the task's definitions."""
    regions = task.outputs.names
    mean_dice = {r: float(np.mean([c.dice[r] for c in cases])) for r in regions}
    mean_hd = {r: float(np.mean([c.hd95[r] for c in cases])) for r in regions}
    dice_mean = sum(mean_dice.values()) / len(mean_dice)
    return EvalResult(
        model=model_uri,
        dataset=str(ref),
        split=split,
        cases=cases,
        dice=mean_dice,
        hd95=mean_hd,
        dice_mean=dice_mean,
        threshold=threshold,
        passed=passes_gate(dice_mean, threshold),
        definition=task.metric_definition(convention),
        conventions=task.metric_conventions(),
        gate_metric=task.gate_metric,
    )


def _overlay(
    storage: Storage,
    ref: DatasetRef,
    entry: CaseEntry,
    split: _SplitPredictions,
    convention: str,
    cfg: MedsegConfig,
) -> bytes:
    """The task's picture of one case: its image, its truth and its prediction.

    The files are read again: only the worst few cases are drawn, so scoring holds no volumes.
    """
    pair = _load_pair(storage, ref, entry, split)
    raw = CaseInput(
        entry.case_id,
        {f.role: join(ref.prefix, f.key) for f in entry.files},
        dict(entry.channel_index),
    )
    image, _ = load_case(storage, raw, cfg.data.channels)
    return task_of(cfg).overlay_png(
        entry.case_id,
        image,
        cfg.data.channels,
        get_convention(convention).to_regions(pair.truth.data),
        get_convention(pair.pred_convention).to_regions(pair.pred),
    )


def _history(storage: Storage, target: _Target) -> list[dict[str, Any]]:
    """The training run's epoch log (``metrics.jsonl``) for the report's curves; [] if none."""
    if target.run_id is None:
        return []
    try:
        raw = storage.get_bytes(join(target.store, "runs", target.run_id, "metrics.jsonl"))
    except ObjectNotFound:
        return []
    return [json.loads(line) for line in raw.decode().splitlines() if line]


def _track(storage: Storage, store: str, run_id: str, result: Evaluation) -> None:
    """Log the evaluation to its training run's MLflow run (with ``MLFLOW_TRACKING_URI``)."""
    artifacts = {
        "report.html": storage.get_bytes(join(result.out, "report.html")),
        "metrics.json": json.dumps(result.to_json(), indent=1).encode(),
    }
    log_evaluation(
        storage, store, run_id, result.split, result.summary(), result.table(), artifacts
    )
