"""Shared fixtures: a real MinIO server on 127.0.0.1, buckets, small synthetic data and models."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import pytest

from medseg.apps.minio_server import MinioServer
from medseg.apps.mlflow_server import MlflowServer
from medseg.apps.model_server_process import ModelServerProcess, write_seeded_model
from medseg.config import MedsegConfig
from medseg.core.errors import MedsegError
from medseg.core.storage import Storage, join
from medseg.data.synth import write_dataset

if TYPE_CHECKING:
    from medseg.data.manifest import DatasetRef

#: Small volumes keep the suite fast; the code paths are the same as at full size.
SHAPE = (48, 48, 32)

#: The tiny SegResNet and windows every test that trains or serves uses (seconds on a CPU).
TINY: dict[str, dict[str, Any]] = {
    "model": {"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]},
    "train": {"batch_size": 2, "num_workers": 0, "roi_size": [32, 32, 32]},
    "infer": {"roi_size": [32, 32, 32]},
    "split": {"val_fraction": 0.34},
}


def tiny_config(**sections: dict[str, Any]) -> MedsegConfig:
    """:data:`TINY` with fields of its sections overridden (``train={"epochs": 2}``)."""
    merged = {key: dict(value) for key, value in TINY.items()}
    for key, value in sections.items():
        merged[key] = {**merged.get(key, {}), **value}
    return MedsegConfig.model_validate(merged)


def write_run_model(
    storage: Storage, store: str, run_id: str, config: bytes = b"model: {}\n"
) -> tuple[bytes, str]:
    """A run's model folder as training leaves it: weights of its own, ``config``, lineage.

    Returns:
        The weights' bytes, and the folder's URI.
    """
    weights = f"weights of {run_id}".encode()
    model = join(store, "runs", run_id, "model")
    pt = storage.put_bytes(join(model, "model.pt"), weights)
    yml = storage.put_bytes(join(model, "model.yaml"), config)
    lineage = {
        "run_id": run_id,
        "dataset": {"store": store, "name": "d", "version": "0123456789abcdef"},
        "preprocessing": "fp",
        "best": {"dice_mean": 0.5},
        "epochs": 1,
        "files": {"model.pt": pt.sha256, "model.yaml": yml.sha256},
    }
    storage.put_json(join(model, "lineage.json"), lineage)
    return weights, model


def write_tiny_model(folder: Path, seed: int = 0, **sections: dict[str, Any]) -> Path:
    """A model artifact (``model.pt``, ``model.yaml``): :func:`tiny_config` with seeded weights."""
    return write_seeded_model(folder, tiny_config(**sections), seed)


#: The tiny skin-lesion classifier's data: images, their size after preprocessing, the split.
SKIN_IMAGES = 42
SKIN_SIZE = 32
SKIN_SPLIT = {"val_fraction": 0.3, "seed": 1}


def skin_config(imbalance: str = "weighted_sampler", **train: Any) -> MedsegConfig:
    """A tiny skin-lesion config: 32 px images, 2 epochs, no workers."""
    from medseg.tasks.skin_classes import CHANNELS, CLASSES

    return MedsegConfig.model_validate(
        {
            "task": {"kind": "skin-lesion-classification", "imbalance": imbalance},
            "data": {"channels": list(CHANNELS), "image_size": [SKIN_SIZE, SKIN_SIZE]},
            "model": {"name": "DenseNet121", "in_channels": 3, "out_channels": len(CLASSES)},
            "train": {
                "epochs": 2,
                "batch_size": 8,
                "lr": 1e-3,
                "num_workers": 0,
                "amp": False,
                **train,
            },
            "split": SKIN_SPLIT,
        }
    )


@contextlib.contextmanager
def model_server(
    model_dir: Path,
    log: Path,
    env: dict[str, str] | None = None,
    ready_timeout: float = 600,
    **limits: Any,
) -> Iterator[ModelServerProcess]:
    """The container's entrypoint serving ``model_dir`` on free loopback ports until the block ends.

    Args:
        model_dir: The model artifact.
        log: Where the server's output goes.
        env: Variables set for the server over this process's.
        ready_timeout: Seconds to wait for the server to be ready (a loaded machine imports
            torch slowly).
        limits: :class:`~medseg.core.settings.ServerArgs` flags (``max_request_mb=4``).
    """
    server = ModelServerProcess(model_dir, log, env=env, **limits)
    try:
        server.start(ready_timeout)
    except MedsegError as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def minio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinioServer]:
    """One real MinIO server for the session (random port, temp dir)."""
    server = MinioServer(tmp_path_factory.mktemp("minio") / "data").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(
    minio_server: MinioServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """One real MLflow tracking server for the session: SQLite, artifacts in the session MinIO."""
    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    Storage(minio_server.settings()).ensure_bucket(f"s3://{bucket}")
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    server = MlflowServer(bucket, minio_server.settings(), db).start()
    yield server
    server.stop()


@pytest.fixture
def tracking_env(mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """Track to the session's MLflow server, in an experiment of the test's own (its name)."""
    experiment = f"t-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("MEDSEG_TRACKING_EXPERIMENT", experiment)
    return experiment


@pytest.fixture
def own_minio(tmp_path: Path) -> Iterator[MinioServer]:
    """A MinIO server of the test's own, for tests that stop or kill it."""
    server = MinioServer(tmp_path / "minio-data").start()
    yield server
    server.stop()


@pytest.fixture
def storage(minio_server: MinioServer) -> Storage:
    return Storage(minio_server.settings(retry_seconds=10))


@pytest.fixture
def bucket(storage: Storage) -> str:
    """A fresh bucket on the session server, as ``s3://NAME``."""
    uri = f"s3://t-{uuid.uuid4().hex[:12]}"
    storage.ensure_bucket(uri)
    return uri


@pytest.fixture
def s3_env(minio_server: MinioServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Point code that reads the environment (CLI, worker processes) at the session server."""
    for key, value in minio_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MEDSEG_ENV_FILE", str(tmp_path / "no-such.env"))
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same six synthetic cases in all three public layouts (read-only: copy to modify)."""
    root = tmp_path_factory.mktemp("synth")
    for layout in ("brats2021", "brats2023", "msd"):
        write_dataset(root / layout, layout, n_cases=6, shape=SHAPE, seed=7)
    return root


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs), to run out of space honestly; needs root to mount."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def case_array(case: Path) -> tuple[np.ndarray, np.ndarray]:
    """A case folder's four channels (t1, t1ce, t2, flair) as one array, and their affine."""
    imgs = [nib.load(next(case.glob(f"*_{m}.nii.gz"))) for m in ("t1", "t1ce", "t2", "flair")]
    return np.stack([i.get_fdata(dtype=np.float32) for i in imgs]), imgs[0].affine  # type: ignore[attr-defined]


def write_biased_model(folder: Path, case: Path | None = None) -> Path:
    """The tiny model artifact (:func:`write_tiny_model`).

    With ``case``, the final layer's biases are shifted so that about half of the case's voxels
    fall in each region: its label maps then hold every label, not only background.
    """
    import torch

    from medseg.config import REGIONS
    from medseg.inference.infer import load_model, segment_case
    from medseg.tasks.networks import build_network

    write_tiny_model(folder)
    if case is not None:
        net = build_network(tiny_config().model)
        net.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
        image, affine = case_array(case)
        probs = segment_case(load_model(str(folder), Storage()), image, affine).probabilities
        p = np.clip(np.median(probs.reshape(len(REGIONS), -1), axis=1), 1e-6, 1 - 1e-6)
        with torch.no_grad():
            net.conv_final[-1].conv.bias -= torch.as_tensor(
                np.log(p / (1 - p)), dtype=torch.float32
            )
        torch.save(net.state_dict(), folder / "model.pt")
    return folder


@pytest.fixture(scope="session")
def ham(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:data:`SKIN_IMAGES` synthetic HAM10000 images in its layout (read-only)."""
    from medseg.data.skin_synth import write_ham10000

    root = tmp_path_factory.mktemp("ham")
    write_ham10000(root, SKIN_IMAGES, seed=5)
    return root


@dataclass
class SkinModel:
    """The tiny skin model's store, dataset, training run and model artifact (``uri``)."""

    storage: Storage
    bucket: str
    ref: DatasetRef
    run_id: str
    uri: str


@pytest.fixture(scope="session")
def skin_model(ham: Path, minio_server: MinioServer) -> SkinModel:
    """One epoch of the tiny skin model (:func:`skin_config`), trained once for the session."""
    from medseg.config import SplitConfig
    from medseg.data.ingest import ingest
    from medseg.data.preprocess import preprocess
    from medseg.training.train import train

    storage = Storage(minio_server.settings(retry_seconds=10))
    bucket = f"s3://t-{uuid.uuid4().hex[:12]}"
    storage.ensure_bucket(bucket)
    cfg = skin_config(epochs=1)
    split = SplitConfig.model_validate(SKIN_SPLIT)
    ref = ingest(str(ham), "skin", bucket, storage=storage, split=split).ref
    preprocess(str(ref), bucket, cfg.data, storage=storage, progress=False)
    run = train(str(ref), bucket, "skin-eval", cfg, storage=storage)
    return SkinModel(storage, bucket, ref, "skin-eval", join(run.run_prefix, "model"))


@pytest.fixture(scope="session")
def served_case(synth_root: Path) -> Path:
    """A BraTS 2021 case folder (48×48×32; stored LPS, to exercise the reorientation)."""
    return sorted(p for p in (synth_root / "brats2021").iterdir() if p.is_dir())[0]


@pytest.fixture(scope="session")
def served_model_dir(tmp_path_factory: pytest.TempPathFactory, served_case: Path) -> Path:
    """The biased tiny model (every label present in the served case's label map)."""
    return write_biased_model(tmp_path_factory.mktemp("model") / "m", served_case)


@pytest.fixture(scope="session")
def served(
    served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """``python -m model_server`` (the container's entrypoint) on free loopback ports.

    One for the session: the serving, metrics and DICOM-serving tests share it (each checks
    deltas of what it sent, never absolute counts).
    """
    log = tmp_path_factory.mktemp("server") / "server.log"
    with model_server(served_model_dir, log, {"OMP_NUM_THREADS": "2"}, max_request_mb=4) as running:
        yield {"rest": running.url, "grpc": running.grpc}
