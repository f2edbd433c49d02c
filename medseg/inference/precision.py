"""Mixed precision and memory format: the GPU path's two switches, defined once.

Training (:mod:`medseg.training.train`) and inference (:mod:`medseg.inference.infer`) both run the
network under
:func:`autocast` and lay tensors out by :func:`memory_format`. Autocast is a CUDA feature here:
on the CPU it stays off whatever the config says (CPU autocast to bfloat16 is slower than FP32 on
CPUs without native bf16, such as this project's AVX2 machines), so the CPU path is exactly the
FP32 path. Channels-last (NDHWC) applies on any device when asked for.
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


def memory_format(channels_last: bool) -> torch.memory_format:
    """``torch.channels_last_3d`` when asked for, else the default contiguous layout."""
    return torch.channels_last_3d if channels_last else torch.contiguous_format
