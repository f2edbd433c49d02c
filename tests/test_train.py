"""Training on a real MinIO: resume from checkpoints, clear errors before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.checkpoint import CheckpointStore
from medseg.config import MedsegConfig
from medseg.errors import DatasetError
from medseg.ingest import ingest
from medseg.preprocess import preprocess
from medseg.storage import Storage, join
from medseg.train import train

TINY = {
    "model": {"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]},
    "train": {"lr": 2e-3, "batch_size": 2, "num_workers": 0, "roi_size": [32, 32, 32]},
    "infer": {"roi_size": [32, 32, 32]},
}


def _cfg(epochs: int) -> MedsegConfig:
    raw = {**TINY, "train": {**TINY["train"], "epochs": epochs}}
    return MedsegConfig.model_validate(raw)


@pytest.fixture
def dataset(synth_root: Path, storage: Storage, bucket: str, s3_env: None) -> str:
    ingest(str(synth_root / "brats2021"), "t", bucket, storage=storage)
    preprocess("t", bucket, _cfg(1).data, storage=storage, progress=False)
    return bucket


def test_resume_continues_at_the_right_epoch(dataset: str, storage: Storage) -> None:
    first = train("t", dataset, "run-a", _cfg(2), storage=storage)
    assert first.resumed_from == 0 and [h["epoch"] for h in first.history] == [1, 2]
    epoch, state = CheckpointStore(storage, first.run_prefix).load_latest()
    assert epoch == 2
    steps_after_2 = state["optimizer"]["state"][0]["step"]

    second = train("t", dataset, "run-a", _cfg(3), storage=storage)
    assert second.resumed_from == 2
    assert [h["epoch"] for h in second.history] == [1, 2, 3]
    assert second.history[:2] == first.history  # the history came back with the checkpoint
    _, state = CheckpointStore(storage, first.run_prefix).load_latest()
    # Adam's step count went on from the saved optimiser state: one more epoch of steps.
    assert state["optimizer"]["state"][0]["step"] == steps_after_2 * 3 / 2
    assert storage.exists(join(first.run_prefix, "model", "model.pt"))
    import yaml

    saved = yaml.safe_load(storage.get_bytes(join(first.run_prefix, "model", "model.yaml")))
    assert MedsegConfig.model_validate(saved) == _cfg(3)
    lines = storage.get_bytes(join(first.run_prefix, "metrics.jsonl")).decode().splitlines()
    assert len(lines) == 3


def test_unpreprocessed_dataset_fails_before_training(
    synth_root: Path, storage: Storage, bucket: str
) -> None:
    ingest(str(synth_root / "brats2021"), "raw-only", bucket, storage=storage)
    with pytest.raises(DatasetError, match="not preprocessed for this config"):
        train("raw-only", bucket, "r", _cfg(1), storage=storage)
    with pytest.raises(DatasetError, match="has no versions"):
        train("absent", bucket, "r", _cfg(1), storage=storage)
