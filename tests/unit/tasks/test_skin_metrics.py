"""Skin-lesion classification metrics against a case worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_roc_auc

from medseg.core.errors import InvalidInput
from medseg.tasks.skin_metrics import (
    balanced_accuracy,
    classification_metrics,
    confusion_matrix,
    reliability,
    roc_auc,
    sensitivity_specificity,
)

# Six examples, three classes (two of each). Arg-max and top confidence on the right.
PROBS = np.array(
    [
        [0.70, 0.20, 0.10],  # s0, true 0: predicted 0 (0.70)  right
        [0.45, 0.50, 0.05],  # s1, true 0: predicted 1 (0.50)  wrong
        [0.20, 0.65, 0.15],  # s2, true 1: predicted 1 (0.65)  right
        [0.10, 0.25, 0.65],  # s3, true 1: predicted 2 (0.65)  wrong
        [0.30, 0.05, 0.65],  # s4, true 2: predicted 2 (0.65)  right
        [0.10, 0.05, 0.85],  # s5, true 2: predicted 2 (0.85)  right
    ]
)
LABELS = np.array([0, 0, 1, 1, 2, 2])

# Confusion matrix (rows true, columns predicted):
#   true 0: s0 → 0, s1 → 1          [1, 1, 0]
#   true 1: s2 → 1, s3 → 2          [0, 1, 1]
#   true 2: s4 → 2, s5 → 2          [0, 0, 2]
CONFUSION = [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
# Sensitivity = TP / (TP + FN), per row: 1/2, 1/2, 2/2.
SENSITIVITY = [0.5, 0.5, 1.0]
# Specificity = TN / (TN + FP), over the four examples of the other classes:
#   class 0: none of s2..s5 is predicted 0                  4/4 = 1
#   class 1: s1 (true 0) is predicted 1                     3/4 = 0.75
#   class 2: s3 (true 1) is predicted 2                     3/4 = 0.75
SPECIFICITY = [1.0, 0.75, 0.75]
# Balanced accuracy = mean sensitivity = (0.5 + 0.5 + 1) / 3 = 2/3; plain accuracy = 4/6.
BALANCED = 2 / 3
# AUC, one class against the rest: the fraction of (positive, negative) pairs ranked right,
# a tie counting one half; 2 positives × 4 negatives = 8 pairs per class.
#   class 0: positives 0.70, 0.45; negatives 0.20, 0.10, 0.30, 0.10: all 8 right  → 8/8 = 1
#   class 1: positives 0.65, 0.25; negatives 0.20, 0.50, 0.05, 0.05:
#            0.65 beats all 4; 0.25 beats 0.20, 0.05, 0.05 but not 0.50           → 7/8 = 0.875
#   class 2: positives 0.65, 0.85; negatives 0.10, 0.05, 0.15, 0.65:
#            0.85 beats all 4; 0.65 beats three and ties 0.65 (s3): 3.5           → 7.5/8 = 0.9375
AUC = [1.0, 0.875, 0.9375]
# Macro AUC = (1 + 0.875 + 0.9375) / 3 = 2.8125 / 3 = 0.9375.
MACRO_AUC = 0.9375
# Calibration with 5 bins (0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1]:
#   (.4, .6]: s1 (0.50, wrong)                      n 1, confidence 0.5,    accuracy 0
#   (.6, .8]: s0 0.70, s2 0.65, s3 0.65, s4 0.65     n 4, confidence 2.65/4 = 0.6625, accuracy 3/4
#   (.8, 1]:  s5 (0.85, right)                      n 1, confidence 0.85,   accuracy 1
# ECE = (1·|0 − 0.5| + 4·|0.75 − 0.6625| + 1·|1 − 0.85|) / 6 = (0.5 + 0.35 + 0.15) / 6 = 1/6
COUNTS = [0, 0, 1, 4, 1]
CONFIDENCE = [math.nan, math.nan, 0.5, 0.6625, 0.85]
ACCURACY = [math.nan, math.nan, 0.0, 0.75, 1.0]
ECE = 1 / 6


def _close(a: list[float], b: list[float]) -> bool:
    return bool(np.allclose(a, b, equal_nan=True))


def test_hand_computed_case() -> None:
    cm = confusion_matrix(PROBS, LABELS)
    assert cm.tolist() == CONFUSION
    sens, spec = sensitivity_specificity(cm)
    assert _close(sens, SENSITIVITY) and _close(spec, SPECIFICITY)
    assert balanced_accuracy(cm) == pytest.approx(BALANCED)
    per_class, macro = roc_auc(PROBS, LABELS)
    assert _close(per_class, AUC) and macro == pytest.approx(MACRO_AUC)
    rel = reliability(PROBS, LABELS, bins=5)
    assert rel.edges == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert rel.counts == COUNTS
    assert _close(rel.confidence, CONFIDENCE) and _close(rel.accuracy, ACCURACY)
    assert rel.ece == pytest.approx(ECE)


def test_all_metrics_at_once_and_from_torch() -> None:
    m = classification_metrics(torch.tensor(PROBS), torch.tensor(LABELS), ("a", "b", "c"), bins=5)
    assert m.classes == ("a", "b", "c") and m.confusion == CONFUSION
    assert _close(m.auc, AUC) and m.macro_auc == pytest.approx(MACRO_AUC)
    assert m.balanced_accuracy == pytest.approx(BALANCED) and m.accuracy == pytest.approx(4 / 6)
    assert _close(m.sensitivity, SENSITIVITY) and _close(m.specificity, SPECIFICITY)
    assert m.calibration.ece == pytest.approx(ECE)


def test_macro_auc_is_monais_macro_when_every_class_is_present() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 7))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 7, 200)
    monai = compute_roc_auc(
        torch.from_numpy(probs), torch.from_numpy(np.eye(7, dtype=np.int64)[labels]), "macro"
    )
    assert roc_auc(probs, labels)[1] == pytest.approx(float(monai))


def test_a_class_absent_from_the_truth_has_no_auc_and_no_recall() -> None:
    # Class 2 never occurs: no AUC (no positive), no sensitivity; the means skip it.
    probs = PROBS[:4]
    labels = LABELS[:4]
    per_class, macro = roc_auc(probs, labels)
    assert math.isnan(per_class[2]) and macro == pytest.approx(np.mean(per_class[:2]))
    cm = confusion_matrix(probs, labels)
    assert balanced_accuracy(cm) == pytest.approx(0.5)  # (1/2 + 1/2) / 2
    sens, _ = sensitivity_specificity(cm)
    assert math.isnan(sens[2])


@pytest.mark.parametrize(
    ("probs", "labels", "message"),
    [
        (PROBS[:, 0], LABELS, r"probabilities must be \[N, C\]"),
        (PROBS, LABELS[:5], r"labels must be \[N\] = \[6\]"),
        (PROBS, LABELS + 1, r"labels must be class indices in \[0, 3\)"),
        (PROBS, LABELS.astype(float), "labels must be class indices"),
        (np.where(PROBS > 0.8, np.nan, PROBS), LABELS, "NaN or Inf"),
    ],
)
def test_malformed_inputs_are_refused(probs: np.ndarray, labels: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        roc_auc(probs, labels)
    with pytest.raises(InvalidInput, match="2 class names for 3 probability columns"):
        classification_metrics(PROBS, LABELS, ("a", "b"))
