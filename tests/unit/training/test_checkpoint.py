"""Checkpoints on a real MinIO: pruning, the latest pointer, fallback past corrupt ones."""

from __future__ import annotations

import io

import pytest
import torch

from medseg.core.storage import Storage, join, split_s3
from medseg.training.checkpoint import CheckpointError, CheckpointStore


def _state(epoch: int) -> dict:
    return {"epoch": epoch, "weights": torch.full((3,), float(epoch)), "best": 0.5}


def _corrupt(storage: Storage, uri: str) -> None:
    """Replace an object's bytes but keep its recorded sha256 (as bit rot would)."""
    sha = storage.stat(uri).sha256
    bucket, key = split_s3(uri)
    storage._s3().put_object(bucket, key, io.BytesIO(b"garbage"), 7, metadata={"sha256": sha})


def test_save_prune_and_load(storage: Storage, bucket: str) -> None:
    store = CheckpointStore(storage, join(bucket, "runs", "r1"), keep=2)
    assert store.load_latest() is None  # a fresh run
    for epoch in range(1, 5):
        store.save(epoch, _state(epoch))
    assert store.epochs() == [4, 3]
    epoch, state = store.load_latest()
    assert epoch == 4 and torch.equal(state["weights"], torch.full((3,), 4.0))


def test_corrupt_or_missing_latest_falls_back_to_last_good(storage: Storage, bucket: str) -> None:
    prefix = join(bucket, "runs", "r2")
    store = CheckpointStore(storage, prefix)
    for epoch in range(1, 4):
        store.save(epoch, _state(epoch))
    _corrupt(storage, join(prefix, "checkpoints/epoch-0003.pt"))
    epoch, _ = store.load_latest()
    assert epoch == 2
    assert store.skipped[0][0] == "checkpoints/epoch-0003.pt"
    assert "ChecksumMismatch" in store.skipped[0][1]
    storage.delete(join(prefix, "checkpoints/epoch-0002.pt"))  # pointer names 3; 2 is gone
    assert store.load_latest()[0] == 1


def test_no_loadable_checkpoint_is_an_error_not_a_fresh_start(
    storage: Storage, bucket: str
) -> None:
    prefix = join(bucket, "runs", "r3")
    store = CheckpointStore(storage, prefix)
    store.save(1, _state(1))
    _corrupt(storage, join(prefix, "checkpoints/epoch-0001.pt"))
    with pytest.raises(CheckpointError, match="refusing to restart from scratch"):
        store.load_latest()


@pytest.fixture(params=["s3", "local"])
def run_root(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "s3":
        return request.getfixturevalue("bucket")
    return str(tmp_path / "store")


def _overwrite_plainly(storage: Storage, uri: str, data: bytes) -> None:
    """Replace an object as any S3 client (or a file copy) would: no checksum metadata."""
    if uri.startswith("s3://"):
        bucket, key = split_s3(uri)
        storage._s3().put_object(bucket, key, io.BytesIO(data), len(data))
    else:
        with open(uri, "wb") as fh:
            fh.write(data)


def test_garbage_newest_checkpoint_falls_back_to_the_newest_valid(
    storage: Storage, run_root: str
) -> None:
    prefix = join(run_root, "runs", "garbage")
    store = CheckpointStore(storage, prefix)
    for epoch in range(1, 4):
        store.save(epoch, _state(epoch))
    _overwrite_plainly(storage, join(prefix, "checkpoints/epoch-0003.pt"), b"\x80garbage" * 64)
    epoch, state = store.load_latest()
    assert epoch == 2 and torch.equal(state["weights"], torch.full((3,), 2.0))
    key, reason = store.skipped[0]
    assert key == "checkpoints/epoch-0003.pt" and "ChecksumMismatch" in reason
    # Another valid checkpoint's bytes under the newest name are caught by the index too.
    blob = storage.get_bytes(join(prefix, "checkpoints/epoch-0001.pt"))
    _overwrite_plainly(storage, join(prefix, "checkpoints/epoch-0002.pt"), blob)
    assert store.load_latest()[0] == 1


def test_unindexed_unreadable_checkpoint_is_skipped(storage: Storage, run_root: str) -> None:
    prefix = join(run_root, "runs", "unindexed")
    store = CheckpointStore(storage, prefix)
    store.save(1, _state(1))
    storage.delete(join(prefix, "checkpoints", "latest.json"))  # no index to check against
    _overwrite_plainly(storage, join(prefix, "checkpoints/epoch-0002.pt"), b"not a zip")
    epoch, _ = store.load_latest()
    assert epoch == 1
    assert store.skipped[0][0] == "checkpoints/epoch-0002.pt"
    assert "not a loadable checkpoint" in store.skipped[0][1]
