"""Shared fixtures: a real MinIO server on 127.0.0.1, buckets, and small synthetic datasets."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from medseg.minio_server import MinioServer
from medseg.storage import Storage
from medseg.synth import write_dataset

#: Small volumes keep the suite fast; the code paths are the same as at full size.
SHAPE = (48, 48, 32)


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
