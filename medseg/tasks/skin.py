"""Skin-lesion classification: the second task family (HAM10000 / ISIC 2018 Task 3).

One dermoscopy image (three RGB channels, 2D) in, one of seven diagnoses out
(:data:`medseg.tasks.skin_classes.CLASSES`). The network is MONAI's ``DenseNet121`` with
``spatial_dims=2``; the chains are MONAI array transforms: intensity scaled to [0, 1] and the
image resized to ``data.image_size`` once (cached by preprocessing), then random rotation ±15°,
flips and zoom 0.9–1.1 per epoch. Cross-entropy, softmax, arg-max. The class imbalance (nv is
58 % of HAM10000, df 1 %) is handled by ``task.imbalance``: a class-weighted loss, a weighted
sampler (the trainer's, which works under DDP) or nothing. The quality gate is the macro ROC AUC.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import Field

from medseg.tasks.base import CaseScore, GraphSpec, InputSpec, OutputSpec, Task, TaskConfig
from medseg.tasks.skin_classes import CHANNELS, CLASS_NAMES, CLASSES, CONVENTION

if TYPE_CHECKING:
    import torch

    from medseg.config import DataConfig, InferConfig, MedsegConfig, ModelConfig, TrainConfig

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "NAME",
    "SKIN",
    "ClassConvention",
    "SkinClassification",
    "SkinTaskConfig",
]

#: The task's name (``task.kind`` in ``model.yaml``).
NAME = "skin-lesion-classification"
#: Height and width the images are resized to when ``data.image_size`` is unset.
DEFAULT_IMAGE_SIZE = (224, 224)
#: Random rotation range of the training chain, in radians (±15°).
ROTATE = math.radians(15.0)

Imbalance = Literal["class_weighted", "weighted_sampler", "none"]


class SkinTaskConfig(TaskConfig):
    """``task`` of a skin-lesion classifier.

    Attributes:
        imbalance: ``class_weighted``: cross-entropy weighted by inverse class frequency;
            ``weighted_sampler``: each epoch draws training images with probability inverse to
            their class's frequency (the trainer's DDP-aware sampler; the default: it gave the
            higher macro AUC and balanced accuracy on synthetic HAM10000, see
            ``benchmarks/skin_imbalance.py``); ``none``: neither.
    """

    kind: Literal["skin-lesion-classification"] = "skin-lesion-classification"
    imbalance: Imbalance = Field(default="weighted_sampler")


@dataclass(frozen=True)
class ClassConvention:
    """A class-label convention: label ``i`` is class ``names[i]`` (one label per image)."""

    name: str
    names: tuple[str, ...]

    @property
    def labels(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def allowed(self) -> frozenset[int]:
        return frozenset(range(len(self.names)))

    def to_regions(self, label: NDArray[np.integer]) -> NDArray[np.uint8]:
        """One-hot ``[C, ...]`` of class indices."""
        return np.moveaxis(np.eye(len(self.names), dtype=np.uint8)[np.asarray(label)], -1, 0)

    def from_regions(self, regions: NDArray[np.generic]) -> NDArray[np.uint8]:
        """Class indices of one-hot (or probability) arrays ``[C, ...]``."""
        return np.asarray(regions).argmax(axis=0).astype(np.uint8)


def _cross_entropy(weight: Sequence[float] | None) -> torch.nn.Module:
    """Cross-entropy of logits ``[B, C]`` against class indices ``[B]`` or ``[B, 1]``."""
    import torch

    class CrossEntropy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = None if weight is None else torch.tensor(list(weight), dtype=torch.float32)
            self.register_buffer("weight", w)

        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            w = self.weight
            return torch.nn.functional.cross_entropy(
                logits.float(),
                target.reshape(-1).long(),
                weight=w if isinstance(w, torch.Tensor) else None,
            )

    return CrossEntropy()


def inverse_frequency(counts: Sequence[int]) -> list[float]:
    """Class weights ``N / (C · n_c)`` (1 for a balanced set; a class without cases gets 0)."""
    total, n = sum(counts), len(counts)
    return [total / (n * c) if c else 0.0 for c in counts]


@dataclass(frozen=True)
class SkinClassification(Task):
    """DenseNet121 over RGB images; seven classes; macro AUC as the gate."""

    class_names: dict[str, str] = field(default_factory=lambda: dict(CLASS_NAMES))

    def build_network(self, cfg: ModelConfig) -> torch.nn.Module:
        from monai.networks.nets import DenseNet121

        return DenseNet121(
            spatial_dims=self.inputs.spatial_dims,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            dropout_prob=cfg.dropout_prob,
        )

    def loss(
        self, config: TaskConfig | None = None, counts: Sequence[int] | None = None
    ) -> torch.nn.Module:
        weighted = isinstance(config, SkinTaskConfig) and config.imbalance == "class_weighted"
        return _cross_entropy(inverse_frequency(counts) if weighted and counts else None)

    def sampling_weights(self, config: TaskConfig, labels: Sequence[int]) -> list[float] | None:
        if not isinstance(config, SkinTaskConfig) or config.imbalance != "weighted_sampler":
            return None
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(CLASSES))
        return [1.0 / float(counts[y]) for y in labels]

    def static_transforms(self, data: DataConfig) -> Callable[[dict[str, Any]], Any]:
        """``{"image": uint8 [3, H, W]}`` → float32 ``[3, *image_size]`` in [0, 1]."""
        import torch
        from monai.transforms import Compose, EnsureTyped, Resized, ScaleIntensityd

        size = data.image_size or DEFAULT_IMAGE_SIZE
        return Compose(
            [
                EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
                ScaleIntensityd(keys="image", minv=0.0, maxv=1.0),
                Resized(keys="image", spatial_size=size, mode="bilinear", anti_aliasing=True),
            ]
        )

    def train_transforms(
        self, train: TrainConfig, seed: int | None = None
    ) -> Callable[[dict[str, Any]], Any]:
        """Random rotation ±15°, flips of both axes and zoom 0.9–1.1 of the cached images."""
        import torch
        from monai.transforms import Compose, EnsureTyped, RandFlipd, RandRotated, RandZoomd

        chain = Compose(
            [
                EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
                RandRotated(keys="image", range_x=ROTATE, prob=0.5, padding_mode="border"),
                RandFlipd(keys="image", prob=0.5, spatial_axis=0),
                RandFlipd(keys="image", prob=0.5, spatial_axis=1),
                RandZoomd(keys="image", prob=0.5, min_zoom=0.9, max_zoom=1.1, padding_mode="edge"),
            ]
        )
        if seed is not None:
            chain.set_random_state(seed=seed)
        return chain

    def graph_spec(self, cfg: MedsegConfig) -> GraphSpec:
        """Images ``[N, 3, *image_size]`` in, logits ``[N, C]`` out; only the batch is free.

        Every image is resized to ``data.image_size`` by :meth:`static_transforms`, so the
        graph is planned for that size. OpenVINO runs each call's images at once on one plan
        whose batch alone is free: a request of one image is not padded up to a batch, and a
        new batch size compiles nothing. On 32 images of 224 px, three runs on the project's
        shared (loaded) 2-core machine, ``benchmarks/bench_classify.py`` part C: 1.11–1.47×
        as fast as 32 calls of a static batch-1 plan, 0.86–1.22× a static batch-32 plan
        (which would pad a one-image request 32-fold); one unloaded try of 16 images had the
        batch-1 plan 1.17× faster: the choice is for a busy node and no padding.
        """
        size = cfg.data.image_size or DEFAULT_IMAGE_SIZE
        batch = {0: "batch"}
        return GraphSpec(
            example=(1, cfg.model.in_channels, *size),
            input_axes=batch,
            output_axes=batch,
            any_size=False,
            plan_batch=None,
        )

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over the class axis (the first axis of one case's ``[C]`` logits)."""
        return logits.float().softmax(dim=0)

    def postprocess(self, probabilities: np.ndarray, infer: InferConfig) -> np.ndarray:
        """One-hot uint8 ``[C]`` of the most probable class."""
        out = np.zeros(probabilities.shape, dtype=np.uint8)
        out[int(np.argmax(probabilities))] = 1
        return out

    def metric_names(self) -> tuple[str, ...]:
        return (
            *(f"auc_{c}" for c in self.outputs.names),
            "balanced_accuracy",
            self.gate_metric,
        )

    def validation_metrics(self, probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Per-class AUC, balanced accuracy and the macro AUC (MONAI ``compute_roc_auc``)."""
        from medseg.tasks.skin_metrics import classification_metrics

        m = classification_metrics(probabilities, labels, self.outputs.names)
        record = {f"auc_{c}": a for c, a in zip(self.outputs.names, m.auc, strict=True)}
        record["balanced_accuracy"] = m.balanced_accuracy
        record[self.gate_metric] = m.macro_auc
        return record

    def validation_scores(self, pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a classifier is validated over the split (validation_metrics)")

    def score_case(
        self, case_id: str, pred: torch.Tensor, truth: torch.Tensor, spacing: tuple[float, ...]
    ) -> CaseScore:
        raise NotImplementedError("a classifier is scored over the split, not case by case")

    def metric_definition(self, convention: str) -> str:
        return (
            f"macro ROC AUC over the {len(self.outputs.names)} classes ({convention}: "
            f"{', '.join(self.outputs.names)}, one against the rest, MONAI compute_roc_auc) "
            "of the served probabilities"
        )

    def metric_conventions(self) -> str:
        return (
            "ROC AUC per class, one class against the rest, of the served softmax "
            "probabilities (MONAI compute_roc_auc); a class without a positive or a negative "
            "case has no AUC and is left out of the macro mean. Balanced accuracy is the mean "
            "per-class recall of the arg-max (ISIC 2018 Task 3's metric). ECE over 10 "
            "equal-width confidence bins."
        )

    def overlay_png(
        self,
        case_id: str,
        image: np.ndarray,
        channels: Sequence[str],
        truth: np.ndarray,
        pred: np.ndarray,
    ) -> bytes:
        """The image, captioned with its true and predicted class (one-hot ``[C]`` each)."""
        from PIL import Image, ImageDraw

        pixels = np.asarray(image, dtype=np.float32)
        span = float(pixels.max() - pixels.min()) or 1.0
        rgb = ((pixels - pixels.min()) / span * 255).astype(np.uint8).transpose(1, 2, 0)
        picture = Image.fromarray(rgb).resize((256, 256))
        canvas = Image.new("RGB", (256, 290), "white")
        canvas.paste(picture, (0, 34))
        names = self.outputs.names
        t, p = names[int(np.argmax(truth))], names[int(np.argmax(pred))]
        draw = ImageDraw.Draw(canvas)
        draw.text((4, 2), f"{case_id}", fill="black")
        draw.text((4, 16), f"truth {t}, predicted {p}", fill="black" if t == p else "red")
        buf = io.BytesIO()
        canvas.save(buf, format="PNG")
        return buf.getvalue()


#: The skin-lesion task, registered by :mod:`medseg.tasks`.
SKIN = SkinClassification(
    name=NAME,
    config_type=SkinTaskConfig,
    inputs=InputSpec(channels=CHANNELS, spatial_dims=2),
    outputs=OutputSpec(kind="classes", names=CLASSES),
    networks=("DenseNet121",),
    conventions={CONVENTION: ClassConvention(CONVENTION, CLASSES)},
    default_convention=CONVENTION,
    gate_metric="macro_auc",
)
