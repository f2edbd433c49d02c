"""The region tasks' training loss (``task.loss``): each choice against its published formula."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medseg.config import MedsegConfig
from medseg.core.errors import InvalidInput
from medseg.tasks import get_task
from medseg.tasks.brats import BratsTaskConfig


def _soft_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - 2|PG| / (|P|² + |G|² + 1e-5) per sample and region (squared denominators), mean."""
    p, axes = logits.sigmoid(), tuple(range(2, logits.ndim))
    inter = (p * target).sum(axes)
    return (1 - 2 * inter / ((p * p).sum(axes) + (target * target).sum(axes) + 1e-5)).mean()


def _focal(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017) without class weighting: -(1 - p_t)^gamma log p_t."""
    p = logits.sigmoid()
    p_t = torch.where(target > 0, p, 1 - p)
    return (-((1 - p_t) ** gamma) * torch.log(p_t)).mean()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 6, 5, 4, generator=gen, dtype=torch.float64)
    target = (torch.rand(2, 3, 6, 5, 4, generator=gen) > 0.7).double()
    return logits, target


def test_the_default_loss_is_the_tutorials_soft_dice(batch) -> None:
    brats = get_task("brats-segmentation")
    loss = brats.loss(MedsegConfig().task)
    assert MedsegConfig().task == BratsTaskConfig(loss="dice")
    assert float(loss(*batch)) == pytest.approx(float(_soft_dice(*batch)), rel=1e-9)


def test_dice_focal_adds_the_focal_loss(batch) -> None:
    cfg = MedsegConfig.model_validate(
        {"task": {"kind": "brats-segmentation", "loss": "dice_focal"}}
    )
    loss = get_task(cfg.task.kind).loss(cfg.task)
    want = _soft_dice(*batch) + _focal(*batch)
    assert float(loss(*batch)) == pytest.approx(float(want), rel=1e-6)
    logits = batch[0].clone().requires_grad_(True)
    loss(logits, batch[1]).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_an_unknown_loss_names_the_file_and_the_choices(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text("task:\n  kind: brats-segmentation\n  loss: focal\n")
    with pytest.raises(InvalidInput) as err:
        MedsegConfig.load(path)
    assert str(path) in str(err.value) and "dice_focal" in str(err.value)
