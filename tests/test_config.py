"""The shared configuration: defaults from the product brief, YAML round trip, fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from medseg.config import DataConfig, MedsegConfig


def test_defaults_follow_the_brief() -> None:
    cfg = MedsegConfig()
    assert cfg.data.channels == ("t1", "t1gd", "t2", "flair")
    assert cfg.model.blocks_down == (1, 2, 2, 4) and cfg.model.init_filters == 16
    assert cfg.train.lr == 2.5e-4 and cfg.train.weight_decay == 1e-5


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = MedsegConfig.model_validate({"data": {"spacing": [1, 1, 2]}, "train": {"epochs": 3}})
    path = tmp_path / "model.yaml"
    path.write_text(cfg.to_yaml())
    assert MedsegConfig.load(path) == cfg


def test_fingerprint_tracks_preprocessing_only() -> None:
    base = DataConfig()
    assert base.fingerprint() == DataConfig().fingerprint()
    assert base.fingerprint() != DataConfig(spacing=(2.0, 2.0, 2.0)).fingerprint()
    assert base.fingerprint() != DataConfig(channels=("flair", "t1", "t1gd", "t2")).fingerprint()


@pytest.mark.parametrize(
    "bad",
    [
        {"data": {"channels": ["t1", "t1", "t2", "flair"]}},
        {"train": {"epochs": 0}},
        {"data": {"unknown": 1}},
    ],
)
def test_invalid_config_rejected(bad: dict) -> None:
    with pytest.raises(ValidationError):
        MedsegConfig.model_validate(bad)
