"""Shared fixtures: a real MinIO server on 127.0.0.1, buckets, and small synthetic datasets."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from medseg.config import MedsegConfig
from medseg.minio_server import MinioServer, free_port
from medseg.settings import ServerArgs
from medseg.storage import Storage
from medseg.synth import write_dataset

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


def write_tiny_model(folder: Path, seed: int = 0, **sections: dict[str, Any]) -> Path:
    """A model artifact (``model.pt``, ``model.yaml``): :func:`tiny_config` with seeded weights."""
    import torch

    from medseg.model import build_network

    cfg = tiny_config(**sections)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(build_network(cfg.model).state_dict(), folder / "model.pt")
    (folder / "model.yaml").write_text(cfg.to_yaml())
    return folder


@dataclass(frozen=True)
class RunningServer:
    """A ``python -m model_server`` process on loopback ports."""

    rest: str
    grpc: str
    pid: int
    log: Path
    ports: tuple[int, int]


@contextlib.contextmanager
def model_server(
    model_dir: Path,
    log: Path,
    env: dict[str, str] | None = None,
    ready_timeout: float = 600,
    **limits: Any,
) -> Iterator[RunningServer]:
    """The container's entrypoint serving ``model_dir`` on free ports, until the block ends.

    Args:
        model_dir: The model artifact.
        log: Where the server's output goes.
        env: Variables set for the server over this process's (``MEDSEG_SERVER_HOST`` is
            cleared: loopback).
        ready_timeout: Seconds to wait for the server to be ready (a loaded machine imports
            torch slowly).
        limits: :class:`~medseg.settings.ServerArgs` flags (``max_request_mb=4``).
    """
    from medseg.client import wait_ready
    from medseg.errors import MedsegError

    http, grpc = free_port(), free_port()
    cmd = ServerArgs(str(model_dir), http_port=http, grpc_port=grpc, **limits).command()
    environ = {**os.environ, **(env or {})}
    environ.pop("MEDSEG_SERVER_HOST", None)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=environ)
    rest = f"http://127.0.0.1:{http}"
    try:
        wait_ready(rest, ready_timeout, proc, log)
    except MedsegError as exc:
        proc.kill()
        pytest.fail(str(exc))
    try:
        yield RunningServer(rest, f"127.0.0.1:{grpc}", proc.pid, log, (http, grpc))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def minio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinioServer]:
    """One real MinIO server for the session (random port, temp dir)."""
    server = MinioServer(tmp_path_factory.mktemp("minio") / "data").start()
    yield server
    server.stop()


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
