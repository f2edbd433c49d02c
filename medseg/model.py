"""The segmentation network, built from the config alone.

Training, evaluation and the model server all build the network here from ``model.yaml``; no
architecture is hard-coded anywhere else.
"""

from __future__ import annotations

from monai.networks.nets import SegResNet

from medseg.config import ModelConfig

__all__ = ["build_network"]


def build_network(cfg: ModelConfig) -> SegResNet:
    """MONAI SegResNet with the configured hyper-parameters (weights freshly initialised)."""
    return SegResNet(
        blocks_down=cfg.blocks_down,
        blocks_up=cfg.blocks_up,
        init_filters=cfg.init_filters,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        dropout_prob=cfg.dropout_prob,
    )
