"""The shared configuration: defaults from the product brief, YAML round trip, fingerprints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from medseg.config import DataConfig, MedsegConfig
from medseg.core.errors import InvalidInput


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


def test_a_model_yaml_without_a_task_is_brats(tmp_path: Path) -> None:
    """Every model.yaml written before tasks existed loads as BraTS, its sections unchanged."""
    from medseg.tasks import task_of

    cfg = MedsegConfig.model_validate({"train": {"epochs": 3}})
    old = yaml.safe_load(cfg.to_yaml())
    assert old.pop("task") == {"kind": "brats-segmentation", "loss": "dice"}
    assert list(old) == ["data", "split", "model", "train", "infer"]
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    loaded = MedsegConfig.load(path)
    assert loaded == cfg and task_of(loaded).name == "brats-segmentation"
    assert task_of(loaded).outputs.names == ("TC", "WT", "ET")
    assert loaded.data.fingerprint() == cfg.data.fingerprint()  # the cache keys stay


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"task": {"kind": "skin"}}, "unknown task 'skin'; known: brats-segmentation"),
        ({"task": {"name": "x"}}, "needs a 'kind'"),
        ({"model": {"out_channels": 2}}, "model.out_channels is 2, task brats-segmentation has 3"),
        ({"model": {"in_channels": 3}}, "model.in_channels is 3"),
        ({"model": {"name": "UNet"}}, "model.name 'UNet' is not a network of task"),
        ({"data": {"channels": ["a", "b", "c", "d"]}}, "permutation of task brats-segmentation"),
    ],
)
def test_the_config_must_fit_its_task(section: dict, message: str, tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(section))
    with pytest.raises(InvalidInput, match=re.escape(message)):
        MedsegConfig.load(path)


def test_an_epochs_override_applies_above_zero_only() -> None:
    cfg = MedsegConfig()
    assert cfg.with_epochs(0) is cfg and cfg.with_epochs(-1) is cfg
    changed = cfg.with_epochs(3)
    assert changed.train.epochs == 3 and cfg.train.epochs != 3
    assert changed.model_copy(update={"train": cfg.train}) == cfg  # nothing else moved
