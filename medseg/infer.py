"""Load a trained model artifact and segment preprocessed volumes with it.

A model artifact is a folder or prefix holding ``model.pt`` (the state dict) and ``model.yaml``
(the full :class:`~medseg.config.MedsegConfig`): a run's ``runs/ID/model``, a registered
``models/NAME/vN``, or KServe's ``/mnt/models``. Everything needed to rebuild the network, the
preprocessing and the inference settings comes from ``model.yaml``; evaluation and the model
server both segment through :class:`Segmenter`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
import yaml
from monai.inferers import sliding_window_inference

from medseg.config import MedsegConfig
from medseg.errors import MedsegError, ObjectNotFound
from medseg.model import build_network
from medseg.storage import Storage, join

__all__ = ["Segmenter", "load_model"]


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
    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Per-region sigmoid probabilities by sliding-window inference.

        Args:
            image: A preprocessed volume ``[C, X, Y, Z]`` (any float dtype).

        Returns:
            Float32 probabilities ``[3, X, Y, Z]`` (TC, WT, ET) on the CPU.
        """
        batch = image.to(self.device, torch.float32).unsqueeze(0)
        infer = self.cfg.infer
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            logits = sliding_window_inference(
                batch,
                roi_size=infer.roi_size,
                sw_batch_size=infer.sw_batch_size,
                predictor=self.net,
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
    except (RuntimeError, ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0]
        raise MedsegError(
            f"{uri}/model.pt does not fit the network of model.yaml: {reason}"
        ) from None
    net.to(dev).eval()
    return Segmenter(cfg, net, dev)
