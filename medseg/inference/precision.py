"""Mixed precision and memory format: the GPU path's two switches, defined once.

Training (:mod:`medseg.training.train`) and inference (:mod:`medseg.inference.infer`) both run the
network under :func:`autocast` and lay tensors out by :func:`memory_format`. Autocast is a CUDA
feature here: on the CPU it stays off whatever the config says (CPU autocast to bfloat16 is slower
than FP32 on CPUs without native bf16, such as this project's AVX2 machines), so the CPU path is
exactly the FP32 path. Channels-last (NDHWC) applies on any device when asked for.
"""

from __future__ import annotations

import torch

from medseg.config import AmpDtype

__all__ = ["autocast", "memory_format"]


def autocast(device: torch.device, enabled: bool, dtype: AmpDtype) -> torch.autocast:
    """The autocast context for ``device``: on only when ``enabled`` and ``device`` is CUDA.

    Args:
        device: Where the network runs.
        enabled: The config's switch (``train.amp`` / ``infer.amp``).
        dtype: The half-precision type (``train.amp_dtype`` / ``infer.amp_dtype``).

    Returns:
        A ``torch.autocast`` context manager (disabled on the CPU).
    """
    on = enabled and device.type == "cuda"
    # torch.autocast checks the dtype against the device even when disabled: CPU takes bf16.
    kind = getattr(torch, dtype) if on else torch.bfloat16
    return torch.autocast(device.type, dtype=kind, enabled=on)


def memory_format(channels_last: bool, spatial_dims: int) -> torch.memory_format:
    """The layout of ``[B, C, *spatial]`` tensors and of the convolution weights that read them.

    Channels-last follows the rank: ``torch.channels_last`` for images (2 spatial axes, 4D
    tensors), ``torch.channels_last_3d`` for volumes (3 spatial axes, 5D tensors). Without
    ``channels_last`` (or for another rank, which has no channels-last layout), the default
    contiguous layout.

    Args:
        channels_last: Whether the config asks for channels-last (``train.channels_last`` /
            ``infer.channels_last``).
        spatial_dims: The spatial axes of the tensors (the task's ``inputs.spatial_dims``).
    """
    if not channels_last:
        return torch.contiguous_format
    return {2: torch.channels_last, 3: torch.channels_last_3d}.get(
        spatial_dims, torch.contiguous_format
    )
