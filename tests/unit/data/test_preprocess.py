"""Static preprocessing on a real MinIO: label conventions agree, caching, resume, parallelism."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.config import DataConfig
from medseg.core.errors import DatasetError
from medseg.core.storage import Storage, join
from medseg.data.dataset import load_case
from medseg.data.ingest import ingest
from medseg.data.preprocess import preprocess

LAYOUTS = ("brats2021", "brats2023", "msd")


@pytest.fixture(scope="module")
def preprocessed(synth_root, minio_server, tmp_path_factory):
    """The same six cases ingested and preprocessed from each of the three layouts."""
    storage = Storage(minio_server.settings())
    bucket = "s3://pre-module"
    storage.ensure_bucket(bucket)
    out = {}
    for layout in LAYOUTS:
        ref = ingest(str(synth_root / layout), layout, bucket, storage=storage).ref
        result = preprocess(layout, bucket, DataConfig(), storage=storage, progress=False)
        cases = {}
        for entry in result.index["cases"]:
            path = tmp_path_factory.mktemp("npz") / "c.npz"
            storage.get_file(join(result.prefix, entry["key"]), path)
            cases[entry["case_id"]] = load_case(path)
        out[layout] = (ref, result, cases)
    return out


def _case_number(layout: str, case_id: str) -> int:
    """The synthetic index behind each layout's case naming."""
    if layout == "msd":
        return int(case_id.split("_")[1]) - 1
    return int(case_id.replace("BraTS2021_", "").replace("BraTS-GLI-", "")[:5])


def test_all_conventions_give_identical_regions(preprocessed) -> None:
    by_index = {
        layout: {_case_number(layout, cid): arr for cid, arr in preprocessed[layout][2].items()}
        for layout in LAYOUTS
    }
    assert sorted(by_index["msd"]) == list(range(6))
    for i in range(6):
        ref = by_index["brats2021"][i]
        assert ref["label"].shape[0] == 3 and ref["label"].sum() > 0
        for layout in ("brats2023", "msd"):
            other = by_index[layout][i]
            assert np.array_equal(other["label"], ref["label"]), (layout, i)
            # Images differ only by the integer rounding of the BraTS files vs MSD float32.
            assert np.abs(other["image"].astype(np.float32) - ref["image"]).max() < 0.05


def test_outputs_are_typed_oriented_and_normalised(preprocessed) -> None:
    _, result, cases = preprocessed["brats2021"]
    for cid, arr in cases.items():
        image, label = arr["image"], arr["label"]
        assert image.dtype == np.float16 and label.dtype == np.uint8
        assert image.shape[0] == 4 and label.shape == (3, *image.shape[1:])
        # TC and ET lie inside WT.
        assert not (label[0] & ~label[1]).any() and not (label[2] & ~label[1]).any()
        # RAS at 1 mm whatever the stored orientation or spacing.
        assert np.allclose(np.abs(np.diag(arr["affine"])[:3]), 1.0)
        assert (np.diag(arr["affine"])[:3] > 0).all(), cid
        for c in range(4):
            nz = image[c][image[c] != 0].astype(np.float32)
            assert abs(nz.mean()) < 0.05 and abs(nz.std() - 1) < 0.05
    assert result.index["fingerprint"] == DataConfig().fingerprint()
    assert result.processed == 6


def test_second_run_is_a_noop(preprocessed, minio_server) -> None:
    storage = Storage(minio_server.settings())
    again = preprocess(
        "brats2021", "s3://pre-module", DataConfig(), storage=storage, progress=False
    )
    assert again.processed == 0
    assert again.index == preprocessed["brats2021"][1].index


def test_interrupted_run_resumes_with_missing_cases_only(
    synth_root, storage: Storage, bucket: str
) -> None:
    ingest(str(synth_root / "brats2021"), "r", bucket, storage=storage)
    first = preprocess("r", bucket, DataConfig(), storage=storage, progress=False)
    # As if the run had died after four cases: no index, two case objects absent.
    storage.delete(join(first.prefix, "index.json"))
    for entry in first.index["cases"][:2]:
        storage.delete(join(first.prefix, entry["key"]))
    second = preprocess("r", bucket, DataConfig(), storage=storage, progress=False)
    assert second.processed == 2
    assert [c["sha256"] for c in second.index["cases"]] == [
        c["sha256"] for c in first.index["cases"]
    ]


def test_other_config_gets_its_own_cache(synth_root, storage: Storage, bucket: str) -> None:
    ingest(str(synth_root / "brats2021"), "cfg", bucket, storage=storage)
    a = preprocess("cfg", bucket, DataConfig(), storage=storage, progress=False)
    b = preprocess(
        "cfg", bucket, DataConfig(spacing=(2.0, 2.0, 2.0)), storage=storage, progress=False
    )
    assert a.prefix != b.prefix and b.processed == 6
    shape_a = a.index["cases"][0]["shape"]
    shape_b = b.index["cases"][0]["shape"]
    assert all(sb <= sa // 2 + 1 for sa, sb in zip(shape_a, shape_b, strict=True))


def test_parallel_workers_give_identical_objects(
    synth_root, storage: Storage, bucket: str, s3_env
) -> None:
    ingest(str(synth_root / "brats2021"), "par", bucket, storage=storage)
    serial = preprocess("par", bucket, DataConfig(), storage=storage, progress=False)
    storage.delete_prefix(serial.prefix)
    parallel = preprocess("par", bucket, DataConfig(), storage=storage, workers=2, progress=False)
    assert parallel.processed == 6
    assert [c["sha256"] for c in parallel.index["cases"]] == [
        c["sha256"] for c in serial.index["cases"]
    ]


def test_missing_dataset_is_a_clear_error(storage: Storage, bucket: str) -> None:
    with pytest.raises(DatasetError, match="has no versions"):
        preprocess("nothing-here", bucket, storage=storage, progress=False)
    with pytest.raises(DatasetError, match="does not exist"):
        preprocess("nothing-here@abc", bucket, storage=storage, progress=False)


def test_in_process_run_leaves_torch_threads_alone(
    synth_root, storage: Storage, bucket: str
) -> None:
    """One thread per *worker process*; the caller (training next, say) keeps its own."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ingest(str(synth_root / "msd"), "threads", bucket, storage=storage)
        preprocess("threads", bucket, DataConfig(), storage=storage, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
