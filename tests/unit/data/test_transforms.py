"""Transform chains: the random training chain and the region conversion."""

from __future__ import annotations

import torch

from medseg.config import ModelConfig, TrainConfig
from medseg.data.transforms import ConvertToRegionsd, train_transforms
from medseg.tasks.networks import build_network


def _case(shape: tuple[int, int, int] = (40, 36, 20)) -> dict:
    g = torch.Generator().manual_seed(0)
    image = torch.randn((4, *shape), generator=g).half()
    label = torch.zeros((3, *shape), dtype=torch.uint8)
    label[:, 10:20, 10:20, 5:10] = 1
    return {"image": image, "label": label}


def test_train_chain_pads_crops_and_casts_after_the_crop() -> None:
    cfg = TrainConfig(roi_size=(32, 32, 32))
    out = train_transforms(cfg, seed=1)(_case())
    assert out["image"].shape == (4, 32, 32, 32) and out["label"].shape == (3, 32, 32, 32)
    assert out["image"].dtype == torch.float32 and out["label"].dtype == torch.float32
    assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}  # intensity ops spare labels


def test_train_chain_is_seeded() -> None:
    cfg = TrainConfig(roi_size=(24, 24, 16))
    a = train_transforms(cfg, seed=3)(_case())
    b = train_transforms(cfg, seed=3)(_case())
    c = train_transforms(cfg, seed=4)(_case())
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], c["image"])


def test_regions_transform_keeps_inputs_untouched() -> None:
    label = torch.tensor([[[[0, 1, 2, 4]]]])
    data = {"label": label}
    out = ConvertToRegionsd("label", "brats2021")(data)
    assert data["label"] is label and out["label"].shape == (3, 1, 1, 4)
    assert out["label"][:, 0, 0].tolist() == [[0, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 1]]


def test_network_from_config() -> None:
    net = build_network(ModelConfig(init_filters=8)).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 4, 32, 32, 32))
    assert out.shape == (1, 3, 32, 32, 32)


def test_building_the_chain_prints_no_nvimagecodec_notice() -> None:
    """MONAI's LoadImage builds its GPU DICOM reader, which said "nvImageCodec is not available"
    (a log record and a warning) in every command; medseg never uses that reader."""
    import subprocess
    import sys

    code = (
        "from medseg.config import DataConfig\n"
        "from medseg.data.transforms import static_transforms\n"
        "static_transforms(DataConfig())\n"
        "print('built')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "built"
    assert "nvImageCodec" not in run.stderr and "NvImgCodec" not in run.stderr, run.stderr


def _foreground_share(cfg: TrainConfig, seeds: range) -> float:
    """Share of the chain's crops that hold a labelled voxel, over one crop per seed."""
    case = _case((64, 64, 48))
    case["label"] = torch.zeros_like(case["label"])
    case["label"][:, 2:8, 2:8, 2:6] = 1  # a small lesion in one corner
    hits = [bool(train_transforms(cfg, seed=s)(case)["label"].any()) for s in seeds]
    return sum(hits) / len(hits)


def test_foreground_crops_raise_the_share_of_crops_with_a_lesion() -> None:
    uniform = _foreground_share(TrainConfig(roi_size=(16, 16, 16)), range(40))
    balanced = TrainConfig(roi_size=(16, 16, 16), foreground_crops=0.5)
    always = TrainConfig(roi_size=(16, 16, 16), foreground_crops=1.0)
    assert uniform < 0.2  # the lesion is in 1 of ~50 crop positions' reach
    assert 0.3 <= _foreground_share(balanced, range(40)) <= 0.8
    assert _foreground_share(always, range(40)) == 1.0
    out = train_transforms(always, seed=0)(_case())
    assert isinstance(out, dict) and out["image"].shape == (4, 16, 16, 16)
