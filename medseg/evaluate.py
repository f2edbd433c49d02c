"""Evaluate a trained model on a dataset split: Dice and HD95 per region, a gate, a report.

Sliding-window inference (ROI, overlap and threshold from the model's ``model.yaml``) on the
preprocessed cases of the split, scored with MONAI's ``DiceMetric`` and
``HausdorffDistanceMetric`` (95th percentile, in mm at the preprocessed spacing).

Empty-region conventions (those of the BraTS challenge scorer), stated in every report:

* ground truth and prediction both empty: Dice 1, HD95 0;
* exactly one of them empty: Dice 0, HD95 :data:`HD95_EMPTY` (373.13 mm, the diagonal of the
  240×240×155 mm BraTS volume).

Outputs under ``OUT`` (by default the run's ``eval/`` next to its ``model/``):
``metrics.json`` (per case, means, gate), ``report.html`` (self-contained) and
``overlays/CASE.png``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from monai.metrics import DiceMetric
from monai.metrics.utils import get_mask_edges, get_surface_distance

from medseg.config import REGIONS
from medseg.dataset import PreprocessedDataset
from medseg.errors import MedsegError, ObjectNotFound
from medseg.infer import Segmenter, load_model
from medseg.manifest import DatasetRef
from medseg.preprocess import preprocessed_prefix
from medseg.storage import Storage, join

__all__ = ["HD95_EMPTY", "CaseScore", "EvalResult", "evaluate", "score_case"]

#: HD95 of a region empty in exactly one of ground truth and prediction, in mm.
HD95_EMPTY = 373.12866
CONVENTIONS = (
    "Dice and HD95 per region (TC, WT, ET) on binary masks at the model's threshold; HD95 in mm "
    "at the preprocessed spacing (MONAI HausdorffDistanceMetric, percentile 95). Ground truth and "
    "prediction both empty: Dice 1, HD95 0. Exactly one empty: Dice 0, HD95 "
    f"{HD95_EMPTY} (the BraTS scorer's cap). Means are over cases, then over regions."
)


@dataclass
class CaseScore:
    """Scores of one case, by region."""

    case_id: str
    dice: dict[str, float]
    hd95: dict[str, float]
    voxels_true: dict[str, int]
    voxels_pred: dict[str, int]

    @property
    def dice_mean(self) -> float:
        return sum(self.dice.values()) / len(self.dice)


@dataclass
class EvalResult:
    """What an evaluation measured and where it wrote it."""

    model: str
    dataset: str
    split: str
    cases: list[CaseScore]
    dice: dict[str, float]
    hd95: dict[str, float]
    dice_mean: float
    threshold: float | None
    passed: bool
    out: str
    overlays: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The ``metrics.json`` document."""
        return {
            "model": self.model,
            "dataset": self.dataset,
            "split": self.split,
            "conventions": CONVENTIONS,
            "dice": self.dice,
            "hd95": self.hd95,
            "dice_mean": self.dice_mean,
            "gate": {"threshold": self.threshold, "passed": self.passed},
            "cases": [asdict(c) | {"dice_mean": c.dice_mean} for c in self.cases],
        }


def hd95(pred: torch.Tensor, truth: torch.Tensor, spacing: tuple[float, ...]) -> float:
    """95th-percentile symmetric Hausdorff distance (mm) of two non-empty binary masks.

    What ``HausdorffDistanceMetric(percentile=95)`` computes, from the MONAI functions it is
    built on: in MONAI 1.6 the metric's own path calls ``get_mask_edges`` with a deprecated
    argument and emits a FutureWarning on every call (MONAI issue 9059).
    """
    edges_pred, edges_true = get_mask_edges(pred, truth, crop=True)
    distances = (
        get_surface_distance(edges_pred, edges_true, "euclidean", spacing),
        get_surface_distance(edges_true, edges_pred, "euclidean", spacing),
    )
    return max(float(torch.quantile(torch.as_tensor(d).float(), 0.95)) for d in distances)


def score_case(
    case_id: str, pred: torch.Tensor, truth: torch.Tensor, spacing: tuple[float, ...]
) -> CaseScore:
    """Dice and HD95 per region of binary masks ``[3, X, Y, Z]``, with the stated conventions."""
    p, t = pred.unsqueeze(0).float(), truth.unsqueeze(0).float()
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, t)
    assert isinstance(dice, torch.Tensor)
    scores = CaseScore(case_id, {}, {}, {}, {})
    for i, region in enumerate(REGIONS):
        n_true, n_pred = int(truth[i].sum()), int(pred[i].sum())
        scores.voxels_true[region], scores.voxels_pred[region] = n_true, n_pred
        scores.dice[region] = float(dice[0, i])
        if n_true == 0 and n_pred == 0:
            scores.hd95[region] = 0.0
        elif n_true == 0 or n_pred == 0:
            scores.hd95[region] = HD95_EMPTY
        else:
            scores.hd95[region] = min(hd95(pred[i], truth[i], spacing), HD95_EMPTY)
    return scores


def _model_dataset(storage: Storage, model_uri: str) -> tuple[str, str, str | None]:
    """(store, NAME@VERSION, run id) the model was trained on, from its lineage or card."""
    for name in ("lineage.json", "model_card.json"):
        try:
            doc = storage.get_json(join(model_uri, name))
        except ObjectNotFound:
            continue
        ds = doc["dataset"]
        return ds["store"], f"{ds['name']}@{ds['version']}", doc.get("run_id")
    raise MedsegError(
        f"{model_uri} has neither lineage.json nor model_card.json: pass the dataset explicitly"
    )


def _default_out(model_uri: str) -> str:
    base = model_uri.rstrip("/")
    return base[: -len("/model")] + "/eval" if base.endswith("/model") else join(base, "eval")


def evaluate(
    model_uri: str,
    dataset: str | None = None,
    store: str | None = None,
    split: str = "validation",
    threshold: float | None = None,
    out: str | None = None,
    storage: Storage | None = None,
    max_overlays: int = 6,
    segmenter: Segmenter | None = None,
) -> EvalResult:
    """Score ``model_uri`` on a dataset split and write metrics, overlays and the HTML report.

    Args:
        model_uri: A model artifact (see :mod:`medseg.infer`).
        dataset: ``NAME@VERSION``; by default the dataset the model was trained on.
        store: The store holding ``dataset``; by default the model's training store.
        split: ``validation``, ``train`` or ``all``.
        threshold: Quality gate on the mean Dice (over regions); ``None``: no gate.
        out: Where to write; by default ``runs/ID/eval`` (or ``MODEL/eval``).
        storage: Storage to use; from the environment when omitted.
        max_overlays: Overlay images for at most this many cases, the worst first.
        segmenter: An already loaded model (``model_uri`` then only names it).

    Raises:
        MedsegError: If the model, the dataset or its preprocessed cases are missing, or the
            split is empty.
    """
    from medseg.report import overlay_png, write_report

    storage = storage or Storage()
    seg = segmenter or load_model(model_uri, storage)
    trained_store, trained_on, run_id = (
        _model_dataset(storage, model_uri) if dataset is None or store is None else ("", "", None)
    )
    store = store or trained_store
    ref = DatasetRef.resolve(storage, store, dataset or trained_on)
    prefix = preprocessed_prefix(ref, seg.cfg.data)
    data = PreprocessedDataset(prefix, None if split == "all" else split, settings=storage.settings)
    if len(data) == 0:
        raise MedsegError(f"dataset {ref} has no cases in split {split!r}")
    out = out or _default_out(model_uri)

    cases: list[CaseScore] = []
    volumes: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for i in range(len(data)):
        item = data[i]
        pred = seg.segment(item["image"])
        truth = item["label"].to(torch.uint8)
        cases.append(score_case(item["case_id"], pred, truth, seg.cfg.data.spacing))
        volumes[item["case_id"]] = (
            item["image"][-1].float().numpy(),  # the last channel: FLAIR in canonical order
            truth.numpy(),
            pred.numpy(),
        )
    cases.sort(key=lambda c: c.dice_mean)
    mean_dice = {r: float(np.mean([c.dice[r] for c in cases])) for r in REGIONS}
    mean_hd = {r: float(np.mean([c.hd95[r] for c in cases])) for r in REGIONS}
    dice_mean = sum(mean_dice.values()) / len(mean_dice)
    passed = threshold is None or (not math.isnan(dice_mean) and dice_mean >= threshold)
    result = EvalResult(
        model=model_uri,
        dataset=str(ref),
        split=split,
        cases=cases,
        dice=mean_dice,
        hd95=mean_hd,
        dice_mean=dice_mean,
        threshold=threshold,
        passed=passed,
        out=out,
    )

    images: dict[str, bytes] = {}
    for case in cases[:max_overlays]:
        png = overlay_png(case.case_id, *volumes[case.case_id])
        images[case.case_id] = png
        uri = join(out, "overlays", f"{case.case_id}.png")
        storage.put_bytes(uri, png)
        result.overlays.append(uri)
    history: list[dict[str, Any]] = []
    if run_id is not None:
        try:
            text = storage.get_bytes(join(store, "runs", run_id, "metrics.jsonl")).decode()
            history = [json.loads(line) for line in text.splitlines() if line]
        except ObjectNotFound:
            history = []
    storage.put_json(join(out, "metrics.json"), result.to_json())
    storage.put_bytes(join(out, "report.html"), write_report(result, images, history).encode())
    return result
