"""Classification metrics of the skin-lesion task: pure functions of probabilities and labels.

Inputs are ``probabilities`` ``[N, C]`` (rows are a softmax: each sums to 1) and integer
``labels`` ``[N]`` in ``[0, C)``, as numpy arrays or torch tensors. The class axis is the task's
class order (:data:`medseg.tasks.skin_classes.CLASSES`).

* **ROC AUC** per class, one class against the rest, by MONAI's ``compute_roc_auc`` (ties count
  one half); the **macro AUC** is their unweighted mean. A class with no positive or no negative
  example has no AUC (NaN), and the macro AUC is the mean over the classes that have one.
* **Balanced multi-class accuracy**, the ISIC 2018 Task 3 challenge metric: the mean over the
  classes present in ``labels`` of each class's recall (sensitivity), so that every class
  weighs the same however rare it is.
* **Sensitivity and specificity** per class, one against the rest, from the confusion matrix
  (rows: true class, columns: predicted class = the arg-max of the probabilities).
* **Calibration** of the top-label confidence (the largest probability): ``bins`` equal-width
  bins ``(k/bins, (k+1)/bins]`` (the first includes 0), each with its count, mean confidence
  and accuracy (the reliability diagram), and the expected calibration error
  ``ECE = Σ_b n_b / N · |accuracy_b − confidence_b|`` (Guo et al., 2017).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from numpy.typing import NDArray

from medseg.core.errors import InvalidInput

__all__ = [
    "ClassificationMetrics",
    "Reliability",
    "balanced_accuracy",
    "classification_metrics",
    "confusion_matrix",
    "reliability",
    "roc_auc",
    "sensitivity_specificity",
]


def _as_numpy(value: Any) -> NDArray[Any]:
    if isinstance(value, torch.Tensor):
        return np.asarray(value.detach().cpu().numpy())
    return np.asarray(value)


def _checked(probabilities: Any, labels: Any) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Probabilities ``[N, C]`` (float64) and labels ``[N]`` (int64), validated.

    Raises:
        InvalidInput: For shapes that do not match, non-finite probabilities, or labels that are
            not class indices.
    """
    probs = _as_numpy(probabilities).astype(np.float64)
    raw = _as_numpy(labels)
    if probs.ndim != 2 or probs.shape[0] < 1 or probs.shape[1] < 2:
        raise InvalidInput(f"probabilities must be [N, C] with N ≥ 1, C ≥ 2; got {probs.shape}")
    if raw.shape != (probs.shape[0],):
        raise InvalidInput(f"labels must be [N] = [{probs.shape[0]}]; got {raw.shape}")
    if not np.isfinite(probs).all():
        raise InvalidInput("probabilities hold NaN or Inf")
    if raw.dtype.kind not in "iu" or raw.min() < 0 or raw.max() >= probs.shape[1]:
        raise InvalidInput(f"labels must be class indices in [0, {probs.shape[1]})")
    return probs, raw.astype(np.int64)


def roc_auc(probabilities: Any, labels: Any) -> tuple[list[float], float]:
    """Per-class ROC AUC (one against the rest) and their macro mean, by MONAI.

    Returns:
        The AUC of each class (NaN where the class has no positive or no negative example) and
        the mean over the classes that have one (NaN if none does).
    """
    probs, y = _checked(probabilities, labels)
    n_classes = probs.shape[1]
    onehot = np.eye(n_classes, dtype=np.int64)[y]
    positives = onehot.sum(axis=0)
    defined = [c for c in range(n_classes) if 0 < positives[c] < len(y)]
    per_class = [math.nan] * n_classes
    if defined:
        values = compute_roc_auc(
            torch.from_numpy(probs[:, defined]), torch.from_numpy(onehot[:, defined]), "none"
        )
        for c, value in zip(
            defined, np.atleast_1d(np.asarray(values, dtype=np.float64)), strict=True
        ):
            per_class[c] = float(value)
    macro = float(np.mean([per_class[c] for c in defined])) if defined else math.nan
    return per_class, macro


def confusion_matrix(probabilities: Any, labels: Any) -> NDArray[np.int64]:
    """Counts ``[C, C]``: row = true class, column = predicted class (the arg-max)."""
    probs, y = _checked(probabilities, labels)
    n_classes = probs.shape[1]
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (y, probs.argmax(axis=1)), 1)
    return counts


def sensitivity_specificity(confusion: NDArray[np.int64]) -> tuple[list[float], list[float]]:
    """Per-class sensitivity ``TP/(TP+FN)`` and specificity ``TN/(TN+FP)`` (NaN when undefined)."""
    cm = np.asarray(confusion, dtype=np.float64)
    total = cm.sum()
    tp = np.diag(cm)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    tn = total - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = tp / (tp + fn)
        spec = tn / (tn + fp)
    return [float(s) for s in sens], [float(s) for s in spec]


def balanced_accuracy(confusion: NDArray[np.int64]) -> float:
    """Mean recall over the classes present in the truth (the ISIC 2018 Task 3 metric)."""
    cm = np.asarray(confusion, dtype=np.float64)
    support = cm.sum(axis=1)
    present = support > 0
    return float((np.diag(cm)[present] / support[present]).mean())


@dataclass(frozen=True)
class Reliability:
    """The reliability diagram of the top-label confidence, and its ECE.

    Attributes:
        edges: Bin edges, ``bins + 1`` values from 0 to 1.
        counts: Examples per bin.
        confidence: Mean confidence per bin (NaN for an empty bin).
        accuracy: Fraction predicted right per bin (NaN for an empty bin).
        ece: Expected calibration error.
    """

    edges: list[float]
    counts: list[int]
    confidence: list[float]
    accuracy: list[float]
    ece: float


def reliability(probabilities: Any, labels: Any, bins: int = 10) -> Reliability:
    """Bin the top-label confidence; each bin's accuracy and confidence, and the ECE.

    Raises:
        InvalidInput: If ``bins`` is below 1 (or the inputs are malformed).
    """
    if bins < 1:
        raise InvalidInput(f"bins must be at least 1, got {bins}")
    probs, y = _checked(probabilities, labels)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    # Bin k holds (k/bins, (k+1)/bins]: index ceil(conf·bins) − 1, with 0 in the first bin.
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=bins)
    right = np.bincount(index, weights=correct, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = conf_sum / counts
        accuracy = right / counts
    gaps = np.abs(right - conf_sum)  # n_b · |acc_b − conf_b|
    return Reliability(
        edges=[k / bins for k in range(bins + 1)],
        counts=[int(c) for c in counts],
        confidence=[float(c) for c in mean_conf],
        accuracy=[float(a) for a in accuracy],
        ece=float(gaps.sum() / len(y)),
    )


@dataclass(frozen=True)
class ClassificationMetrics:
    """Every metric of one evaluation, per class in the task's class order.

    Attributes:
        classes: The class names.
        auc: ROC AUC per class (NaN where undefined).
        macro_auc: Their mean over the defined ones.
        balanced_accuracy: Mean recall over the classes present.
        accuracy: Fraction of examples whose arg-max is their class.
        sensitivity: Recall per class.
        specificity: Specificity per class.
        confusion: ``[C, C]`` counts, rows true, columns predicted.
        calibration: The reliability diagram and ECE.
    """

    classes: tuple[str, ...]
    auc: list[float]
    macro_auc: float
    balanced_accuracy: float
    accuracy: float
    sensitivity: list[float]
    specificity: list[float]
    confusion: list[list[int]]
    calibration: Reliability


def classification_metrics(
    probabilities: Any, labels: Any, classes: Sequence[str], bins: int = 10
) -> ClassificationMetrics:
    """All the metrics of the task for one set of predictions.

    Args:
        probabilities: ``[N, C]`` softmax outputs.
        labels: ``[N]`` true class indices.
        classes: The ``C`` class names, in the class axis's order.
        bins: Calibration bins.

    Raises:
        InvalidInput: For malformed inputs, or ``classes`` not matching the class axis.
    """
    probs, y = _checked(probabilities, labels)
    if len(classes) != probs.shape[1]:
        raise InvalidInput(f"{len(classes)} class names for {probs.shape[1]} probability columns")
    per_class, macro = roc_auc(probs, y)
    cm = confusion_matrix(probs, y)
    sens, spec = sensitivity_specificity(cm)
    return ClassificationMetrics(
        classes=tuple(classes),
        auc=per_class,
        macro_auc=macro,
        balanced_accuracy=balanced_accuracy(cm),
        accuracy=float(np.trace(cm) / cm.sum()),
        sensitivity=sens,
        specificity=spec,
        confusion=cm.tolist(),
        calibration=reliability(probs, y, bins),
    )
