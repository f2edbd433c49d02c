"""BraTS brain-tumour segmentation: the first task.

Four MRI modalities in, three nested regions out: tumour core (TC), whole tumour (WT) and
enhancing tumour (ET), with ET ⊆ TC ⊆ WT made to hold before the masks become a label map
(:func:`nest_regions`). The label conventions of the public datasets are in
:mod:`medseg.tasks.labels`; the network is MONAI's SegResNet
(:func:`medseg.tasks.networks.build_network`). This module is the one definition of the BraTS
channels and regions: BraTS-only modules (ingest, synthetic data, DICOM) import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from medseg.tasks.base import InputSpec, OutputSpec
from medseg.tasks.labels import CONVENTIONS
from medseg.tasks.networks import build_network
from medseg.tasks.segmentation import RegionSegmentation, RegionTaskConfig

if TYPE_CHECKING:
    import torch

    from medseg.config import InferConfig, ModelConfig

__all__ = ["BRATS", "CHANNELS", "NAME", "REGIONS", "BratsSegmentation", "BratsTaskConfig"]

#: The task's name (``task.kind`` in ``model.yaml``); a ``model.yaml`` without a task is BraTS.
NAME = "brats-segmentation"
#: Canonical channel order of every BraTS image tensor.
CHANNELS: tuple[str, ...] = ("t1", "t1gd", "t2", "flair")
#: Output regions, in channel order of every BraTS label tensor and model output.
REGIONS: tuple[str, ...] = ("TC", "WT", "ET")

_TC, _WT, _ET = (REGIONS.index(r) for r in ("TC", "WT", "ET"))


class BratsTaskConfig(RegionTaskConfig):
    """``task`` of a BraTS model: the family's ``loss``; nesting is ``infer.nesting``."""

    kind: Literal["brats-segmentation"] = "brats-segmentation"


def nest_regions(probabilities: np.ndarray, infer: InferConfig) -> np.ndarray:
    """Region probabilities ``[3, ...]`` (TC, WT, ET) to nested binary masks (ET ⊆ TC ⊆ WT).

    A label map can only hold nested regions, so the network's three independent outputs are
    made nested *before* they are cut into one, by ``infer.nesting``:

    * ``intersect``: WT = p_WT > t, TC = WT ∧ p_TC > t, ET = TC ∧ p_ET > t (the same as
      min-clamping the probabilities down the hierarchy, then thresholding);
    * ``union``: ET = p_ET > t, TC = ET ∨ p_TC > t, WT = TC ∨ p_WT > t (what a label map
      written with "ET wins over TC over WT" implies; max-clamping);
    * ``disjoint``: each voxel takes the most probable of the four disjoint classes
      background 1 − p_WT, oedema p_WT(1 − p_TC), core p_WT·p_TC(1 − p_ET), enhancing
      p_WT·p_TC·p_ET (no threshold).

    Args:
        probabilities: Sigmoid outputs, float, ``[3, ...spatial]``.
        infer: Gives ``threshold`` and ``nesting``.

    Returns:
        uint8 masks ``[3, ...spatial]`` with ET ⊆ TC ⊆ WT.
    """
    p, t = probabilities, infer.threshold
    if infer.nesting == "intersect":
        wt = p[_WT] > t
        tc = wt & (p[_TC] > t)
        et = tc & (p[_ET] > t)
    elif infer.nesting == "union":
        et = p[_ET] > t
        tc = et | (p[_TC] > t)
        wt = tc | (p[_WT] > t)
    else:
        classes = np.stack(
            [
                1.0 - p[_WT],
                p[_WT] * (1.0 - p[_TC]),
                p[_WT] * p[_TC] * (1.0 - p[_ET]),
                p[_WT] * p[_TC] * p[_ET],
            ]
        )
        best = classes.argmax(axis=0)
        wt, tc, et = best >= 1, best >= 2, best == 3
    out = np.empty((len(REGIONS), *p.shape[1:]), dtype=np.uint8)
    out[_TC], out[_WT], out[_ET] = tc, wt, et
    return out


@dataclass(frozen=True)
class BratsSegmentation(RegionSegmentation):
    """SegResNet over four modalities; nested TC/WT/ET; the BraTS label conventions."""

    def build_network(self, cfg: ModelConfig) -> torch.nn.Module:
        return build_network(cfg)

    def postprocess(self, probabilities: np.ndarray, infer: InferConfig) -> np.ndarray:
        """Nested masks, see :func:`nest_regions` (``infer.nesting``)."""
        return nest_regions(probabilities, infer)

    def metric_definition(self, convention: str) -> str:
        conv = CONVENTIONS[convention]

        def labels(values: tuple[int, ...]) -> str:
            return "{" + ",".join(map(str, values)) + "}"

        return (
            f"label-map Dice/HD95 ({conv.name}: TC={labels(conv.tc)}, "
            f"WT={labels(conv.wt)}, ET={labels(conv.et)}) of the served label maps on "
            "the original grid, HD95 in mm"
        )


#: The BraTS task, registered by :mod:`medseg.tasks`.
BRATS = BratsSegmentation(
    name=NAME,
    config_type=BratsTaskConfig,
    inputs=InputSpec(channels=CHANNELS, spatial_dims=3),
    outputs=OutputSpec(kind="regions", names=REGIONS),
    networks=("SegResNet",),
    conventions=CONVENTIONS,
    default_convention="brats2021",
    gate_metric="dice_mean",
    dicom_outputs=REGIONS,
    colours=(
        ("WT", "green", (0.2, 0.8, 0.2)),
        ("TC", "yellow", (1.0, 0.85, 0.1)),
        ("ET", "red", (0.9, 0.1, 0.1)),
    ),
    centre_region="WT",
    display_channel="flair",
)
