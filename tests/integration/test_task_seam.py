"""The task seam: a toy second task, defined here only, through the shared machinery.

Two channels (``a``, ``b``) in, two disjoint regions (``A``, ``B``) out, a two-layer
convolution as its network and its own label convention (``toy-ab``: 1 = A, 2 = B). It is
registered for the test (and, in the model server's process, through ``MEDSEG_TASK_PLUGINS``)
and runs preprocess → train → predict → evaluate → serve with no change to the library: what
differs from BraTS is in this module.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medseg.config import MedsegConfig, ModelConfig
from medseg.core.errors import InvalidInput, MedsegError
from medseg.core.storage import Storage, join
from medseg.data.manifest import CaseEntry, DatasetRef, FileEntry, Manifest
from medseg.data.preprocess import preprocess
from medseg.evaluation.evaluate import evaluate
from medseg.inference.infer import load_model, segment_case
from medseg.inference.predict import predict
from medseg.serving.client import infer as infer_v2
from medseg.serving.client import predict as send
from medseg.tasks import (
    InputSpec,
    OutputSpec,
    TaskConfig,
    get_convention,
    get_task,
    register_task,
    task_of,
    unregister_task,
)
from medseg.tasks.segmentation import RegionSegmentation
from medseg.training.train import train
from tests.conftest import model_server

SHAPE = (20, 20, 16)
CASES = 6


@dataclass(frozen=True)
class ToyConvention:
    """``toy-ab``: label 1 is region A, label 2 region B (disjoint; B wins an overlap)."""

    name: str = "toy-ab"
    labels: dict[int, str] = field(default_factory=lambda: {1: "A", 2: "B"})

    @property
    def allowed(self) -> frozenset[int]:
        return frozenset({0, 1, 2})

    def to_regions(self, label: np.ndarray) -> np.ndarray:
        return np.stack([label == 1, label == 2]).astype(np.uint8)

    def from_regions(self, regions: np.ndarray) -> np.ndarray:
        out = np.zeros(regions.shape[1:], dtype=np.uint8)
        out[np.asarray(regions[0]) > 0] = 1
        out[np.asarray(regions[1]) > 0] = 2
        return out


class ToyTaskConfig(TaskConfig):
    kind: Literal["toy-ab"] = "toy-ab"


@dataclass(frozen=True)
class ToyTask(RegionSegmentation):
    """Two channels, two regions, a tiny network."""

    def build_network(self, cfg: ModelConfig) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv3d(cfg.in_channels, cfg.init_filters, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv3d(cfg.init_filters, cfg.out_channels, 1),
        )


TOY = ToyTask(
    name="toy-ab",
    config_type=ToyTaskConfig,
    inputs=InputSpec(channels=("a", "b"), spatial_dims=3),
    outputs=OutputSpec(kind="regions", names=("A", "B")),
    networks=("TinyConv",),
    conventions={"toy-ab": ToyConvention()},
    default_convention="toy-ab",
    gate_metric="dice_mean",
    colours=(("A", "green", (0.2, 0.8, 0.2)), ("B", "red", (0.9, 0.1, 0.1))),
    centre_region="A",
    display_channel="a",
)

TOY_CONFIG = {
    "task": {"kind": "toy-ab"},
    "data": {"channels": ["a", "b"], "crop_foreground": False},
    "model": {"name": "TinyConv", "in_channels": 2, "out_channels": 2, "init_filters": 4},
    "train": {
        "epochs": 3,
        "lr": 1e-2,
        "batch_size": 2,
        "num_workers": 0,
        "roi_size": [16, 16, 16],
        "amp": False,
    },
    "infer": {"roi_size": [16, 16, 16], "nesting": "disjoint"},
    "split": {"val_fraction": 0.34},
}


@pytest.fixture
def toy() -> Iterator[ToyTask]:
    register_task(TOY)
    try:
        yield TOY
    finally:
        unregister_task(TOY.name)


def _case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 2-channel image ``[X, Y, Z, 2]`` and its label map: A bright in ``a``, B in ``b``."""
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, dtype=np.int16)
    x, y, z = (int(v) for v in rng.integers(3, 7, size=3))
    label[x : x + 6, y : y + 6, z : z + 5] = 1
    label[x + 8 : x + 13, y + 7 : y + 12, z + 5 : z + 10] = 2
    image = rng.normal(1.0, 0.1, (*SHAPE, 2)).astype(np.float32)
    image[..., 0][label == 1] += 3.0
    image[..., 1][label == 2] += 3.0
    return image, label


def _nifti(array: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(array, np.eye(4)).to_bytes(), mtime=0)


def _store_dataset(storage: Storage, store: str) -> DatasetRef:
    """A stored ``toy`` version as ingest would write it (ingest reads BraTS layouts only)."""
    files: dict[str, bytes] = {}
    entries = []
    for n in range(CASES):
        case_id = f"toy-{n:02d}"
        image, label = _case(n)
        blobs = {"image": _nifti(image), "label": _nifti(label)}
        entry_files = []
        for role, blob in blobs.items():
            key = f"raw/{case_id}/{case_id}_{role}.nii.gz"
            files[key] = blob
            sha = hashlib.sha256(blob).hexdigest()
            entry_files.append(FileEntry(role=role, key=key, sha256=sha, size=len(blob)))
        entries.append(
            CaseEntry(
                case_id=case_id,
                split="validation" if n < 2 else "train",
                files=entry_files,
                channel_index={"a": 0, "b": 1},
                shape=SHAPE,
                spacing=(1.0, 1.0, 1.0),
                orientation="RAS",
                label_counts={str(v): int((label == v).sum()) for v in (1, 2)},
            )
        )
    manifest = Manifest(
        name="toy",
        layout="toy",
        convention="toy-ab",
        channels=("a", "b"),
        split_seed=0,
        val_fraction=0.34,
        cases=entries,
        quarantined=[],
    )
    version = manifest.content_hash()
    ref = DatasetRef(store=store, name="toy", version=version)
    for key, blob in files.items():
        storage.put_bytes(join(ref.prefix, key), blob)
    storage.put_json(
        ref.manifest_uri, manifest.model_copy(update={"version": version}).model_dump(mode="json")
    )
    storage.put_json(join(store, "datasets", "toy", "latest.json"), {"version": version})
    return ref


def _local(storage: Storage, uri: str, tmp_path: Path) -> Path:
    dest = tmp_path / "fetched" / uri.rsplit("/", 1)[-1]
    storage.get_file(uri, dest)
    return dest


def test_the_config_names_the_task_and_must_fit_it(toy: ToyTask) -> None:
    cfg = MedsegConfig.model_validate(TOY_CONFIG)
    assert task_of(cfg) is toy and cfg.task.kind == "toy-ab"
    again = MedsegConfig.model_validate(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg and isinstance(again.task, ToyTaskConfig)
    wrong = {**TOY_CONFIG, "model": {**TOY_CONFIG["model"], "out_channels": 3}}  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="out_channels is 3, task toy-ab has 2 outputs"):
        MedsegConfig.model_validate(wrong)
    brats_channels = {**TOY_CONFIG, "data": {"channels": ["t1", "t1gd", "t2", "flair"]}}
    with pytest.raises(ValueError, match="permutation of task toy-ab's"):
        MedsegConfig.model_validate(brats_channels)
    unregister_task(toy.name)
    try:
        with pytest.raises(ValueError, match="unknown task 'toy-ab'; known: brats-segmentation"):
            MedsegConfig.model_validate(TOY_CONFIG)
    finally:
        register_task(toy)
    assert get_task("toy-ab") is toy


def test_toy_task_trains_predicts_evaluates_and_serves(
    toy: ToyTask, storage: Storage, bucket: str, s3_env: None, tmp_path: Path
) -> None:
    cfg = MedsegConfig.model_validate(TOY_CONFIG)
    ref = _store_dataset(storage, bucket)
    preprocess("toy", bucket, cfg.data, storage=storage, progress=False)

    run = train("toy", bucket, "toy-run", cfg, storage=storage)
    assert [h["epoch"] for h in run.history] == [1, 2, 3]
    assert set(run.history[-1]) >= {"dice_a", "dice_b", "dice_mean"}
    model_uri = join(run.run_prefix, "model")

    predicted = predict(
        model_uri, dataset=str(ref), split="validation", store=bucket, storage=storage
    )
    assert [c["case_id"] for c in predicted.cases] == ["toy-00", "toy-01"]
    assert set(predicted.cases[0]["volumes_ml"]) == {"A", "B"}
    header = storage.get_bytes(join(predicted.out, "volumes.csv")).decode().splitlines()[0]
    assert header == "case,A_ml,B_ml"

    result = evaluate(
        model_uri,
        dataset=str(ref),
        store=bucket,
        split="validation",
        threshold=0.0,
        storage=storage,
        predictions=predicted.out,
    )
    assert set(result.dice) == {"A", "B"} and set(result.hd95) == {"A", "B"}
    assert result.passed and result.threshold == 0.0
    for case in result.cases:  # the scores are those of the written label maps, region by region
        key = next(c["key"] for c in predicted.cases if c["case_id"] == case.case_id)
        pred = np.asarray(nib.load(_local(storage, join(predicted.out, key), tmp_path)).dataobj)
        truth = _case(int(case.case_id[-2:]))[1]
        for value, region in ((1, "A"), (2, "B")):
            p, t = pred == value, truth == value
            want = 2 * (p & t).sum() / (p.sum() + t.sum()) if p.any() or t.any() else 1.0
            assert case.dice[region] == pytest.approx(want, abs=1e-6)
    assert result.definition.startswith("label-map Dice/HD95 (toy-ab: A, B)")
    page = storage.get_bytes(join(result.out, "report.html")).decode()
    assert "<th>Dice A</th><th>Dice B</th>" in page and "(A, B)" in page
    assert storage.exists(join(result.out, "overlays", "toy-00.png"))

    # serve: the server process registers the task from MEDSEG_TASK_PLUGINS
    model_dir = tmp_path / "model"
    for name in ("model.pt", "model.yaml", "lineage.json"):
        storage.get_file(join(model_uri, name), model_dir / name)
    image, _ = _case(0)
    case_file = tmp_path / "toy-00.nii.gz"
    case_file.write_bytes(_nifti(image))
    ours = segment_case(
        load_model(str(model_dir), device="cpu"), np.moveaxis(image, -1, 0), np.eye(4)
    )
    root = str(Path(__file__).resolve().parents[2])
    env = {
        "MEDSEG_TASK_PLUGINS": "tests.integration.test_task_seam:TOY",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    with model_server(model_dir, tmp_path / "server.log", env=env) as server:
        for grpc in (False, True):
            url = server.grpc if grpc else server.url
            answer = send(url, [case_file], grpc=grpc, channels=["a", "b"], labels=True)
            assert answer.label_convention == "toy-ab"
            assert list(answer.volumes_ml) == ["A", "B"]
            assert [answer.volumes_ml[r] for r in "AB"] == pytest.approx(
                [ours.volumes_ml[r] for r in "AB"], rel=1e-5
            )
            assert answer.labels is not None
            np.testing.assert_array_equal(answer.labels, ours.label_map())
        with pytest.raises(MedsegError, match="'brats2021' is not a convention of this model"):
            send(server.url, [case_file], channels=["a", "b"], label_convention="brats2021")
        _, params = infer_v2(
            server.url,
            "medseg",
            {
                "name": "image",
                "datatype": "FP32",
                "shape": [1, 2, *SHAPE],
                "parameters": {"spacing": "1,1,1", "channels": "a,b"},
            },
            np.ascontiguousarray(np.moveaxis(image, -1, 0)[None]).tobytes(),
            {},
            ["volumes_ml"],
            60.0,
            False,
        )
        assert params["label_convention"] == "toy-ab"


def test_another_process_finds_the_task_by_its_plugin_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``MEDSEG_TASK_PLUGINS`` registers a task on its first lookup (the server's way)."""
    monkeypatch.setenv("MEDSEG_TASK_PLUGINS", "tests.integration.test_task_seam:TOY")
    try:
        assert get_task("toy-ab") is TOY
        assert get_convention("toy-ab") is TOY.conventions["toy-ab"]
    finally:
        unregister_task(TOY.name)
    for ref, reason in [
        ("tests.no_such_module:TOY", "cannot load 'tests.no_such_module:TOY'"),
        (
            "tests.integration.test_task_seam:NOPE",
            "cannot load 'tests.integration.test_task_seam:NOPE'",
        ),
        (
            "tests.integration.test_task_seam:SHAPE",
            "'tests.integration.test_task_seam:SHAPE' is not a medseg Task",
        ),
    ]:
        monkeypatch.setenv("MEDSEG_TASK_PLUGINS", ref)
        with pytest.raises(InvalidInput, match=re.escape(reason)):
            get_task("toy-ab")


def test_dicom_is_brats_only() -> None:
    from medseg.dicom.seg import check_dicom_task

    check_dicom_task(get_task("brats-segmentation"))
    with pytest.raises(MedsegError, match="task toy-ab writes no DICOM"):
        check_dicom_task(TOY)
