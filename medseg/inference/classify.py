"""Classification tasks end to end after training: the served function, batch prediction, scoring.

* :func:`classify_images`: RGB pixels ``[3, H, W]`` → class probabilities, through the task's
  static chain (:meth:`medseg.tasks.Task.static_transforms`), the network and the task's
  activation: the one function batch prediction and evaluation call.
* :func:`predict_images`: every image of a dataset split, or of a folder/prefix of JPEG/PNG
  files, decoded within the server's limits (:func:`medseg.io.images.decode_image`), written
  as ``predictions.csv`` (one row per image: its predicted class and the probability of each
  class) and ``predictions.json``.
* :func:`evaluate_classes`: scores written predictions against the manifest's classes
  (:func:`medseg.tasks.skin_metrics.classification_metrics`: per-class and macro ROC AUC, balanced
  accuracy, sensitivity/specificity, confusion matrix, reliability and ECE), applies the task's
  quality gate (macro AUC) and writes ``metrics.json`` and a self-contained ``report.html`` with
  the confusion matrix, the reliability diagram and the images of the worst mistakes.
"""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from medseg.core.errors import MedsegError, ObjectNotFound
from medseg.core.settings import ServerLimits
from medseg.core.storage import Storage, join
from medseg.data.manifest import DatasetRef
from medseg.inference.infer import Segmenter
from medseg.io.images import decode_image
from medseg.io.report import _figure, _img, _png
from medseg.tasks.skin_metrics import ClassificationMetrics, classification_metrics

__all__ = [
    "IMAGE_SUFFIXES",
    "INDEX",
    "ClassEval",
    "ClassPredictions",
    "GatedResult",
    "classify_images",
    "classify_rows",
    "evaluate_classes",
    "image_sources",
    "metrics_head",
    "passes_gate",
    "predict_images",
    "read_predictions",
    "write_predictions",
]

#: The file suffixes batch prediction takes from a folder or prefix.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: Images per forward pass of batch prediction.
BATCH = 16
#: The index batch prediction writes last (its commit), a segmentation's or a classifier's.
INDEX = "predictions.json"


def classify_images(model: Segmenter, images: Sequence[np.ndarray]) -> np.ndarray:
    """Class probabilities ``[N, C]`` (float32) of RGB pixels ``[3, H, W]`` (uint8).

    The images run as one batch on the model's engine
    (:meth:`~medseg.inference.infer.Segmenter.logits`: PyTorch, or the exported graph on ONNX
    Runtime or OpenVINO).

    Raises:
        MedsegError: If the model's task is not a classification task.
    """
    task = model.task
    chain = task.static_transforms(model.cfg.data)
    if task.outputs.kind != "classes" or chain is None:
        raise MedsegError(f"task {task.name} does not classify images")
    if not images:
        return np.zeros((0, len(task.outputs.names)), dtype=np.float32)
    batch = torch.stack([torch.as_tensor(chain({"image": img})["image"]) for img in images])
    with torch.no_grad():
        logits = model.logits(batch)
    return np.stack([task.activate(row).cpu().numpy() for row in logits]).astype(np.float32)


@dataclass
class ClassPredictions:
    """What :func:`predict_images` wrote: one row per image, and the failures by image."""

    out: str
    classes: tuple[str, ...]
    cases: list[dict[str, Any]]
    failures: dict[str, str] = field(default_factory=dict)


def image_sources(storage: Storage, source: str) -> list[tuple[str, str]]:
    """``(image id, uri)`` of every JPEG/PNG under a folder or prefix, sorted.

    Raises:
        MedsegError: If there is none.
    """
    base = source.rstrip("/")
    found = sorted(
        (o.uri.rsplit("/", 1)[-1].rsplit(".", 1)[0], o.uri)
        for o in storage.list(base)
        if o.uri.lower().endswith(IMAGE_SUFFIXES)
    )
    if not found:
        raise MedsegError(f"{source}: no {'/'.join(IMAGE_SUFFIXES)} image in this folder/prefix")
    return found


def dataset_images(storage: Storage, store: str, spec: str, split: str) -> list[tuple[str, str]]:
    """``(case id, uri)`` of the stored images of a dataset split (``all``: every split)."""
    ref = DatasetRef.resolve(storage, store, spec)
    manifest = ref.load(storage)
    cases = [c for c in manifest.cases if split == "all" or c.split == split]
    if not cases:
        raise MedsegError(f"dataset {ref} has no cases in split {split!r}")
    return [(c.case_id, join(ref.prefix, c.file("image").key)) for c in cases]


def classify_rows(
    model: Segmenter,
    storage: Storage,
    images: Sequence[tuple[str, str]],
    limits: ServerLimits | None = None,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The prediction rows of ``(id, uri)`` images, and the reasons of those that fail to decode.

    A row: ``case_id``, ``label`` (the most probable class), its ``probability`` and
    ``probabilities`` by class.
    """
    limits = limits or ServerLimits()
    classes = model.task.outputs.names
    rows: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    for start in range(0, len(images), BATCH):
        ids, pixels = [], []
        for case_id, uri in images[start : start + BATCH]:
            try:
                pixels.append(decode_image(storage.get_bytes(uri), f"image {uri}", limits))
                ids.append(case_id)
            except MedsegError as exc:
                failures[case_id] = str(exc)
        for case_id, probs in zip(ids, classify_images(model, pixels), strict=True):
            best = int(np.argmax(probs))
            rows.append(
                {
                    "case_id": case_id,
                    "label": classes[best],
                    "probability": float(probs[best]),
                    "probabilities": {c: float(p) for c, p in zip(classes, probs, strict=True)},
                }
            )
    return rows, failures


def predict_images(
    model: Segmenter,
    images: list[tuple[str, str]],
    out: str,
    storage: Storage,
    limits: ServerLimits | None = None,
    source: tuple[str, str] = ("", ""),
) -> ClassPredictions:
    """Classify ``(id, uri)`` images; write ``OUT/predictions.csv`` and ``predictions.json``.

    An image that does not decode (not a JPEG/PNG, over the limits, corrupt) is a failure named
    in the result and in ``predictions.json``, not an error of the run. ``source``: the
    dataset version and split predicted, recorded for evaluation.
    """
    rows, failures = classify_rows(model, storage, images, limits)
    return write_predictions(storage, out, model.task.outputs.names, rows, failures, source)


def write_predictions(
    storage: Storage,
    out: str,
    classes: Sequence[str],
    rows: list[dict[str, Any]],
    failures: dict[str, str],
    source: tuple[str, str] = ("", ""),
) -> ClassPredictions:
    """Write ``OUT/predictions.csv`` and then ``predictions.json`` (the commit) of ``rows``."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["case", "label", "probability", *(f"p_{c}" for c in classes)])
    for r in rows:
        probs = [f"{r['probabilities'][c]:.6f}" for c in classes]
        writer.writerow([r["case_id"], r["label"], f"{r['probability']:.6f}", *probs])
    storage.put_bytes(join(out, "predictions.csv"), buf.getvalue().encode())
    doc = {
        "dataset": source[0],
        "split": source[1],
        "classes": list(classes),
        "cases": rows,
        "failures": failures,
    }
    storage.put_json(join(out, INDEX), doc)
    return ClassPredictions(out, tuple(classes), rows, failures)


class GatedResult(Protocol):
    """What every task's evaluation result states in the head of its ``metrics.json``."""

    @property
    def model(self) -> str: ...
    @property
    def dataset(self) -> str: ...
    @property
    def split(self) -> str: ...
    @property
    def definition(self) -> str: ...
    @property
    def predictions(self) -> str: ...
    @property
    def missing(self) -> list[str]: ...
    @property
    def gate_metric(self) -> str: ...
    @property
    def value(self) -> float: ...
    @property
    def threshold(self) -> float | None: ...
    @property
    def passed(self) -> bool: ...


def metrics_head(result: GatedResult) -> dict[str, Any]:
    """The head of a ``metrics.json``, any task's: what was scored, on what, and the gate."""
    return {
        "model": result.model,
        "dataset": result.dataset,
        "split": result.split,
        "definition": result.definition,
        "predictions": result.predictions,
        "missing_predictions": result.missing,
        result.gate_metric: result.value,
        "gate": {
            "metric": result.gate_metric,
            "threshold": result.threshold,
            "passed": result.passed,
        },
    }


@dataclass
class ClassEval:
    """What :func:`evaluate_classes` measured, and where it wrote it."""

    model: str
    dataset: str
    split: str
    metrics: ClassificationMetrics
    gate_metric: str
    value: float
    threshold: float | None
    passed: bool
    out: str
    predictions: str
    definition: str
    missing: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """Macro AUC, balanced accuracy, accuracy, ECE and ``auc_CLASS`` per class."""
        m = self.metrics
        scores = {
            "macro_auc": m.macro_auc,
            "balanced_accuracy": m.balanced_accuracy,
            "accuracy": m.accuracy,
            "ece": m.calibration.ece,
        }
        scores |= {f"auc_{c}": a for c, a in zip(m.classes, m.auc, strict=True)}
        scores[self.gate_metric] = self.value
        return scores

    def table(self) -> dict[str, list[str]]:
        """Per class: its AUC, sensitivity and specificity."""
        m = self.metrics
        return {
            "class": list(m.classes),
            "auc": [f"{a:.6f}" for a in m.auc],
            "sensitivity": [f"{v:.6f}" for v in m.sensitivity],
            "specificity": [f"{v:.6f}" for v in m.specificity],
        }

    def to_json(self) -> dict[str, Any]:
        """The ``metrics.json`` document."""
        metrics = {k: v for k, v in asdict(self.metrics).items() if k != "macro_auc"}
        return metrics_head(self) | metrics


def read_predictions(storage: Storage, uri: str, dataset: str, split: str) -> dict[str, Any]:
    """The index (:data:`INDEX`) of the predictions at ``uri``, which must be of ``split``.

    Args:
        storage: Where the predictions are.
        uri: The prefix ``medseg predict`` wrote to.
        dataset: The dataset version (``name@version``) the predictions must be of.
        split: The split they must be of.

    Raises:
        MedsegError: If ``uri`` holds no predictions, or those of another split.
    """
    try:
        index: dict[str, Any] = storage.get_json(join(uri, INDEX))
    except ObjectNotFound:
        raise MedsegError(
            f"{uri} holds no predictions ({INDEX}): run `medseg predict` first"
        ) from None
    if (index.get("dataset"), index.get("split")) != (dataset, split):
        raise MedsegError(
            f"{uri} holds predictions of {index.get('dataset')}:{index.get('split')}, "
            f"not of {dataset}:{split}"
        )
    return index


def passes_gate(value: float, threshold: float | None) -> bool:
    """Whether a gate metric's value passes ``threshold`` (none: always; NaN: never)."""
    return threshold is None or (not math.isnan(value) and value >= threshold)


def _scored(
    storage: Storage,
    predictions: str,
    source: tuple[str, str],
    truth: dict[str, str],
    classes: Sequence[str],
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Probabilities and true classes of the predicted cases, their ids, and the unpredicted."""
    doc = read_predictions(storage, predictions, *source)
    by_case = {r["case_id"]: r["probabilities"] for r in doc["cases"]}
    ids = [c for c in truth if c in by_case]
    missing = [c for c in truth if c not in by_case]
    if not ids:
        raise MedsegError(f"{predictions}: no prediction for any case of the split")
    probs = np.array([[by_case[c][k] for k in classes] for c in ids], dtype=np.float64)
    labels = np.array([list(classes).index(truth[c]) for c in ids], dtype=np.int64)
    return probs, labels, ids, missing


def evaluate_classes(
    model: Segmenter,
    model_uri: str,
    dataset: DatasetRef,
    split: str,
    predictions: str,
    out: str,
    storage: Storage,
    threshold: float | None = None,
    worst: int = 6,
) -> ClassEval:
    """Score the written predictions of a split against its classes; gate; write the report.

    A case without a prediction (its image failed) is left out and named in ``missing``.
    """
    task = model.task
    classes = task.outputs.names
    manifest = dataset.load(storage)
    cases = {c.case_id: c for c in manifest.cases if split == "all" or c.split == split}
    truth = {c: str(e.label) for c, e in cases.items()}
    probs, labels, ids, missing = _scored(
        storage, predictions, (str(dataset), split), truth, classes
    )
    metrics = classification_metrics(probs, labels, classes)
    value = metrics.macro_auc
    passed = passes_gate(value, threshold)
    result = ClassEval(
        model_uri,
        str(dataset),
        split,
        metrics,
        task.gate_metric,
        value,
        threshold,
        passed,
        out,
        predictions,
        task.metric_definition(manifest.convention),
        missing,
    )
    storage.put_json(join(out, "metrics.json"), result.to_json())
    mistakes = _worst_mistakes(probs, labels, ids, worst)
    pictures = {
        c: _mistake_png(model, storage, dataset, cases[c], probs[ids.index(c)]) for c in mistakes
    }
    page = report_html(result, task.metric_conventions(), pictures)
    storage.put_bytes(join(out, "report.html"), page.encode())
    return result


def _worst_mistakes(probs: np.ndarray, labels: np.ndarray, ids: list[str], n: int) -> list[str]:
    """The ``n`` misclassified cases the model was most sure of (lowest true-class prob first)."""
    wrong = [i for i in range(len(ids)) if int(np.argmax(probs[i])) != int(labels[i])]
    wrong.sort(key=lambda i: (probs[i, labels[i]], ids[i]))
    return [ids[i] for i in wrong[:n]]


def _mistake_png(
    model: Segmenter, storage: Storage, ref: DatasetRef, case: Any, probs: np.ndarray
) -> bytes:
    task = model.task
    uri = join(ref.prefix, case.file("image").key)
    pixels = decode_image(storage.get_bytes(uri), f"image {uri}", ServerLimits())
    truth = np.zeros(len(probs), dtype=np.uint8)
    truth[task.outputs.names.index(case.label)] = 1
    return task.overlay_png(case.case_id, pixels, task.inputs.channels, truth, probs)


def _reliability_png(m: ClassificationMetrics) -> bytes:
    fig, axes = _figure(1, 1, (4.0, 4.0))
    ax = axes[0][0]
    cal = m.calibration
    centres = [(a + b) / 2 for a, b in zip(cal.edges, cal.edges[1:], strict=False)]
    ax.bar(centres, np.nan_to_num(cal.accuracy), width=1 / len(centres), edgecolor="black")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set(xlabel="confidence", ylabel="accuracy", title=f"reliability (ECE {cal.ece:.3f})")
    ax.legend(loc="upper left")
    return _png(fig)


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{cells}</tr>{body}</table>"


def report_html(result: ClassEval, conventions: str, mistakes: dict[str, bytes]) -> str:
    """The self-contained evaluation report of a classifier."""
    m = result.metrics
    gate = "passed" if result.passed else "FAILED"
    per_class = [
        (c, f"{a:.4f}", f"{se:.4f}", f"{sp:.4f}")
        for c, a, se, sp in zip(m.classes, m.auc, m.sensitivity, m.specificity, strict=True)
    ]
    confusion = [(c, *row) for c, row in zip(m.classes, m.confusion, strict=True)]
    pictures = "".join(_img(png, f"mistake {c}") for c, png in mistakes.items())
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>medseg evaluation</title>"
        "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:2px 6px}"
        "table{border-collapse:collapse}</style></head><body>"
        f"<h1>{html.escape(result.model)}</h1>"
        f"<p>{html.escape(result.dataset)} split {html.escape(result.split)}: "
        f"{sum(map(sum, m.confusion))} images. "
        f"{html.escape(result.definition)}</p>"
        f"<p><b>macro AUC {m.macro_auc:.4f}</b>, balanced accuracy {m.balanced_accuracy:.4f}, "
        f"accuracy {m.accuracy:.4f}, ECE {m.calibration.ece:.4f}; quality gate "
        f"({result.gate_metric} ≥ {result.threshold}): {gate}</p>"
        "<h2>Per class</h2>"
        + _table(("class", "AUC", "sensitivity", "specificity"), per_class)
        + "<h2>Confusion matrix</h2><p>rows: true class; columns: predicted class</p>"
        + _table(("", *m.classes), confusion)
        + "<h2>Calibration</h2>"
        + _img(_reliability_png(m), "reliability diagram")
        + f"<h2>Worst mistakes</h2><p>most confident wrong answers first</p>{pictures}"
        + f"<h2>Conventions</h2><p>{html.escape(conventions)}</p>"
        + f"<p>missing predictions: {html.escape(', '.join(result.missing) or 'none')}</p>"
        + "</body></html>"
    )
