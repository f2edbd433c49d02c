"""The segmentation network, built from the config alone.

Training, evaluation and the model server all build the network here from ``model.yaml``; no
architecture is hard-coded anywhere else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config names the task, whose network this is: no import at run time
    from monai.networks.nets import SegResNet

    from medseg.config import ModelConfig

__all__ = ["build_network", "size_multiple"]


def build_network(cfg: ModelConfig) -> SegResNet:
    """MONAI SegResNet with the configured hyper-parameters (weights freshly initialised)."""
    from monai.networks.nets import SegResNet  # here: the config imports this module, torch-free

    return SegResNet(
        blocks_down=cfg.blocks_down,
        blocks_up=cfg.blocks_up,
        init_filters=cfg.init_filters,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        dropout_prob=cfg.dropout_prob,
    )


def size_multiple(cfg: ModelConfig) -> int:
    """What every spatial size of the network's input must be a multiple of.

    SegResNet halves the resolution ``len(blocks_down) - 1`` times and doubles it back, so a
    size that does not divide evenly comes out of the decoder with another shape.
    """
    return int(2 ** (len(cfg.blocks_down) - 1))
