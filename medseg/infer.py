"""Load a trained model artifact and segment preprocessed volumes with it.

A model artifact is a folder or prefix holding ``model.pt`` (the state dict) and ``model.yaml``
(the full :class:`~medseg.config.MedsegConfig`): a run's ``runs/ID/model``, a registered
``models/NAME/vN``, or KServe's ``/mnt/models``. Everything needed to rebuild the network, the
preprocessing and the inference settings comes from ``model.yaml``; evaluation and the model
server both segment through :class:`Segmenter`.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import yaml
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Invertd

from medseg.config import REGIONS, MedsegConfig
from medseg.errors import MedsegError, ObjectNotFound
from medseg.labels import get_convention
from medseg.model import build_network
from medseg.storage import Storage, join
from medseg.transforms import static_transforms

__all__ = ["CaseSegmentation", "Segmenter", "load_model", "segment_case"]


@dataclass
class Segmenter:
    """A network in eval mode with the config it was trained with.

    Attributes:
        cfg: The model's config (``model.yaml``).
        net: The network, on ``device``, in eval mode.
        device: Where inference runs (CUDA when present).
    """

    cfg: MedsegConfig
    net: torch.nn.Module
    device: torch.device

    @torch.no_grad()
    def probabilities(
        self, image: torch.Tensor, check: Callable[[], None] | None = None
    ) -> torch.Tensor:
        """Per-region sigmoid probabilities by sliding-window inference.

        Args:
            image: A preprocessed volume ``[C, X, Y, Z]`` (any float dtype).
            check: Called before each window batch; it raises to abandon the work.

        Returns:
            Float32 probabilities ``[3, X, Y, Z]`` (TC, WT, ET) on the CPU.
        """
        batch = image.to(self.device, torch.float32).unsqueeze(0)
        infer = self.cfg.infer

        def net(x: torch.Tensor) -> torch.Tensor:
            if check is not None:
                check()
            return self.net(x)

        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            logits = sliding_window_inference(
                batch,
                roi_size=infer.roi_size,
                sw_batch_size=infer.sw_batch_size,
                predictor=net,
                overlap=infer.overlap,
                mode="gaussian",
            )
        assert isinstance(logits, torch.Tensor)
        return torch.sigmoid(logits[0].float()).cpu()

    def segment(self, image: torch.Tensor) -> torch.Tensor:
        """Binary region masks ``[3, X, Y, Z]`` (uint8) at the configured threshold."""
        return (self.probabilities(image) > self.cfg.infer.threshold).to(torch.uint8)


def load_model(
    uri: str, storage: Storage | None = None, device: torch.device | str | None = None
) -> Segmenter:
    """Load ``model.yaml`` and ``model.pt`` from ``uri`` (local folder or ``s3://`` prefix).

    Raises:
        MedsegError: If either file is missing or does not fit the other.
    """
    storage = storage or Storage()
    try:
        raw_cfg = storage.get_bytes(join(uri, "model.yaml"))
        weights = storage.get_bytes(join(uri, "model.pt"))
    except ObjectNotFound as exc:
        raise MedsegError(f"{uri} is not a model artifact: {exc}") from None
    try:
        cfg = MedsegConfig.model_validate(yaml.safe_load(raw_cfg) or {})
    except ValueError as exc:
        raise MedsegError(f"{uri}/model.yaml is not a valid medseg config: {exc}") from None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = build_network(cfg.model)
    try:
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise MedsegError(
            f"{uri}/model.pt does not fit the network of model.yaml: {reason}"
        ) from None
    net.to(dev).eval()
    return Segmenter(cfg, net, dev)


@dataclass
class CaseSegmentation:
    """A segmentation in the input's own voxel grid.

    Attributes:
        regions: Binary masks ``[3, X, Y, Z]`` (TC, WT, ET), uint8.
        probabilities: Sigmoid probabilities ``[3, X, Y, Z]``, float32.
        affine: The input's voxel-to-world affine (mm).
        volumes_ml: Volume of each region in millilitres.
    """

    regions: np.ndarray
    probabilities: np.ndarray
    affine: np.ndarray
    volumes_ml: dict[str, float]

    def label_map(self, convention: str = "brats2021") -> np.ndarray:
        """The regions as one label map in ``convention`` (uint8 ``[X, Y, Z]``)."""
        return get_convention(convention).from_regions(self.regions)


def segment_case(
    seg: Segmenter,
    image: np.ndarray,
    affine: np.ndarray,
    check: Callable[[], None] | None = None,
) -> CaseSegmentation:
    """Segment a raw case: the training's static preprocessing, inference, and back.

    Args:
        seg: The loaded model.
        image: ``[4, X, Y, Z]`` in ``seg.cfg.data.channels`` order, as acquired (any float).
        affine: ``4×4`` voxel-to-world affine of ``image``.
        check: Called between the stages and sliding windows; it raises to abandon the work
            (the model server's cancellation of requests whose client has gone).

    Returns:
        Masks and probabilities resampled back onto the input grid (MONAI ``Invertd`` undoes
        the orientation, spacing and crop), and the region volumes in mL. The masks are nested
        (ET ⊆ TC ⊆ WT: a voxel predicted ET counts in TC and WT too), so that the volumes are
        exactly those of the returned label map.
    """
    pre = static_transforms(seg.cfg.data, load=False)
    src = MetaTensor(torch.as_tensor(image, dtype=torch.float32), affine=torch.as_tensor(affine))
    data = pre({"image": src})
    prepared = data["image"]
    if check is not None:
        check()
    probs = seg.probabilities(prepared.as_tensor(), check)
    if check is not None:
        check()
    pred = MetaTensor(
        probs, meta=dict(prepared.meta), applied_operations=list(prepared.applied_operations)
    )
    invert = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)
    back = invert({"pred": pred, "image": prepared})["pred"]
    probabilities = np.ascontiguousarray(torch.as_tensor(back).numpy(), dtype=np.float32)
    # Nest the regions (ET in TC in WT) as a label map does, so the volumes match the mask.
    nested = get_convention("brats2021")
    regions = nested.to_regions(nested.from_regions(probabilities > seg.cfg.infer.threshold))
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    volumes = {r: float(regions[i].sum()) * voxel_ml for i, r in enumerate(REGIONS)}
    return CaseSegmentation(regions, probabilities, np.asarray(affine, np.float64), volumes)
