"""The preprocessed-dataset reader and its local, content-addressed cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medseg.config import DataConfig
from medseg.dataset import PreprocessedDataset
from medseg.errors import DatasetError, EndpointUnreachable
from medseg.ingest import ingest
from medseg.minio_server import MinioServer
from medseg.preprocess import preprocess
from medseg.storage import Storage, join


def test_reader_streams_through_the_cache(
    synth_root: Path, own_minio: MinioServer, tmp_path: Path
) -> None:
    storage = Storage(own_minio.settings(retry_seconds=1))
    storage.ensure_bucket("s3://data")
    ingest(str(synth_root / "brats2021"), "d", "s3://data", storage=storage)
    result = preprocess("d", "s3://data", DataConfig(), storage=storage, progress=False)
    cache = tmp_path / "cache"
    train = PreprocessedDataset(result.prefix, "train", cache_dir=cache, settings=storage.settings)
    val = PreprocessedDataset(
        result.prefix, "validation", cache_dir=cache, settings=storage.settings
    )
    assert (len(train), len(val)) == (5, 1)
    assert {c["case_id"] for c in train.cases}.isdisjoint(c["case_id"] for c in val.cases)

    items = [train[i] for i in range(len(train))]
    for item, entry in zip(items, train.cases, strict=True):
        assert item["case_id"] == entry["case_id"]
        assert item["image"].dtype == torch.float16 and item["label"].dtype == torch.uint8
        assert item["image"].shape[0] == 4 and item["label"].shape[0] == 3
        # The cache holds the object under its sha256, byte-identical to the stored one.
        cached = cache / entry["sha256"][:2] / f"{entry['sha256']}.npz"
        assert cached.read_bytes() == storage.get_bytes(join(result.prefix, entry["key"]))

    # With the object store gone, cached cases still read (and identically); others fail clearly.
    own_minio.kill()
    again = train[0]
    assert torch.equal(again["image"], items[0]["image"])
    with pytest.raises(EndpointUnreachable):
        val[0]


def test_reader_applies_the_transform(
    synth_root: Path, storage: Storage, bucket: str, tmp_path: Path
) -> None:
    ingest(str(synth_root / "brats2021"), "t", bucket, storage=storage)
    result = preprocess("t", bucket, DataConfig(), storage=storage, progress=False)
    ds = PreprocessedDataset(
        result.prefix,
        None,
        cache_dir=tmp_path,
        settings=storage.settings,
        transform=lambda d: {**d, "wt_voxels": int(d["label"][1].sum())},
    )
    assert len(ds) == 6
    assert all(ds[i]["wt_voxels"] > 0 for i in range(len(ds)))
    # DataLoader workers each make their own storage client.
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    assert sorted(item["case_id"] for item in loader) == sorted(c["case_id"] for c in ds.cases)


def test_reader_rejects_a_prefix_without_index(storage: Storage, bucket: str) -> None:
    with pytest.raises(DatasetError, match="not a preprocessed dataset"):
        PreprocessedDataset(join(bucket, "nothing"), settings=storage.settings)
