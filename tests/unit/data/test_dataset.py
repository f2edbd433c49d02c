"""The preprocessed-dataset reader and its local, content-addressed cache."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch

from medseg.apps.minio_server import MinioServer
from medseg.config import DataConfig
from medseg.core.errors import DatasetError, EndpointUnreachable
from medseg.core.storage import Storage, join
from medseg.data.dataset import PreprocessedDataset
from medseg.data.ingest import ingest
from medseg.data.preprocess import preprocess


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
    # A process forked after the index was read (a DataLoader worker under "fork") makes its own
    # client: the parent's open connections are not shared between processes.
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(
        target=lambda: send.send(
            (id(ds.storage), len(ds.storage.get_json(join(ds.prefix, "index.json"))["cases"]))
        )
    )
    child.start()
    client, cases = receive.recv()
    child.join(30)
    assert child.exitcode == 0
    assert client != id(ds.storage) and cases == len(ds)


def test_reader_rejects_a_prefix_without_index(storage: Storage, bucket: str) -> None:
    with pytest.raises(DatasetError, match="not a preprocessed dataset"):
        PreprocessedDataset(join(bucket, "nothing"), settings=storage.settings)


@pytest.fixture(scope="module")
def preprocessed(synth_root: Path, minio_server: MinioServer) -> str:
    """A preprocessed prefix of the six BraTS 2021 cases on the session MinIO (read-only)."""
    storage = Storage(minio_server.settings())
    storage.ensure_bucket("s3://integrity-reader")
    ingest(str(synth_root / "brats2021"), "d", "s3://integrity-reader", storage=storage)
    return preprocess("d", "s3://integrity-reader", DataConfig(), storage=storage, progress=False)


def test_a_case_overwritten_with_another_cases_bytes_is_detected(
    preprocessed, storage: Storage, bucket: str, tmp_path: Path
) -> None:
    import io

    from medseg.core.errors import ChecksumMismatch
    from medseg.core.storage import split_s3

    # A copy of the prefix, so the shared one stays intact.
    prefix = join(bucket, "pre")
    for obj in storage.list(preprocessed.prefix):
        storage.put_bytes(prefix + obj.uri[len(preprocessed.prefix) :], storage.get_bytes(obj.uri))
    ds = PreprocessedDataset(prefix, None, cache_dir=tmp_path / "cache", settings=storage.settings)
    victim, donor = ds.cases[0], ds.cases[1]
    # Replaced by a plain S3 put, without checksum metadata, as any S3 client would.
    other = storage.get_bytes(join(prefix, donor["key"]))
    b, key = split_s3(join(prefix, victim["key"]))
    storage._s3().put_object(b, key, io.BytesIO(other), len(other))
    with pytest.raises(ChecksumMismatch, match=f"case {victim['case_id']}: "):
        ds[0]
    assert not (tmp_path / "cache" / victim["sha256"][:2] / f"{victim['sha256']}.npz").exists()
    assert ds[1]["case_id"] == donor["case_id"]  # the untouched case still reads


def test_a_full_cache_disk_is_a_clear_error(
    preprocessed, storage: Storage, tiny_disk: Path
) -> None:
    from medseg.core.errors import DiskFull

    ds = PreprocessedDataset(
        preprocessed.prefix, None, cache_dir=tiny_disk / "cache", settings=storage.settings
    )
    with pytest.raises(DiskFull, match=r"no space left in .*tiny/cache/.*needs .*MEDSEG_CACHE_DIR"):
        for i in range(len(ds)):  # ~0.8 MiB per case: the 1 MiB disk holds one
            ds[i]


def test_each_draw_is_seeded_by_its_place_in_the_epoch(
    synth_root: Path, storage: Storage, bucket: str, tmp_path: Path
) -> None:
    from medseg.config import TrainConfig
    from medseg.data.transforms import train_transforms

    ingest(str(synth_root / "brats2021"), "s", bucket, storage=storage)
    result = preprocess("s", bucket, DataConfig(), storage=storage, progress=False)
    t = TrainConfig(roi_size=(32, 32, 32))
    ds = PreprocessedDataset(
        result.prefix, None, cache_dir=tmp_path, settings=storage.settings,
        transform=train_transforms(t, t.seed), seed=t.seed,
    )  # fmt: skip

    def crop(epoch: int, draw: int, case: int) -> torch.Tensor:
        return torch.as_tensor(ds[(epoch, draw, case)]["image"])

    first = crop(1, 3, 0)
    # The same draw is the same crop and flips, whenever and by whichever process it is made ...
    crop(1, 4, 2)
    assert torch.equal(crop(1, 3, 0), first)
    # ... and a case drawn twice in one epoch (sampling with replacement) is augmented twice.
    assert not torch.equal(crop(1, 5, 0), first)
    assert not torch.equal(crop(2, 3, 0), first)
