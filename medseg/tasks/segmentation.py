"""The region-segmentation family: binary region masks per voxel, scored by Dice and HD95.

What every task of overlapping binary regions shares (BraTS's TC/WT/ET, a test's toy task):
sigmoid outputs, the Dice loss (or Dice plus focal: ``task.loss``), thresholded masks, Dice and
HD95 per region with the BraTS scorer's conventions for empty masks, and the report's overlays. A
task of this family names its channels, regions, network and label conventions; BraTS also nests
its regions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from medseg.io.report import overlay_png
from medseg.tasks.base import CaseScore, Task, TaskConfig

if TYPE_CHECKING:
    import torch

    from medseg.config import InferConfig

# torch, MONAI and SciPy are imported where they run: the config names its task, and the config
# (with the CLI and the client) loads without them.

__all__ = [
    "HD95_DEFINITION",
    "HD95_EMPTY",
    "RegionLoss",
    "RegionSegmentation",
    "RegionTaskConfig",
    "hd95",
    "score_regions",
]

#: HD95 of a region empty in exactly one of ground truth and prediction, in mm.
HD95_EMPTY = 373.12866
#: Names the HD95 definition of :func:`hd95` (the BraTS scorer's) in reports and model cards.
HD95_DEFINITION = "brats-pooled-95"


#: The training loss of a region task: ``dice``, the soft Dice of the MONAI BraTS tutorial;
#: ``dice_focal``, that Dice plus the sigmoid focal loss (MONAI ``DiceFocalLoss``, gamma 2, equal
#: weights), which reached the demo's validation Dice of 0.90 in fewer epochs on every seed tried
#: (docs/training-levers.md, run 8).
RegionLoss = Literal["dice", "dice_focal"]


class RegionTaskConfig(TaskConfig):
    """``task`` of a region-segmentation task: what every task of the family may set.

    Attributes:
        loss: The training loss (:data:`RegionLoss`).
    """

    loss: RegionLoss = "dice"


def _surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a binary mask: the mask minus its erosion by the face-connected cross.

    Voxels on the array's edge count as surface (outside the array is background).
    """
    from scipy import ndimage

    cross = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=cross)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> float:
    """The BraTS scorer's HD95 (mm) of two non-empty binary masks (:data:`HD95_DEFINITION`).

    The challenge's definition (panoptica's ``_compute_hausdorff_distance95``, which
    ``brats-evaluation`` calls): the surface voxels of each mask are the mask XOR its binary
    erosion by the face-connected cross (``generate_binary_structure(ndim, 1)``); each surface
    voxel gets its Euclidean distance to the nearest surface voxel of the other mask; HD95 is
    the 95th percentile (linear interpolation) of the two directed sets **pooled together**.
    MONAI's ``HausdorffDistanceMetric(percentile=95)`` instead takes the larger of the two
    directed 95th percentiles, which is never smaller and differs by up to 0.5 mm on BraTS
    label maps.

    Distances are in mm: the exact Euclidean distance transform on the grid with ``spacing``.
    (panoptica chooses the nearest voxel with the spacing but returns the distance in voxel
    steps, the same on BraTS's 1 mm isotropic grid; elsewhere this function's mm are what the
    report means.)

    Empty masks are not measured here: :func:`score_regions` applies medseg's documented
    convention (both empty: 0; one empty: :data:`HD95_EMPTY`), which panoptica's function does
    not define (it has no surface to measure from).

    Args:
        pred: Predicted binary mask.
        truth: Ground-truth binary mask on the same grid.
        spacing: Voxel size along each axis, in mm.

    Raises:
        ValueError: If either mask is empty, or the masks and ``spacing`` disagree in shape.
    """
    p, t = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    if p.shape != t.shape or len(spacing) != p.ndim:
        raise ValueError(
            f"hd95: masks of shapes {p.shape} and {t.shape} with spacing {tuple(spacing)}"
        )
    if not p.any() or not t.any():
        raise ValueError("hd95: a mask is empty; score_case applies the empty-mask convention")
    from scipy import ndimage

    surface_p, surface_t = _surface(p), _surface(t)
    to_t = ndimage.distance_transform_edt(~surface_t, sampling=spacing)[surface_p]
    to_p = ndimage.distance_transform_edt(~surface_p, sampling=spacing)[surface_t]
    return float(np.percentile(np.concatenate([to_t, to_p]), 95))


def score_regions(
    case_id: str,
    pred: torch.Tensor,
    truth: torch.Tensor,
    spacing: tuple[float, ...],
    regions: Sequence[str],
) -> CaseScore:
    """Dice and HD95 per region of binary masks ``[len(regions), ...spatial]``.

    Args:
        case_id: Names the case.
        pred: Predicted region masks, in ``regions`` order.
        truth: Ground-truth region masks on the same grid.
        spacing: Voxel size along each axis of that grid, in mm.
        regions: The region names.
    """
    import torch
    from monai.metrics import DiceMetric

    p, t = pred.unsqueeze(0).float(), truth.unsqueeze(0).float()
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, t)
    assert isinstance(dice, torch.Tensor)
    scores = CaseScore(case_id, {}, {}, {}, {})
    for i, region in enumerate(regions):
        n_true, n_pred = int(truth[i].sum()), int(pred[i].sum())
        scores.voxels_true[region], scores.voxels_pred[region] = n_true, n_pred
        scores.dice[region] = float(dice[0, i])
        if n_true == 0 and n_pred == 0:
            scores.hd95[region] = 0.0
        elif n_true == 0 or n_pred == 0:
            scores.hd95[region] = HD95_EMPTY
        else:
            hd = hd95(pred[i].numpy(), truth[i].numpy(), spacing)
            scores.hd95[region] = min(hd, HD95_EMPTY)
    return scores


@dataclass(frozen=True)
class RegionSegmentation(Task):
    """A task of overlapping binary regions (sigmoid outputs), scored by Dice and HD95.

    Attributes:
        colours: Overlay colour of each region (name, colour name, RGB 0–1), in drawing order
            (the last on top).
        centre_region: The region whose centre the overlay planes cross.
        display_channel: The channel the overlays are drawn on.
    """

    colours: tuple[tuple[str, str, tuple[float, float, float]], ...] = ()
    centre_region: str = ""
    display_channel: str = ""

    def loss(
        self, config: TaskConfig | None = None, counts: Sequence[int] | None = None
    ) -> torch.nn.Module:
        """Soft Dice of the sigmoid outputs (squared denominators); no class weighting.

        With ``config.loss`` ``dice_focal``, the same Dice plus the sigmoid focal loss.
        """
        from monai.losses import DiceFocalLoss, DiceLoss

        focal = isinstance(config, RegionTaskConfig) and config.loss == "dice_focal"
        loss: type[DiceLoss | DiceFocalLoss] = DiceFocalLoss if focal else DiceLoss
        return loss(smooth_nr=0, smooth_dr=1e-5, squared_pred=True, sigmoid=True)

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid()

    def postprocess(self, probabilities: np.ndarray, infer: InferConfig) -> np.ndarray:
        """Each region where its probability exceeds ``infer.threshold``."""
        return (probabilities > infer.threshold).astype(np.uint8)

    def metric_names(self) -> tuple[str, ...]:
        return (*(f"dice_{r.lower()}" for r in self.outputs.names), self.gate_metric)

    def validation_scores(self, pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """Dice per region (both empty: 1)."""
        import torch
        from monai.metrics import DiceMetric

        metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
        dice = metric(pred.unsqueeze(0), truth.unsqueeze(0))
        assert isinstance(dice, torch.Tensor)
        return dice[0]

    def score_case(
        self, case_id: str, pred: torch.Tensor, truth: torch.Tensor, spacing: tuple[float, ...]
    ) -> CaseScore:
        return score_regions(case_id, pred, truth, spacing, self.outputs.names)

    def metric_definition(self, convention: str) -> str:
        return (
            f"label-map Dice/HD95 ({convention}: {', '.join(self.outputs.names)}) of the served "
            "label maps on the original grid, HD95 in mm"
        )

    def metric_conventions(self) -> str:
        regions = ", ".join(self.outputs.names)
        return (
            f"Dice and HD95 per region ({regions}) on the binary region masks of the served "
            "label map against the original ground-truth label map, on each case's original "
            "voxel grid; HD95 in mm from that grid's voxel spacing, the BraTS scorer's "
            f"definition ({HD95_DEFINITION}: the 95th percentile of both directed "
            "surface-distance sets pooled; surface = mask XOR its erosion by the face-connected "
            "cross). Ground truth and prediction both empty: Dice 1, HD95 0. Exactly one empty: "
            f"Dice 0, HD95 {HD95_EMPTY} (the BraTS scorer's cap). A case whose prediction failed "
            "scores as an empty label map. Means are over cases, then over regions."
        )

    def overlay_png(
        self,
        case_id: str,
        image: np.ndarray,
        channels: Sequence[str],
        truth: np.ndarray,
        pred: np.ndarray,
    ) -> bytes:
        names = self.outputs.names
        return overlay_png(
            case_id,
            image,
            channels,
            truth,
            pred,
            colours=[(names.index(r), rgb) for r, _, rgb in self.colours],
            centre=names.index(self.centre_region or names[0]),
            display=self.display_channel or channels[0],
            legend=", ".join(f"{r} {name}" for r, name, _ in self.colours),
        )
