"""Load a trained model artifact and segment preprocessed volumes with it.

A model artifact is a folder or prefix holding ``model.pt`` (the state dict) and ``model.yaml``
(the full :class:`~medseg.config.MedsegConfig`): a run's ``runs/ID/model``, a registered
``models/NAME/vN``, or KServe's ``/mnt/models``. Everything needed to rebuild the network, the
preprocessing and the inference settings comes from ``model.yaml``; evaluation and the model
server both segment through :class:`Segmenter`, and :func:`segment_case` is the one function
that turns a raw case into the answer (label map on the case's own grid and volumes) for the
server, ``medseg predict`` and batch prediction alike.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Invertd

from medseg.artifact.files import (
    CONFIG_FILE,
    GRAPH_FILE,
    WEIGHTS_FILE,
    Artifact,
    parse_config,
    read_config,
    recorded_hashes,
)
from medseg.config import Engine, MedsegConfig
from medseg.core.errors import MedsegError
from medseg.core.storage import Storage
from medseg.data.transforms import static_transforms
from medseg.inference.engine import Forward, choose_engine, graph_forward, weights_digest
from medseg.inference.precision import autocast, memory_format
from medseg.tasks import Task, get_convention, task_of
from medseg.tasks.networks import size_multiple

__all__ = [
    "CaseSegmentation",
    "Segmenter",
    "load_model",
    "load_network",
    "pad_to_multiple",
    "parse_config",
    "read_config",
    "recorded_hashes",
    "segment_case",
]


@dataclass
class Segmenter:
    """A network in eval mode with the config it was trained with.

    Attributes:
        cfg: The model's config (``model.yaml``).
        net: The network, on ``device``, in eval mode (the reference).
        device: Where inference runs (CUDA when present).
        forward: The forward pass of an exported graph (see :mod:`medseg.inference.engine`);
            ``None``: ``net`` runs, under the config's autocast and memory format.
        engine: The engine that runs (``torch``, ``onnxruntime`` or ``openvino``).
    """

    cfg: MedsegConfig
    net: torch.nn.Module
    device: torch.device
    forward: Forward | None = None
    engine: str = "torch"

    @property
    def task(self) -> Task:
        """The task of the model's config (``model.yaml``'s ``task``)."""
        return task_of(self.cfg)

    def one_window(self, spatial: tuple[int, ...]) -> bool:
        """Whether a preprocessed volume of this size runs as one window (``infer.window``).

        ``volume`` windows up to ``infer.volume_max_voxels`` (after padding); larger volumes,
        and every volume under ``sliding``, run in ``roi_size`` windows.
        """
        infer = self.cfg.infer
        if infer.window != "volume":
            return False
        multiple = size_multiple(self.cfg.model)
        return math.prod(-(-n // multiple) * multiple for n in spatial) <= infer.volume_max_voxels

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """The engine's forward pass on a batch ``[B, C, *spatial]`` (windows or images).

        A graph engine (:attr:`forward`) runs float32 on the CPU; the PyTorch network runs on
        :attr:`device` in the config's memory format (autocast, where it applies, is the
        caller's: :meth:`probabilities` sets it).
        """
        if self.forward is not None:
            return self.forward(batch.to("cpu", torch.float32))
        layout = memory_format(self.cfg.infer.channels_last, batch.dim() - 2)
        return self.net(batch.to(self.device, torch.float32).contiguous(memory_format=layout))

    @torch.no_grad()
    def probabilities(
        self, image: torch.Tensor, check: Callable[[], None] | None = None
    ) -> torch.Tensor:
        """Per-output probabilities, in one window or sliding ones (``infer.window``).

        One window: the volume is zero-padded at its far ends up to
        :func:`~medseg.tasks.networks.size_multiple` (zero is the background of a normalised volume,
        and what the sliding windows pad with too), and the logits are cut back to its size.

        Args:
            image: A preprocessed volume ``[C, X, Y, Z]`` (any float dtype).
            check: Called before each window batch; it raises to abandon the work.

        Returns:
            Float32 probabilities ``[n_outputs, X, Y, Z]`` (the task's outputs, activated by
            :meth:`~medseg.tasks.Task.activate`) on the CPU; zeros, without running the network,
            for a volume of no voxels (the foreground crop of an all-zero case).
        """
        infer = self.cfg.infer
        if 0 in image.shape[1:]:  # an empty foreground (an all-zero case): no region anywhere
            outputs = len(self.task.outputs.names)
            return torch.zeros((outputs, *image.shape[1:]), dtype=torch.float32)
        where = "cpu" if self.forward is not None else self.device
        batch = image.to(where, torch.float32).unsqueeze(0)

        def net(x: torch.Tensor) -> torch.Tensor:
            if check is not None:
                check()
            return self.logits(x)

        with autocast(self.device, infer.amp, infer.amp_dtype):
            logits: Any
            if self.one_window(tuple(image.shape[1:])):
                x, y, z = image.shape[1:]
                logits = net(pad_to_multiple(batch, size_multiple(self.cfg.model)))
                logits = logits[..., :x, :y, :z]
            else:
                logits = sliding_window_inference(
                    batch,
                    roi_size=infer.roi_size,
                    sw_batch_size=infer.sw_batch_size,
                    predictor=net,
                    overlap=infer.overlap,
                    mode="gaussian",
                )
        assert isinstance(logits, torch.Tensor)
        return self.task.activate(logits[0].float()).cpu()

    def segment(self, image: torch.Tensor) -> torch.Tensor:
        """The task's masks ``[n_outputs, X, Y, Z]`` (uint8): BraTS's nested regions."""
        probs = self.probabilities(image).numpy()
        return torch.from_numpy(self.task.postprocess(probs, self.cfg.infer))


def pad_to_multiple(batch: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad ``[B, C, *spatial]`` at the far end of each spatial axis to a multiple."""
    pads: list[int] = []
    for n in reversed(batch.shape[2:]):  # torch's pad takes the last axis first
        pads += [0, -n % multiple]
    return torch.nn.functional.pad(batch, pads) if any(pads) else batch


def load_network(cfg: MedsegConfig, weights: bytes, uri: str) -> torch.nn.Module:
    """The network of ``cfg`` holding ``weights`` (the bytes of ``uri``'s ``model.pt``), on the CPU.

    Raises:
        MedsegError: If the weights do not fit the network.
    """
    net = task_of(cfg).build_network(cfg.model)
    try:
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise MedsegError(
            f"{uri}/{WEIGHTS_FILE} does not fit the network of {CONFIG_FILE}: {reason}"
        ) from None
    return net.eval()


def load_model(
    uri: str,
    storage: Storage | None = None,
    device: torch.device | str | None = None,
    engine: Engine | None = None,
) -> Segmenter:
    """Load ``model.yaml`` and ``model.pt`` (and ``model.onnx``) from ``uri`` (folder or ``s3://``).

    Each file is checked against the sha256 the artifact's record holds
    (:func:`medseg.artifact.files.recorded_hashes`): a copy of a registered version, such as
    KServe's ``/mnt/models``, is served only if it is byte for byte the version its card describes.
    A file the record lists must be there.

    Args:
        uri: The model artifact.
        storage: Storage to use; from the environment when omitted.
        device: Where PyTorch runs; CUDA when present, else the CPU.
        engine: Overrides the config's ``infer.engine`` (see :mod:`medseg.inference.engine`).

    Raises:
        MedsegError: If a file is missing, differs from its record, or does not fit the others,
            or the engine asked for cannot run (see :mod:`medseg.inference.engine` for which cases
            are errors).
    """
    storage = storage or Storage()
    artifact = Artifact.open(uri, storage)
    cfg, weights = artifact.read_model()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = load_network(cfg, weights, uri)
    layout = memory_format(cfg.infer.channels_last, task_of(cfg).inputs.spatial_dims)
    net.to(dev).to(memory_format=layout).eval()
    graph = artifact.read(GRAPH_FILE)
    chosen = choose_engine(
        engine or cfg.infer.engine, graph is not None, dev, uri, cfg.infer.precision
    )
    if chosen == "torch":
        return Segmenter(cfg, net, dev)
    assert graph is not None
    forward = graph_forward(chosen, graph, cfg, weights_digest(weights), uri)
    return Segmenter(cfg, net, dev, forward=forward, engine=chosen)


@dataclass
class CaseSegmentation:
    """A segmentation in the input's own voxel grid.

    Attributes:
        regions: Binary masks ``[n_outputs, X, Y, Z]`` in the task's output order, uint8.
        probabilities: Probabilities, the same shape, float32.
        affine: The input's voxel-to-world affine (mm).
        volumes_ml: Volume of each region in millilitres.
        default_convention: The task's label convention for :meth:`label_map`.
    """

    regions: np.ndarray
    probabilities: np.ndarray
    affine: np.ndarray
    volumes_ml: dict[str, float]
    default_convention: str = ""

    def label_map(self, convention: str | None = None) -> np.ndarray:
        """The regions as one label map in ``convention`` (uint8 ``[X, Y, Z]``).

        Without one, the task's default (BraTS: ``brats2021``).
        """
        return get_convention(convention or self.default_convention).from_regions(self.regions)


def segment_case(
    seg: Segmenter,
    image: np.ndarray,
    affine: np.ndarray,
    check: Callable[[], None] | None = None,
) -> CaseSegmentation:
    """Segment a raw case: the training's static preprocessing, inference, and back.

    Args:
        seg: The loaded model.
        image: ``[C, X, Y, Z]`` in ``seg.cfg.data.channels`` order, as acquired (any float).
        affine: ``4×4`` voxel-to-world affine of ``image``.
        check: Called between the stages and sliding windows; it raises to abandon the work
            (the model server's cancellation of requests whose client has gone).

    Returns:
        Probabilities resampled back onto the input grid (MONAI ``Invertd`` undoes the
        orientation, spacing and crop), the masks the task makes of them
        (:meth:`~medseg.tasks.Task.postprocess`: BraTS nests its regions by the model's
        ``infer.nesting``), and the region volumes in mL. A
        label map of these masks holds exactly these regions, so its volumes and its scores are
        the masks' own.
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
    task = seg.task
    regions = task.postprocess(probabilities, seg.cfg.infer)
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    volumes = {r: float(regions[i].sum()) * voxel_ml for i, r in enumerate(task.outputs.names)}
    return CaseSegmentation(
        regions, probabilities, np.asarray(affine, np.float64), volumes, task.default_convention
    )
