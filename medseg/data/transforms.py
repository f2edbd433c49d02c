"""Transform chains, defined once and built from the config.

* :func:`static_transforms`: the deterministic chain that :mod:`medseg.data.preprocess` runs once
  per case and caches (load, channel first, channel order, labels to TC/WT/ET, orientation,
  spacing, foreground crop, per-channel normalisation).
* :func:`train_transforms`: the random chain that runs in the DataLoader workers on the cached
  cases (pad to the ROI, random crop — uniform, or a share centred on the foreground —, flips on
  three axes, intensity scale and shift), casting to float32 only after the crop.

Training, evaluation and serving import the chains from here; nothing re-implements them.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    Spacingd,
    SpatialPadd,
    Transform,
)

from medseg.config import DataConfig, TrainConfig
from medseg.tasks import get_convention

__all__ = [
    "ConvertToRegions",
    "ConvertToRegionsd",
    "RandForegroundCropd",
    "SelectChannels",
    "SelectChannelsd",
    "static_transforms",
    "train_transforms",
]


class ConvertToRegions(Transform):
    """Label map ``[1, ...spatial]`` to overlapping regions ``[3, ...spatial]``: TC, WT, ET.

    The mapping follows the dataset's label convention (see :mod:`medseg.tasks.labels`):
    brats2021 TC = 1+4, WT = 1+2+4, ET = 4; brats2023 TC = 1+3, WT = 1+2+3, ET = 3;
    msd TC = 2+3, WT = 1+2+3, ET = 3.

    Args:
        convention: Name of the label convention.
    """

    def __init__(self, convention: str):
        self.convention = get_convention(convention)

    def __call__(self, label: Any) -> Any:
        arr = label[0] if label.ndim == 4 else label
        is_tensor = isinstance(arr, torch.Tensor)
        values = arr.detach().cpu().numpy() if is_tensor else np.asarray(arr)
        regions = self.convention.to_regions(np.rint(values).astype(np.int64))
        if isinstance(label, MetaTensor):
            return MetaTensor(torch.as_tensor(regions), meta=dict(label.meta))
        if is_tensor:
            return torch.as_tensor(regions)
        return regions


class ConvertToRegionsd(MapTransform):
    """Dictionary version of :class:`ConvertToRegions`."""

    def __init__(self, keys: KeysCollection, convention: str, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.converter = ConvertToRegions(convention)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


class SelectChannels(Transform):
    """Pick and reorder channels of a channel-first array.

    Args:
        indices: Source channel of each output channel.
    """

    def __init__(self, indices: Sequence[int]):
        self.indices = list(indices)

    def __call__(self, img: Any) -> Any:
        return img[self.indices]


class SelectChannelsd(MapTransform):
    """Dictionary version of :class:`SelectChannels`."""

    def __init__(
        self, keys: KeysCollection, indices: Sequence[int], allow_missing_keys: bool = False
    ):
        super().__init__(keys, allow_missing_keys)
        self.selector = SelectChannels(indices)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.selector(d[key])
        return d


class RandForegroundCropd(RandCropByPosNegLabeld):
    """One ``roi_size`` crop, centred on a labelled voxel with probability ``fraction``.

    MONAI's ``RandCropByPosNegLabeld`` with one sample, returning the dictionary rather than a
    list of one, so that the chain's output is the same whichever crop it draws. A voxel is
    foreground where any channel of ``label`` is non-zero (for BraTS regions: where WT is).

    Args:
        keys: Keys to crop (``image`` and ``label``).
        roi_size: Crop size.
        fraction: Probability that a crop is centred on foreground (else on background).
        label_key: The key whose non-zero voxels are the foreground.
    """

    def __init__(
        self,
        keys: KeysCollection,
        roi_size: Sequence[int],
        fraction: float,
        label_key: str = "label",
    ):
        super().__init__(
            keys,
            label_key=label_key,
            spatial_size=roi_size,
            pos=fraction,
            neg=1.0 - fraction,
            num_samples=1,
            allow_smaller=True,
        )

    def __call__(  # type: ignore[override]
        self, data: Mapping[Hashable, Any], lazy: bool | None = None
    ) -> dict[Hashable, Any]:
        return super().__call__(data, lazy=lazy)[0]


#: MONAI's optional GPU DICOM decoder plugin: ``LoadImage`` builds every reader it knows, and
#: this one says, by a log record and a warning each time, that nvImageCodec is missing.
_NVIMGCODEC_LOGGER = "monai.data.nvimgcodec_pydicom_plugin"


def _not_nvimgcodec_missing(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("nvImageCodec is not available")


@contextlib.contextmanager
def _without_nvimgcodec_notices() -> Iterator[None]:
    """Drop only the nvImageCodec notices while ``LoadImaged`` is built.

    medseg's chain reads NIfTI through nibabel (DICOM goes through :mod:`medseg.dicom.series`), so
    the GPU DICOM plugin MONAI registers for pydicom is never used; its notices were printed by
    every command and benchmark.
    """
    logger = logging.getLogger(_NVIMGCODEC_LOGGER)
    logger.addFilter(_not_nvimgcodec_missing)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "NvImgCodecPydicomReader", UserWarning)
            yield
    finally:
        logger.removeFilter(_not_nvimgcodec_missing)


def static_transforms(
    cfg: DataConfig,
    convention: str | None = None,
    channel_index: Mapping[str, int] | None = None,
    load: bool = True,
) -> Compose:
    """The static chain, on ``{"image": files, "label": file}`` dictionaries.

    Args:
        cfg: Data configuration (orientation, spacing, crop, normalisation).
        convention: Label convention of ``label``; without it, no label is processed.
        channel_index: For a 4D image, the index of each canonical channel in the file. Without
            it, ``image`` is a list of one 3D file per channel, already in ``cfg.channels`` order.
        load: Without loading, ``image`` is already a channel-first ``MetaTensor`` carrying its
            affine (the model server's in-memory volumes).

    Returns:
        A MONAI ``Compose`` whose outputs are ``image`` ``[4, X, Y, Z]`` (float32, normalised)
        and, with a convention, ``label`` ``[3, X, Y, Z]`` (TC, WT, ET).
    """
    keys = ["image", "label"] if convention else ["image"]
    modes = ["bilinear", "nearest"] if convention else ["bilinear"]
    chain: list[Any] = []
    if load:
        with _without_nvimgcodec_notices():
            chain.append(LoadImaged(keys=keys, ensure_channel_first=True, image_only=True))
    if channel_index is not None:
        chain.append(SelectChannelsd("image", [channel_index[c] for c in cfg.channels]))
    if convention:
        chain.append(ConvertToRegionsd("label", convention))
    chain += [
        Orientationd(keys=keys, axcodes=cfg.orientation, labels=None),
        Spacingd(keys=keys, pixdim=cfg.spacing, mode=modes),
    ]
    if cfg.crop_foreground:
        chain.append(
            CropForegroundd(
                keys=keys, source_key="image", margin=cfg.foreground_margin, allow_smaller=True
            )
        )
    chain.append(
        NormalizeIntensityd(keys="image", nonzero=cfg.normalize_nonzero, channel_wise=True)
    )
    return Compose(chain)


def train_transforms(cfg: TrainConfig, seed: int | None = None) -> Compose:
    """The random chain on cached cases ``{"image": float16, "label": uint8}``.

    Args:
        cfg: Training config (``roi_size``, ``foreground_crops``).
        seed: Seeds the chain's random state (each DataLoader worker reseeds it too).

    Returns:
        A MONAI ``Compose`` giving float32 ``image`` and ``label`` of shape ``[C, *roi_size]``.
    """
    keys = ["image", "label"]
    chain = Compose(
        [
            SpatialPadd(keys=keys, spatial_size=cfg.roi_size),
            RandForegroundCropd(keys, cfg.roi_size, cfg.foreground_crops)
            if cfg.foreground_crops > 0
            else RandSpatialCropd(keys=keys, roi_size=cfg.roi_size, random_size=False),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
            EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False),
            RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
        ]
    )
    if seed is not None:
        chain.set_random_state(seed=seed)
    return chain
